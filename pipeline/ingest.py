"""`amused ingest`: a user's own captioned images in, img2dataset-style webdataset shards out.

Inputs (exactly one):
- `images`: a folder (local or any fsspec URL) of images, captioned by sidecar files
  (`photos/cat.jpg` + `photos/cat.txt`) or, with `captions`, by a CSV, JSONL or Parquet
  table of `file,caption` rows (`file` relative to the folder; column names by flags);
- `hf_dataset`: a Hugging Face `datasets` dataset on disk: a `save_to_disk` folder (a
  DatasetDict's `split`), or a folder or file of Parquet or Arrow files, with an image
  column (an `Image` feature's {bytes, path}, raw bytes, or a path) and a caption column.
  Read with pyarrow from the files `datasets` writes: importing `datasets` costs 3.5 s in
  every process, and its Parquet loader first copies the data into its cache.

Output: `NNNNN.tar` with `KEY.EXT` (the image), `KEY.txt` (caption) and `KEY.json` (key,
caption, status, url = the source file, width/height, original_width/original_height,
sha256: img2dataset's names), `NNNNN.parquet` with one row per input sample (failures too,
with their reason) and `NNNNN_stats.json` (count, successes, failed_to_download,
failed_to_resize, status_dict), written in that order, each under a temporary name then
renamed: a shard counts once its stats file exists, as in img2dataset's incremental mode,
so `pretokenize`, the VQ-GAN trainer and the FID reference read these shards unchanged.

Images keep their bytes by default (the extension is the decoded format's, not the file
name's): nothing is lost to a second JPEG encoding, and ingest stays I/O bound; every
image is still decoded once, so an undecodable, truncated or too small one is a counted
skip. `image_size` re-encodes every image as JPEG, resized down to that shorter side,
as img2dataset does.

The sample list is fixed before any shard: sorted file names, or the table's or the
dataset's row order. Shard i holds samples [i*N, (i+1)*N) and sample j of shard i has
the key `{i:05d}{j:0Dd}`; the list's fingerprint is recorded in `_amused/ingest.json`.
A rerun writes only the shards without a stats file and, shards having fixed tar
metadata, the same bytes; a rerun over a changed input or other settings is refused.
Shards are Ray tasks (one CPU each), as the other data stages run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from amused.pipeline.images import open_image, resize_shorter_side
from amused.pipeline.wds import IMAGE_EXTS, BadSample, RawSample, caption_of, write_tar
from amused.plumbing.config import opt, output_settings
from amused.plumbing.fsio import atomic_writer, file_exists, read_json, write_json_atomic
from amused.plumbing.raysession import ray_session, ray_tasks
from amused.plumbing.storage import is_local, join, protocol, url_to_fs

STATE = "_amused"
# The settings that say what is read (a run config's `source` declares them).
INPUTS = ("images", "captions", "file_column", "hf_dataset", "image_column", "caption_column", "split")
TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
# Pillow names a camera JPEG with a second picture (MPO) apart; the readers take it as a JPEG.
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "AVIF": "avif", "GIF": "gif", "BMP": "bmp",
               "TIFF": "tiff"}
# Reasons that mean the input itself was not there to read (img2dataset's failed_to_download);
# every other skip is the image or its caption (failed_to_resize).
_NOT_READ = frozenset({"missing_file", "unreadable_file"})


def check_inputs(images: str | None, captions: str | None, hf_dataset: str | None, where: str) -> None:
    """One clear error for a source that names no input, two kinds, or a local path
    that is not there: raised where the source is written (flags or `source:`)."""
    if (images is None) == (hf_dataset is None):
        raise ValueError(f"{where}: give exactly one of images (a folder) or hf_dataset (a datasets folder)")
    if captions is not None and images is None:
        raise ValueError(f"{where}.captions: a caption table goes with images, not hf_dataset")
    if captions is not None and not captions.lower().endswith(TABLE_SUFFIXES):
        raise ValueError(f"{where}.captions: {captions!r} is not a {', '.join(TABLE_SUFFIXES)} file")
    for name, value in (("images", images), ("captions", captions), ("hf_dataset", hf_dataset)):
        if value is None:
            continue
        if not value.strip():
            raise ValueError(f"{where}.{name}: empty path")
        found, noun = _LOCAL_CHECKS[name]
        if is_local(value) and not found(url_to_fs(value)[1]):
            raise ValueError(f"{where}.{name}: no {noun} at {value}")


_LOCAL_CHECKS = {"images": (os.path.isdir, "folder"), "captions": (os.path.isfile, "file"),
                 "hf_dataset": (os.path.exists, "dataset")}


@dataclass
class IngestConfig:
    output: str = opt(help="folder for the webdataset shards NNNNN.tar (local or s3://)")
    images: str | None = opt(None, "folder of images (local or s3://), captioned by sidecar NAME.txt files or "
                                   "by --captions")
    captions: str | None = opt(None, "CSV, JSONL or Parquet table of file,caption rows, files relative to "
                                     "--images (default: sidecar .txt files)")
    hf_dataset: str | None = opt(None, "Hugging Face datasets dataset: a save_to_disk folder, or a folder or "
                                       "file of Parquet or Arrow files")
    file_column: str = opt("file", "image file column of --captions")
    caption_column: str = opt("caption", "caption column of --captions or --hf-dataset")
    image_column: str = opt("image", "image column of --hf-dataset (Image feature, bytes or path)")
    split: str = opt("train", "the split to read from a saved DatasetDict")
    samples_per_shard: int = opt(10_000, "input samples per shard (skipped ones included)")
    image_size: int = opt(0, "0: keep each image's bytes; N: re-encode as JPEG with the shorter side resized "
                             "down to N")
    encode_quality: int = opt(95, "JPEG quality (1-100) with --image-size")
    min_side: int = opt(32, "skip images whose shorter side is below this")
    max_pixels: int = opt(64_000_000, "skip images whose header declares more pixels (decompression bombs)")
    workers: int | None = opt(None, "concurrent shard tasks (default: the Ray cluster's CPUs)", output=False)
    ray_address: str | None = opt(None, "Ray cluster address (default: start a local Ray)", output=False)
    progress: bool = opt(True, "show a progress bar", output=False)

    def __post_init__(self):
        check_inputs(self.images, self.captions, self.hf_dataset, "ingest")
        if not self.output.strip():
            raise ValueError("output: empty path")
        for name in ("file_column", "caption_column", "image_column", "split"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name}: empty name")
        for name, low in (("samples_per_shard", 1), ("image_size", 0), ("min_side", 1), ("workers", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name}: {value!r} must be >= {low}")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality: {self.encode_quality!r} must be a JPEG quality in 1..100")
        if self.max_pixels < self.min_side ** 2:
            raise ValueError(f"max_pixels: {self.max_pixels!r} must be at least min_side**2 = {self.min_side ** 2}")


@dataclass
class IngestReport:
    output: str
    shards_total: int = 0
    shards_already_done: int = 0
    shards_written: int = 0
    samples: int = 0
    successes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    samples_written: int = 0  # the samples of the shards this run wrote (for the rate)

    @property
    def ok(self) -> bool:
        return self.successes > 0

    def summary(self) -> str:
        written = self.samples_written / self.seconds if self.seconds else 0.0
        lines = [f"ingest -> {self.output}",
                 f"  shards: {self.shards_total} total, {self.shards_already_done} already done, "
                 f"{self.shards_written} written",
                 f"  samples: {self.samples:,}, {self.successes:,} in shards, {sum(self.skipped.values()):,} skipped "
                 f"({written:.1f} samples/s written in {self.seconds:.1f}s)"]
        if self.skipped:
            lines.append("  skipped samples by reason:")
            lines += [f"    {reason:24s} {n}" for reason, n in sorted(self.skipped.items())]
        if not self.ok:
            lines.append("  FAILED: no usable image")
        return "\n".join(lines)


# ----- the sample list ----------------------------------------------------------------------

def _url(fs, path: str) -> str:
    scheme = protocol(fs)
    return path if scheme == "file" else f"{scheme}://{path}"


def _relative(root: str, path: str) -> str:
    return path[len(root.rstrip("/")) + 1:]


def _folder_entries(cfg: IngestConfig) -> list[list]:
    """[name, caption or None]: the folder's images in name order, captioned by their
    sidecar file (read in the shard task), or the caption table's rows in order."""
    fs, root = url_to_fs(cfg.images)
    if cfg.captions is None:
        names = sorted(_relative(root, p) for p in fs.find(root)
                       if p.rpartition(".")[2].lower() in IMAGE_EXTS and "/." not in "/" + _relative(root, p))
        return [[name, None] for name in names]
    return [[str(f) if f is not None else "", c] for f, c in _table_rows(cfg)]


