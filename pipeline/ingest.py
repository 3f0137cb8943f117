"""`amused ingest`: a user's own captioned images in, img2dataset-style webdataset shards out.

Inputs (exactly one):
- `images`: a folder (local or any fsspec URL) of images, captioned by sidecar files
  (`photos/cat.jpg` + `photos/cat.txt`) or, with `captions`, by a CSV, JSON lines (or a
  JSON array) or Parquet table of `file,caption` rows (`file` relative to the folder;
  column names by flags);
- `hf_dataset`: a Hugging Face `datasets` dataset on disk: a `save_to_disk` folder (a
  DatasetDict's `split`), a folder of Parquet or Arrow files (a Hub snapshot, a datasets
  cache folder: the files whose names carry `split`, where any carries a split), or one
  file, with an image column (an `Image` feature's {bytes, path}, raw bytes, or a path)
  and a caption column. Read with pyarrow from the files `datasets` writes: importing
  `datasets` costs 3.5 s in every process, and its Parquet loader first copies the data
  into its cache. A shard task reads only its rows: the Parquet row groups that hold
  them, the Arrow record batches up to its last row.

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
the key `{i:05d}{j:0Dd}`. `_amused/ingest.json`, written before any shard, records the
settings and the fingerprints of the list and of its files' sizes and modification
times (S3: ETags): images, sidecars, the caption table, data files. A rerun writes only
the shards without a stats file and, shards having fixed tar metadata, the same bytes;
a rerun over a changed input or other settings is refused, and so is a folder with
shards but no `ingest.json` (download's layout is the same: its done shards would pass
for ingest's). Shards are Ray tasks (one CPU each), as the other data stages run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import time
from collections import Counter
from contextlib import contextmanager
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
    """One clear error for a source that names no input, two kinds, a caption table of no
    known kind or an empty path: raised where the source is written (flags or `source:`).
    Whether the inputs are there is `check_found`'s, asked only where ingest is to run."""
    if (images is None) == (hf_dataset is None):
        raise ValueError(f"{where}: give exactly one of images (a folder) or hf_dataset (a datasets folder)")
    if captions is not None and images is None:
        raise ValueError(f"{where}.captions: a caption table goes with images, not hf_dataset")
    if captions is not None and not captions.lower().endswith(TABLE_SUFFIXES):
        raise ValueError(f"{where}.captions: {captions!r} is not a {', '.join(TABLE_SUFFIXES)} file")
    for name, value in (("images", images), ("captions", captions), ("hf_dataset", hf_dataset)):
        if value is not None and not value.strip():
            raise ValueError(f"{where}.{name}: empty path")


def check_found(cfg: IngestConfig, where: str) -> None:
    """One clear error for a local input that is not there, before any work. Not part of
    parsing a config: once ingest is done, `amused status` and a resumed run must not need
    the source images (moved, or on another machine)."""
    for name, (found, noun) in _LOCAL_CHECKS.items():
        value = getattr(cfg, name)
        if value is not None and is_local(value) and not found(url_to_fs(value)[1]):
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
        check_inputs(self.images, self.captions, self.hf_dataset, "ingest")  # whether they are there: ingest()
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


# What says a file changed without reading it, beside its size: S3's ETag (from its
# content), else the modification time (a copy keeps it with `cp -p` or `rsync -a`).
_STAMP_KEYS = ("ETag", "etag", "mtime", "LastModified", "updated")


def _stamp(info: dict | None) -> list | None:
    if info is None:
        return None
    return [info.get("size"), next((info[k] for k in _STAMP_KEYS if info.get(k) is not None), None)]


def _folder_entries(cfg: IngestConfig) -> tuple[list[list], list]:
    """[name, caption or None] per sample: the folder's images in name order, captioned by
    their sidecar file (read in the shard task), or the caption table's rows in order; and
    the stamps of the files they read (each image and sidecar; the table and each image)."""
    fs, root = url_to_fs(cfg.images)
    root = root.rstrip("/")
    listing = fs.find(root, detail=True)  # one listing: the names, sizes and times
    if cfg.captions is None:
        names = sorted(_relative(root, p) for p in listing
                       if p.rpartition(".")[2].lower() in IMAGE_EXTS and "/." not in "/" + _relative(root, p))
        stamps = [[_stamp(listing.get(f"{root}/{n}")), _stamp(listing.get(f"{root}/{n.rpartition('.')[0]}.txt"))]
                  for n in names]
        return [[name, None] for name in names], stamps
    entries = [[str(f) if f is not None else "", c] for f, c in _table_rows(cfg)]
    table_fs, table = url_to_fs(cfg.captions)
    # A row naming a file outside the folder (an absolute path, a URL) has no stamp.
    return entries, [_stamp(table_fs.info(table)), *(_stamp(listing.get(f"{root}/{n}")) for n, _ in entries)]


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
        else:
            rows = _json_rows(cfg.captions, io.TextIOWrapper(fh, encoding="utf-8").read())
            names = sorted({k for r in rows for k in r})
            missing = [c for c in wanted if not any(c in r for r in rows)]
            if not missing:
                return [(r.get(cfg.file_column), r.get(cfg.caption_column)) for r in rows]
    raise ValueError(f"{cfg.captions}: no column {missing[0]!r} (has {', '.join(map(str, names)) or 'none'}); "
                     f"name the columns with --file-column / --caption-column")


