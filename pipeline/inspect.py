"""`amused shards verify` and `amused shards inspect`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from amused.pipeline import shards as fmt
from amused.plumbing.fsio import TMP_MARK, sha256_of
from amused.plumbing.plots import image_grid, save_png
from amused.plumbing.storage import join, url_to_fs


@dataclass
class VerifyReport:
    url: str
    shards: int = 0
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        head = f"{'OK' if self.ok else 'FAILED'}: {self.url}: {self.shards} shards, {self.rows} rows checked"
        return "\n".join([head, *(f"  error: {e}" for e in self.errors), *(f"  warning: {w}" for w in self.warnings)])


def verify_dataset(url: str, checksums: bool = True) -> VerifyReport:
    """Manifest vs files: existence, size, sha256, row counts, schema, each shard's key-value spec,
    tensor shapes, key uniqueness, image token ids within the codebook, finite float tensors (the text
    embeddings; the compact text mode's ids are not checked: the spec does not record the vocabulary);
    every completion marker made with the manifest's settings and format version and agreeing with its
    record."""
    report = VerifyReport(url)
    try:
        dataset = fmt.TokenDataset(url)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.errors.append(f"manifest: {type(exc).__name__}: {exc}")
        return report
    spec = dataset.spec
    fs, root = url_to_fs(url)
    on_disk = {p.rsplit("/", 1)[-1]: info for p, info in fs.find(root, maxdepth=1, detail=True).items()}
    listed = {s.name for s in dataset.shards}
    for name in sorted(on_disk):
        if TMP_MARK in name:
            report.warnings.append(f"{name}: leftover temporary file from an interrupted write")
        elif name.endswith(".parquet") and name not in listed:
            report.warnings.append(f"{name}: shard not in the manifest (unfinished; a rerun rewrites it)")
    _check_markers(url, dataset.manifest, report)
    expected_schema = spec.schema()
    expected_header = fmt.shard_header(expected_schema)
    tensors = spec.tensor_columns()
    keys: set[str] = set()
    for shard in dataset.shards:
        where = shard.name
        info = on_disk.get(shard.name)
        if info is None:
            report.errors.append(f"{where}: listed in the manifest but missing")
            continue
        if int(info.get("size") or 0) != shard.bytes:
            report.errors.append(f"{where}: {info.get('size')} bytes, manifest says {shard.bytes}")
            continue
        if checksums and sha256_of(join(url, shard.name)) != shard.sha256:
            report.errors.append(f"{where}: sha256 differs from the manifest")
            continue
        try:
            table = dataset.read_shard(shard.name)
        except Exception as exc:  # a corrupt file must be reported, whatever pyarrow raises
            report.errors.append(f"{where}: unreadable Parquet ({type(exc).__name__}: {exc})")
            continue
        report.shards += 1
        report.rows += table.num_rows
        if table.num_rows != shard.rows:
            report.errors.append(f"{where}: {table.num_rows} rows, manifest says {shard.rows}")
        if not table.schema.equals(expected_schema, check_metadata=False):
            report.errors.append(f"{where}: schema differs from the manifest's spec:\n{table.schema}")
            continue
        if dataset.manifest.version >= 3:  # earlier shards did not carry the spec
            _check_header(fmt.shard_header(table.schema), expected_header, spec, where, report)
        cols = dataset.decode(table.select(["key", *tensors]))
        dup = len(cols["key"]) - len(set(cols["key"]))
        new_keys = set(cols["key"])
        clash = keys & new_keys
        if dup or clash:
            report.errors.append(f"{where}: {dup} duplicate keys inside, {len(clash)} shared with earlier shards")
        keys |= new_keys
        if table.num_rows and int(cols["image_tokens"].max()) >= spec.codebook_size:
            report.errors.append(f"{where}: token id {int(cols['image_tokens'].max())} >= codebook size "
                                 f"{spec.codebook_size}")
        for name, (dtype, _) in tensors.items():
            if dtype.kind == "f" and not np.isfinite(cols[name]).all():
                report.errors.append(f"{where}: non-finite values in {name}")
    if report.rows != dataset.num_rows:
        report.errors.append(f"manifest total {dataset.num_rows} rows, shards hold {report.rows}")
    return report


def _check_header(header: dict | None, expected: dict, spec: fmt.DatasetSpec, where: str,
                  report: VerifyReport) -> None:
    """The shard's own record of how it was made (read by tools without the manifest) must be the manifest's."""
    if header is None:
        report.errors.append(f"{where}: no {fmt.KV_KEY!r} entry in the Parquet key-value metadata")
        return
    for key in ("format", "version", "columns"):
        if header.get(key) != expected[key]:
            report.errors.append(f"{where}: key-value metadata {key} {header.get(key)!r}, manifest says {expected[key]!r}")
    try:
        changes = fmt.DatasetSpec.from_json(header["spec"]).changes_to(spec)
    except (KeyError, TypeError, ValueError) as exc:
        changes = [f"unreadable ({type(exc).__name__}: {exc})"]
    if changes:
        report.errors.append(f"{where}: key-value metadata spec differs from the manifest's (shard -> manifest): "
                             + "; ".join(changes))


def _check_markers(url: str, manifest: fmt.Manifest, report: VerifyReport) -> None:
    """A marker made with other settings would make a rerun refuse the folder (or, before
    markers carried settings, mix shards); one that disagrees with the manifest's record
    means the two were written by different runs."""
    try:
        markers = fmt.read_markers(url)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.errors.append(f"{fmt.STATS_DIR}: unreadable completion marker ({type(exc).__name__}: {exc})")
        return
    listed = {s.name: s for s in manifest.shards}
    for name, marker in sorted(markers.items()):
        where = f"{name} (marker {marker.path})"
        if marker.spec is None:
            report.warnings.append(f"{where}: the marker does not record the settings it was made with")
        elif changes := marker.changes_to(manifest.spec, manifest.version):
            report.errors.append(f"{where}: made with other settings than the manifest's (marker -> manifest): "
                                 + "; ".join(changes))
        record = listed.get(name)
        if record is not None and (marker.record.sha256, marker.record.rows) != (record.sha256, record.rows):
            report.errors.append(f"{where}: the marker's sha256/rows differ from the manifest's")
    for name in sorted(set(listed) - set(markers)):
        report.warnings.append(f"{name}: no completion marker (a rerun would write the shard again)")


def inspect_dataset(url: str, max_rows: int = 100_000) -> dict:
    """Summary: rows, bytes per sample by column, caption lengths, codebook usage (first `max_rows`)."""
    dataset = fmt.TokenDataset(url)
    spec = dataset.spec
    fs, _ = url_to_fs(url)
    column_bytes: dict[str, int] = {}
    for shard in dataset.shards:
        path = url_to_fs(join(url, shard.name))[1]
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                col = group.column(c)
                column_bytes[col.path_in_schema] = column_bytes.get(col.path_in_schema, 0) + col.total_compressed_size
    rows = dataset.num_rows
    counts = np.zeros(spec.codebook_size, dtype=np.int64)
    caption_chars, caption_words, seen = [], [], 0
    for batch in dataset.iter_batches(batch_size=1024, columns=["caption", "image_tokens"]):
        take = min(len(batch["caption"]), max_rows - seen)
        if take <= 0:
            break
        caption_chars += [len(c) for c in batch["caption"][:take]]
        caption_words += [len(c.split()) for c in batch["caption"][:take]]
        counts += np.bincount(batch["image_tokens"][:take].ravel(), minlength=spec.codebook_size)[: spec.codebook_size]
        seen += take
    total = counts.sum()
    probs = counts[counts > 0] / max(total, 1)
    entropy = float(-(probs * np.log(probs)).sum()) if total else 0.0
    chars = np.asarray(caption_chars or [0])
    return {
        "url": url,
        "shards": len(dataset.shards),
        "rows": rows,
        "resolution": spec.resolution,
        "token_grid": list(spec.token_grid),
        "skipped": dataset.manifest.skipped(),
        "bytes_per_sample": {k: v / max(rows, 1) for k, v in sorted(column_bytes.items())},
        "caption_chars": {"min": int(chars.min()), "mean": float(chars.mean()), "p50": float(np.median(chars)),
                          "p95": float(np.percentile(chars, 95)), "max": int(chars.max())},
        "caption_words_mean": float(np.mean(caption_words or [0])),
        "codebook": {
            "rows_read": seen,
            "size": spec.codebook_size,
            "used": int((counts > 0).sum()),
            "used_fraction": float((counts > 0).mean()),
            "perplexity": float(np.exp(entropy)),
            # 1.0 when every code is equally frequent, -> 0 as usage concentrates.
            "evenness": float(entropy / np.log(spec.codebook_size)) if spec.codebook_size > 1 else 1.0,
            "top10_share": float(np.sort(counts)[::-1][:10].sum() / max(total, 1)),
        },
    }


def format_inspect(info: dict) -> str:
    cb = info["codebook"]
    lines = [
        f"token dataset {info['url']}",
        f"  shards {info['shards']}, rows {info['rows']}, resolution {info['resolution']}, "
        f"token grid {info['token_grid'][0]}x{info['token_grid'][1]}",
        "  bytes per sample by column (compressed):",
        *(f"    {k:20s} {v:12.1f}" for k, v in info["bytes_per_sample"].items()),
        f"    {'total':20s} {sum(info['bytes_per_sample'].values()):12.1f}",
        "  caption length (chars): min {min} mean {mean:.1f} p50 {p50:.0f} p95 {p95:.0f} max {max}".format(
            **info["caption_chars"]),
        f"  caption words (mean): {info['caption_words_mean']:.1f}",
        f"  codebook usage over {cb['rows_read']} rows: {cb['used']}/{cb['size']} codes used "
        f"({100 * cb['used_fraction']:.1f}%), perplexity {cb['perplexity']:.1f}, evenness {cb['evenness']:.3f}, "
        f"top-10 codes {100 * cb['top10_share']:.1f}% of tokens",
    ]
    if info["skipped"]:
        lines.append("  skipped while pre-tokenizing: " + ", ".join(f"{k} {v}" for k, v in info["skipped"].items()))
    return "\n".join(lines)


def reconstruction_grid(url: str, out_png: str, n: int = 16, vqgan: str | None = None) -> str:
    """Decodes the first `n` rows' tokens with the dataset's VQ-GAN (or `vqgan`) into a captioned PNG."""
    # torch and diffusers (~9 s) for this grid only: `amused shards verify` and `inspect` must not pay it.
    from amused.tokenizer.image import ImageTokenizer

    dataset = fmt.TokenDataset(url)
    batch = next(dataset.iter_batches(batch_size=n, columns=["caption", "image_tokens"]))
    tokenizer = ImageTokenizer.from_pretrained(vqgan or dataset.spec.image_tokenizer.path)
    images = tokenizer.decode(batch["image_tokens"])
    return save_png(image_grid(images, batch["caption"]), out_png)