def _table_rows(cfg: IngestConfig) -> list[tuple]:
    fs, path = url_to_fs(cfg.captions)
    wanted = (cfg.file_column, cfg.caption_column)
    suffix = path.lower().rpartition(".")[2]
    with fs.open(path, "rb") as fh:
        if suffix == "parquet":
            names = pq.read_schema(fh).names
            missing = [c for c in wanted if c not in names]
            if not missing:
                fh.seek(0)
                table = pq.read_table(fh, columns=list(wanted))
                return list(zip(*(table.column(c).to_pylist() for c in wanted)))
        elif suffix == "csv":
            reader = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8-sig", newline=""))
            names = reader.fieldnames or []
            missing = [c for c in wanted if c not in names]
            if not missing:
                return [(row[cfg.file_column], row[cfg.caption_column]) for row in reader]
        else:  # JSON lines
            rows = [json.loads(line) for line in io.TextIOWrapper(fh, encoding="utf-8") if line.strip()]
            bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
            if bad is not None:
                raise ValueError(f"{cfg.captions}: line {bad + 1} is not a JSON object")
            names = sorted({k for r in rows for k in r})
            missing = [c for c in wanted if not any(c in r for r in rows)]
            if not missing:
                return [(r.get(cfg.file_column), r.get(cfg.caption_column)) for r in rows]
    raise ValueError(f"{cfg.captions}: no column {missing[0]!r} (has {', '.join(map(str, names)) or 'none'}); "
                     f"name the columns with --file-column / --caption-column")