def _json_rows(url: str, text: str) -> list[dict]:
    """The objects of JSON lines, or of one JSON array (what a `.json` file often holds)."""
    expected = f"{url}: expected JSON lines (one object per line) or a JSON array"
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{expected} ({exc})") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{expected}; line {number}: {exc.msg}") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{url}: row {bad + 1} is not a JSON object")
    return rows


# Split names that data file names carry, besides the one asked for (refused when only they are found).
_SPLITS = ("train", "test", "validation", "valid", "val", "dev", "eval")


def _names_split(relative: str, split: str) -> bool:
    """Whether a data file's path in the dataset folder names `split`, as the Hub's do
    (`data/train-00000-of-00002.parquet`, `train/0.parquet`, `train.parquet`) and the
    datasets cache's (`name-train.arrow`, `name-train-00000-of-00002.arrow`)."""
    base = relative.rpartition("/")[2]
    return (f"/{split}/" in f"/{relative}" or base.startswith(f"{split}-") or f"-{split}." in base
            or f"-{split}-" in base or base.rpartition(".")[0] == split)


def _dataset_files(url: str, split: str) -> list[str]:
    """The data files of a `datasets` dataset in row order: a save_to_disk folder's (a
    DatasetDict's `split`), one file, or a folder's Parquet / Arrow files: those naming
    `split` (a Hub snapshot, a datasets cache folder), or all where none names a split;
    never the cache's `cache-*.arrow` (the results of `map` and `filter`)."""
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
    found = sorted(r for p in fs.find(root) if p.endswith((".parquet", ".arrow"))
                   and "/." not in "/" + (r := _relative(root, p)) and not r.rpartition("/")[2].startswith("cache-"))
    if not found:
        raise ValueError(f"{url}: neither a save_to_disk folder nor a folder of .parquet / .arrow files")
    named = [r for r in found if _names_split(r, split)]
    if not named:
        others = sorted({s for r in found for s in _SPLITS if _names_split(r, s)})
        if others:
            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise ValueError(f"{url}: no data file names split {split!r}; found split(s) {', '.join(others)} "
                             f"({shown}); choose one with --split")
        named = found  # names without a split: the folder is one split
    return [_url(fs, f"{root}/{r}") for r in named]


@contextmanager
def _ipc(url: str) -> Iterator[tuple]:
    """(reader, its record batches in order, each read as it is taken) of an Arrow file: the
    stream format save_to_disk writes, or the file format; memory-mapped where local."""
    fs, path = url_to_fs(url)
    with pa.memory_map(path) if is_local(url) else fs.open(path, "rb") as src:
        stream = src.read(6) != b"ARROW1"  # the file format's magic
        src.seek(0)
        reader = pa.ipc.open_stream(src) if stream else pa.ipc.open_file(src)
        yield reader, iter(reader) if stream else (reader.get_batch(i) for i in range(reader.num_record_batches))


def _schema_and_rows(url: str) -> tuple[pa.Schema, int]:
    """A data file's schema and row count, from its metadata where the format has it: a
    Parquet footer, an Arrow file's footer and batch headers. The Arrow stream format (what
    save_to_disk writes) has no index, so counting its rows reads it through: without a
    copy where local (memory-mapped), streamed once where remote."""
    fs, path = url_to_fs(url)
    if path.endswith(".parquet"):
        with pq.ParquetFile(path, filesystem=fs) as pf:
            return pf.metadata.schema.to_arrow_schema(), pf.metadata.num_rows
    with _ipc(url) as (reader, batches):
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            return reader.schema, reader.count_rows()
        return reader.schema, sum(b.num_rows for b in batches)


def _read_rows(url: str, columns: list[str], lo: int, hi: int) -> pa.Table:
    """Rows [lo, hi) of a data file's `columns`, reading only what holds them: the Parquet
    row groups that overlap them, the Arrow record batches up to `hi`. A shard task of a
    large single-file dataset reads its own share, not the file."""
    fs, path = url_to_fs(url)
    if path.endswith(".parquet"):
        with pq.ParquetFile(path, filesystem=fs) as pf:
            starts = [0, *itertools.accumulate(pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups))]
            groups = [i for i in range(pf.num_row_groups) if starts[i] < hi and starts[i + 1] > lo]
            return pf.read_row_groups(groups, columns=columns).slice(lo - starts[groups[0]], hi - lo)
    batches, at = [], 0
    with _ipc(url) as (reader, stream):
        for batch in stream:
            end = at + batch.num_rows
            if end > lo:
                batches.append(batch.slice(max(lo - at, 0), min(hi, end) - max(lo, at)))
            if end >= hi:
                break  # before the next batch is read
            at = end
        return pa.Table.from_batches(batches, reader.schema).select(columns)