def _dataset_files(url: str, split: str) -> list[str]:
    """The data files of a `datasets` dataset in row order: a save_to_disk folder's (a
    DatasetDict's `split`), or the Parquet / Arrow files of a folder, or one file."""
    fs, root = url_to_fs(url)
    root = root.rstrip("/")
    if fs.isfile(root):
        return [_url(fs, root)]
    if file_exists(_url(fs, f"{root}/dataset_dict.json")):
        splits = json.loads(fs.cat_file(f"{root}/dataset_dict.json"))["splits"]
        if split not in splits:
            raise ValueError(f"{url}: no split {split!r} (has {', '.join(splits)}); choose one with --split")
        root = f"{root}/{split}"
    if file_exists(_url(fs, f"{root}/state.json")):
        state = json.loads(fs.cat_file(f"{root}/state.json"))
        return [_url(fs, f"{root}/{f['filename']}") for f in state["_data_files"]]
    found = sorted(p for p in fs.find(root) if p.endswith((".parquet", ".arrow")))
    if not found:
        raise ValueError(f"{url}: neither a save_to_disk folder nor a folder of .parquet / .arrow files")
    return [_url(fs, p) for p in found]


def _read_table(url: str, columns: list[str] | None = None) -> pa.Table:
    """A data file's columns: Parquet, or Arrow (the stream format save_to_disk writes, or the
    file format), memory-mapped where local."""
    fs, path = url_to_fs(url)
    if path.endswith(".parquet"):
        return pq.read_table(path, filesystem=fs, columns=columns)
    def source():
        return pa.memory_map(path) if is_local(url) else pa.BufferReader(fs.cat_file(path))

    try:
        table = pa.ipc.open_stream(source()).read_all()
    except pa.ArrowInvalid:
        table = pa.ipc.open_file(source()).read_all()
    return table if columns is None else table.select(columns)


def _schema_and_rows(url: str) -> tuple[pa.Schema, int]:
    fs, path = url_to_fs(url)
    if path.endswith(".parquet"):
        meta = pq.ParquetFile(path, filesystem=fs).metadata
        return meta.schema.to_arrow_schema(), meta.num_rows
    table = _read_table(url)
    return table.schema, table.num_rows


def _dataset_entries(cfg: IngestConfig) -> list[list]:
    """[file, first row, rows] of each data file; the rows are read in the shard tasks."""
    out, start = [], 0
    for url in _dataset_files(cfg.hf_dataset, cfg.split):
        schema, rows = _schema_and_rows(url)
        missing = [c for c in (cfg.image_column, cfg.caption_column) if c not in schema.names]
        if missing:
            raise ValueError(f"{url}: no column {missing[0]!r} (has {', '.join(schema.names)}); name the "
                             f"columns with --image-column / --caption-column")
        out.append([url, start, rows])
        start += rows
    return out


# ----- one shard ------------------------------------------------------------------------------

def _read_file(url: str) -> bytes:
    """A file's bytes; one that is not there or not readable is a skip, while any other
    error (a storage outage) fails the shard, which a rerun then writes."""
    fs, path = url_to_fs(url)
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise BadSample("missing_file", f"{url} ({type(exc).__name__})") from None
    except PermissionError as exc:
        raise BadSample("unreadable_file", f"{url}: {exc}") from None


def _resolve(base: str, name: str) -> str:
    return name if "://" in name or name.startswith("/") else join(base, name)


def _caption(value) -> str:
    """The caption as the readers of the shards take it (wds.caption_of's reasons)."""
    if value is None:
        raise BadSample("missing_caption")
    if not isinstance(value, (str, bytes)):
        raise BadSample("caption_not_text", f"a {type(value).__name__}")
    return caption_of(RawSample("", {"txt": value.encode() if isinstance(value, str) else value}))


def _folder_samples(cfg: IngestConfig, entries: list) -> Iterator[tuple[str, Callable[[], tuple[bytes, str]]]]:
    """(source name, loader of (image bytes, caption)) per entry."""
    for name, caption in entries:
        def load(name=name, caption=caption):
            if not name:
                raise BadSample("missing_file", f"empty {cfg.file_column}")
            url = _resolve(cfg.images, name)
            data = _read_file(url)
            if cfg.captions is None:
                try:
                    caption = _read_file(url.rpartition(".")[0] + ".txt")
                except BadSample:
                    raise BadSample("missing_caption", f"no {name.rpartition('.')[0]}.txt beside it") from None
            return data, _caption(caption)
        yield name, load


def _dataset_samples(cfg: IngestConfig, entries: list, start: int, stop: int
                     ) -> Iterator[tuple[str, Callable[[], tuple[bytes, str]]]]:
    fs, path = url_to_fs(cfg.hf_dataset)
    base = cfg.hf_dataset.rstrip("/").rpartition("/")[0] if fs.isfile(path) else cfg.hf_dataset
    for url, first, rows in entries:
        lo, hi = max(start, first), min(stop, first + rows)
        if lo >= hi:
            continue
        table = _read_table(url, [cfg.image_column, cfg.caption_column]).slice(lo - first, hi - lo)
        images, captions = (table.column(c).to_pylist() for c in (cfg.image_column, cfg.caption_column))
        for row, (image, caption) in enumerate(zip(images, captions), lo):
            def load(image=image, caption=caption, row=row):
                if isinstance(image, dict):  # an Image feature: its bytes, else its path
                    data = image.get("bytes") or (image.get("path") and _read_file(_resolve(base, image["path"])))
                elif isinstance(image, str):
                    data = _read_file(_resolve(base, image))
                else:
                    data = image
                if not isinstance(data, bytes):
                    raise BadSample("missing_file", f"row {row}: no image bytes or path")
                return data, _caption(caption)
            path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
            yield path or f"row {row}", load


def _encode(data: bytes, cfg: IngestConfig) -> tuple[bytes, str, dict]:
    """(bytes, extension, sizes) of one image, decoded once to check it."""
    target = cfg.image_size or cfg.min_side
    img, (ow, oh) = open_image(data, cfg.min_side, cfg.max_pixels, target=target)
    if not cfg.image_size:
        fmt = Image.open(io.BytesIO(data)).format
        return data, _FORMAT_EXT[fmt], {"width": ow, "height": oh, "original_width": ow, "original_height": oh}
    if min(img.size) > cfg.image_size:
        img = resize_shorter_side(img, cfg.image_size)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=cfg.encode_quality)
    return buf.getvalue(), "jpg", {"width": img.width, "height": img.height, "original_width": ow,
                                    "original_height": oh}


def shard_url(output: str, shard: int) -> str:
    return join(output, f"{shard:05d}")