def _dataset_entries(cfg: IngestConfig) -> tuple[list[list], list]:
    """[file, first row, rows] of each data file (the rows are read in the shard tasks),
    and the files' stamps."""
    out, stamps, start = [], [], 0
    for url in _dataset_files(cfg.hf_dataset, cfg.split):
        schema, rows = _schema_and_rows(url)
        missing = [c for c in (cfg.image_column, cfg.caption_column) if c not in schema.names]
        if missing:
            raise ValueError(f"{url}: no column {missing[0]!r} (has {', '.join(schema.names)}); name the "
                             f"columns with --image-column / --caption-column")
        out.append([url, start, rows])
        fs, path = url_to_fs(url)
        stamps.append(_stamp(fs.info(path)))
        start += rows
    return out, stamps


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
        table = _read_rows(url, [cfg.image_column, cfg.caption_column], lo - first, hi - first)
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

def _sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _plan(cfg: IngestConfig) -> tuple[list[dict], dict]:
    """The shard tasks' arguments, and the job: the settings, the fingerprint of the sample
    list and that of its files' sizes and times (or ETags)."""
    n = cfg.samples_per_shard
    settings = json.loads(json.dumps({k: v for k, v in output_settings(cfg).items() if k != "output"}, default=str))
    if cfg.hf_dataset:
        listed, stamps = _dataset_entries(cfg)
        total = sum(rows for _, _, rows in listed)
        calls = [{"entries": [e for e in listed if e[1] < min(s + n, total) and e[1] + e[2] > s],
                  "start": s, "stop": min(s + n, total)} for s in range(0, total, n)]
    else:
        listed, stamps = _folder_entries(cfg)
        calls = [{"entries": listed[s:s + n], "start": s, "stop": s + len(listed[s:s + n])}
                 for s in range(0, len(listed), n)]
    if not calls:
        raise ValueError(f"{cfg.images or cfg.hf_dataset}: no images found")
    job = {"settings": settings, "samples_sha256": _sha256(listed), "files_sha256": _sha256(stamps),
           "shards": len(calls), "samples": calls[-1]["stop"]}
    return [{**call, "shard": i} for i, call in enumerate(calls)], job


# What a rerun compares with the job that began the folder, and what a difference means.
_JOB_INPUTS = (("samples_sha256", "another sample list (files or table rows added, removed, renamed or "
                                  "recaptioned)"),
               ("files_sha256", "changed input files (a size, modification time or S3 ETag differs; a copy "
                                "keeps its times with cp -p or rsync -a)"))


def _not_ingests(output: str) -> list[str]:
    """Shards (`*.tar`, `*_stats.json`) or state (`_amused/`) in a folder that ingest did
    not begin: download writes the same layout, and a shard with a stats file is done."""
    fs, path = url_to_fs(output)
    try:
        names = sorted(p.rstrip("/").rpartition("/")[2] for p in fs.ls(path, detail=False))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [n for n in names if n.endswith((".tar", "_stats.json")) or n == STATE]


def _check_or_start_job(cfg: IngestConfig, job: dict) -> None:
    """Begins the job in a folder without shards, or resumes the same job; refuses a folder
    of another job, or with shards or state that ingest did not write."""
    url = join(cfg.output, STATE, "ingest.json")
    if not file_exists(url):
        found = _not_ingests(cfg.output)
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise ValueError(f"{cfg.output} holds shards or state that ingest did not write ({shown}; "
                             f"`amused download` writes the same layout), and ingest would take them as done: "
                             f"use another output folder, or delete that one")
        write_json_atomic(url, job)
        return
    old = read_json(url)
    before, now = old.get("settings") or {}, job["settings"]
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted({*before, *now}) if before.get(k) != now.get(k)]
    why = [f"other settings ({'; '.join(changed)})"] if changed else []
    why += [what for key, what in _JOB_INPUTS if old.get(key) != job[key]]
    if why:
        raise ValueError(f"{cfg.output} holds shards ingested from another input or with other settings: "
                         f"{why[0]}; use another output folder, or delete that one to ingest anew")


def ingest(cfg: IngestConfig) -> IngestReport:
    t0 = time.monotonic()
    # Ray's workers may run in another directory.
    cfg = dataclasses.replace(cfg, **{k: os.path.abspath(v) for k in ("images", "captions", "hf_dataset", "output")
                                      if (v := getattr(cfg, k)) is not None and "://" not in v})
    check_found(cfg, "ingest")
    calls, job = _plan(cfg)
    _check_or_start_job(cfg, job)
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