def write_shard(cfg: IngestConfig, shard: int, entries: list, start: int, stop: int) -> dict:
    """Writes shard `shard` (samples [start, stop) of the list) unless its stats file exists;
    returns its stats and whether it was written now."""
    base = shard_url(cfg.output, shard)
    if file_exists(base + "_stats.json"):
        return {"stats": read_json(base + "_stats.json"), "written": False}
    digits = len(str(max(cfg.samples_per_shard - 1, 1)))
    samples = _dataset_samples(cfg, entries, start, stop) if cfg.hf_dataset else _folder_samples(cfg, entries)
    records, status = [], Counter()

    def members() -> Iterator[tuple[str, int, io.BytesIO]]:
        for i, (source, load) in enumerate(samples):
            key = f"{shard:05d}{i:0{digits}d}"
            record = {"key": key, "url": source, "caption": None, "status": "success", "error_message": None,
                      "width": None, "height": None, "original_width": None, "original_height": None,
                      "sha256": None}
            try:
                raw, caption = load()
                data, ext, sizes = _encode(raw, cfg)
            except BadSample as exc:
                record.update(status=exc.reason, error_message=str(exc)[:300])
                status[exc.reason] += 1
                records.append(record)
                continue
            record.update(caption=caption, sha256=hashlib.sha256(data).hexdigest(), **sizes)
            status["success"] += 1
            records.append(record)
            meta = json.dumps(record, sort_keys=True).encode()
            for name, blob in ((f"{key}.{ext}", data), (f"{key}.json", meta), (f"{key}.txt", caption.encode())):
                yield name, len(blob), io.BytesIO(blob)

    with atomic_writer(base + ".tar") as fh:
        write_tar(fh, members())
    with atomic_writer(base + ".parquet") as fh:
        pq.write_table(pa.Table.from_pylist(records, schema=_RECORD_SCHEMA), fh)
    failed = sum(status.values()) - status["success"]
    not_read = sum(n for reason, n in status.items() if reason in _NOT_READ)
    stats = {"count": len(records), "successes": status["success"], "failed_to_download": not_read,
             "failed_to_resize": failed - not_read, "status_dict": dict(sorted(status.items()))}
    write_json_atomic(base + "_stats.json", stats)  # the shard's marker, last
    return {"stats": stats, "written": True}


_RECORD_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                            ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
                            ("height", pa.int64()), ("original_width", pa.int64()),
                            ("original_height", pa.int64()), ("sha256", pa.string())])


# ----- the job ----------------------------------------------------------------------------------

def _plan(cfg: IngestConfig) -> tuple[list[dict], str]:
    """The shard tasks' arguments and the fingerprint of the sample list and settings."""
    n = cfg.samples_per_shard
    settings = {k: v for k, v in output_settings(cfg).items() if k != "output"}
    if cfg.hf_dataset:
        entries = _dataset_entries(cfg)
        total = sum(rows for _, _, rows in entries)
        calls = [{"entries": [e for e in entries if e[1] < min(s + n, total) and e[1] + e[2] > s],
                  "start": s, "stop": min(s + n, total)} for s in range(0, total, n)]
        listed = entries
    else:
        listed = _folder_entries(cfg)
        calls = [{"entries": listed[s:s + n], "start": s, "stop": s + len(listed[s:s + n])}
                 for s in range(0, len(listed), n)]
    if not calls:
        raise ValueError(f"{cfg.images or cfg.hf_dataset}: no images found")
    blob = json.dumps({"settings": settings, "samples": listed}, sort_keys=True, default=str).encode()
    calls = [{**call, "shard": i} for i, call in enumerate(calls)]
    return calls, hashlib.sha256(blob).hexdigest()


def _check_or_start_job(cfg: IngestConfig, job: dict) -> None:
    url = join(cfg.output, STATE, "ingest.json")
    if file_exists(url):
        if read_json(url)["sha256"] != job["sha256"]:
            raise ValueError(f"{cfg.output} holds shards ingested from another input or with other settings; "
                             f"use another output folder or delete it")
    else:
        write_json_atomic(url, job)


def ingest(cfg: IngestConfig) -> IngestReport:
    t0 = time.monotonic()
    # Ray's workers may run in another directory.
    cfg = dataclasses.replace(cfg, **{k: os.path.abspath(v) for k in ("images", "captions", "hf_dataset", "output")
                                      if (v := getattr(cfg, k)) is not None and "://" not in v})
    calls, sha = _plan(cfg)
    _check_or_start_job(cfg, {"sha256": sha, "shards": len(calls), "samples": calls[-1]["stop"]})
    report = IngestReport(cfg.output, shards_total=len(calls), samples=calls[-1]["stop"])
    skipped: Counter = Counter()
    bar = tqdm(total=report.samples, unit="img", desc="ingest", disable=not cfg.progress)
    with ray_session(cfg.ray_address), bar:
        import ray  # 1.2-1.7 s; the CLI and the run config import this module for IngestConfig

        workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        for result in ray_tasks(write_shard, [{"cfg": cfg, **c} for c in calls], workers):
            stats = result["stats"]
            report.shards_written += result["written"]
            report.shards_already_done += not result["written"]
            report.samples_written += stats["count"] if result["written"] else 0
            report.successes += stats["successes"]
            skipped.update({k: v for k, v in stats["status_dict"].items() if k != "success"})
            bar.update(stats["count"])
            bar.set_postfix(ok=report.successes, skipped=sum(skipped.values()), refresh=False)
    report.skipped = dict(sorted(skipped.items()))
    report.seconds = time.monotonic() - t0
    return report

