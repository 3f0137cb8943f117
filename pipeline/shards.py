"""The token dataset: Parquet shards (zstd), each carrying the dataset's spec, plus a
JSON manifest.

Layout of a dataset folder (any fsspec URL):
    00042.parquet                   one shard per input shard (00042.tar -> 00042.parquet)
    __meta__/manifest.json          format version, DatasetSpec, every complete shard (rows, bytes, sha256)
    __meta__/empty_prompt.safetensors   the text encoder's outputs for "" (guidance training)
    __meta__/stats/00042.json       the shard's completion marker: its record, its skipped samples,
                                    the format version and the DatasetSpec it was made with

The side files sit in `__meta__/` so that the folder itself reads as a Parquet dataset in
every common tool: pyarrow and pandas skip names starting with "_" or ".", Hugging Face
`datasets` skips only names starting with "." and folders starting with "__" (it tried to
read version 3's first names, `_manifest.json` and `_stats/*.json`, as Parquet, and failed), DuckDB and Ray Data read
`*.parquet` only. (polars reads every file under a folder: give it `folder/*.parquet`.)

Every shard's Parquet key-value metadata holds, under `amused.dataset`, a JSON object:
    {"format": "amused-token-dataset", "version": 3, "spec": DatasetSpec.to_json(),
     "columns": {"image_tokens": {"dtype": "<u2", "shape": [16, 16]}, ...}}
so that anyone with only pyarrow (or DuckDB's `parquet_kv_metadata`) can turn a tensor
column's values into arrays: `np.frombuffer(b"".join(values), dtype).reshape(-1, *shape)`.
Each tensor field also carries its dtype and shape in its own field metadata.

A shard counts only once its marker exists; the marker is written after the Parquet
file, and both go through a temporary name. A marker made with another spec, or another
format version (the bytes differ), is never counted as done: a rerun refuses the folder
instead of mixing. Tensors are fixed-size binary columns (little-endian, row-major), not
Arrow's `fixed_shape_tensor` extension type: measured with benchmarks/shard_format.py on
aMUSEd-256's columns, the extension type (stored as a Parquet list; dictionary encoding off,
its better setting) read 1.2-5.7x and wrote 4.3-5.0x slower in three runs, beyond the 10%
read cost we accept; `datasets` 5.2 refuses its float16 form, and DuckDB and pandas flatten
it anyway. Binary columns read back zero-copy with `numpy.frombuffer`. Nothing here ever
unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.numpy

from amused.plumbing.fsio import atomic_writer, read_json, write_json_atomic
from amused.plumbing.storage import folder_fingerprint, join, local_folder, resolve_subfolder, url_to_fs

FORMAT = "amused-token-dataset"
# 2: the spec records the encoders' device and dtype; markers carry the spec.
# 3: the spec in every shard's key-value metadata; side files under __meta__/; markers carry the version.
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # a version 1 spec reads with the encoder's device and dtype "" (not recorded)
KV_KEY = "amused.dataset"  # the Parquet key-value metadata entry holding the spec
META_DIR = "__meta__"
MANIFEST = f"{META_DIR}/manifest.json"
# The text encoder's embeddings of "" (hidden states and pooled, float16): the
# unconditional input that classifier-free-guidance training swaps in.
EMPTY_PROMPT = f"{META_DIR}/empty_prompt.safetensors"
STATS_DIR = f"{META_DIR}/stats"
# Where versions 1 and 2 kept the side files: read, never written, so that their datasets still
# train and a rerun into their folders sees their markers (and refuses to mix versions).
LEGACY_NAMES = {MANIFEST: "manifest.json", EMPTY_PROMPT: "empty_prompt.safetensors", STATS_DIR: "_stats"}
ROW_GROUP_ROWS = 512
SHARD_NAME = re.compile(r"^\d+$")


@dataclass(frozen=True)
class ModelIdentity:
    path: str
    sha256: str

    @classmethod
    def of(cls, url: str, subfolders: tuple[str, ...] = ()) -> "ModelIdentity":
        """A model folder's identity: its resolved path and the hash of its files."""
        resolved = resolve_subfolder(url, subfolders) if subfolders else url
        return cls(path=resolved, sha256=folder_fingerprint(local_folder(resolved)))


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that determines a dataset's contents besides its input shards."""

    resolution: int
    token_grid: tuple[int, int]
    codebook_size: int
    text_seq_len: int
    text_hidden_size: int
    text_pooled_dim: int
    image_tokenizer: ModelIdentity
    text_encoder: ModelIdentity
    crop: str = "center"
    views: int = 1
    seed: int = 0
    min_side: int = 32
    max_pixels: int = 64_000_000
    # The encoders' resolved device ("cpu", "cuda") and dtype ("fp32", "bf16"): bf16, and
    # TF32 convolutions on GPUs, change the tokens. "" where nothing was encoded (synthetic).
    encoder_device: str = ""
    encoder_dtype: str = ""
    # What a sample stores of its caption: "states", the text encoder's outputs (the
    # default: training never runs the text tower), or "ids", its CLIP token ids (~60x
    # fewer bytes; the training step runs the frozen text tower on them).
    text: str = "states"

    def __post_init__(self):
        if self.text not in TEXT_MODES:
            raise ValueError(f"text: {self.text!r} is not allowed; expected {' or '.join(TEXT_MODES)}")

    def tensor_columns(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        columns = {"image_tokens": (np.dtype("<u2"), tuple(self.token_grid))}
        if self.text == "ids":  # CLIP's vocabulary (49,408) fits uint16
            columns["text_ids"] = (np.dtype("<u2"), (self.text_seq_len,))
        else:
            columns["text_hidden_states"] = (np.dtype("<f2"), (self.text_seq_len, self.text_hidden_size))
            columns["text_pooled"] = (np.dtype("<f2"), (self.text_pooled_dim,))
        return columns

    def schema(self) -> pa.Schema:
        tensors = self.tensor_columns()
        fields = [
            pa.field("key", pa.string(), nullable=False),
            pa.field("content_id", pa.string(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
            pa.field("view", pa.int16(), nullable=False),
        ]
        for name, (dtype, shape) in tensors.items():
            meta = {"dtype": dtype.str, "shape": ",".join(map(str, shape))}
            nbytes = int(dtype.itemsize * np.prod(shape))
            fields.append(pa.field(name, pa.binary(nbytes), nullable=False, metadata=meta))
        fields += [pa.field(c, pa.int32(), nullable=False) for c in SIZE_COLUMNS]
        fields.append(pa.field("aesthetic_score", pa.float32(), nullable=True))
        header = {"format": FORMAT, "version": VERSION, "spec": self.to_json(),
                  "columns": {name: {"dtype": dtype.str, "shape": list(shape)} for name, (dtype, shape) in tensors.items()}}
        return pa.schema(fields, metadata={KV_KEY: json.dumps(header, sort_keys=True)})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def changes_to(self, other: "DatasetSpec") -> list[str]:
        """Each setting that differs, as "name: mine -> other's"; models compare by content
        hash (a model moved to another folder is the same model)."""
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, ModelIdentity):
                if mine.sha256 != theirs.sha256:
                    out.append(f"{f.name}: {mine.path} (sha256 {mine.sha256[:12]}) -> {theirs.path} "
                               f"(sha256 {theirs.sha256[:12]})")
            elif mine != theirs:
                out.append(f"{f.name}: {mine!r} -> {theirs!r}")
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "DatasetSpec":
        obj = dict(obj)
        obj["token_grid"] = tuple(obj["token_grid"])
        obj["image_tokenizer"] = ModelIdentity(**obj["image_tokenizer"])
        obj["text_encoder"] = ModelIdentity(**obj["text_encoder"])
        return cls(**obj)


SIZE_COLUMNS = ("orig_width", "orig_height", "crop_top", "crop_left")
TEXT_MODES = ("states", "ids")


@dataclass
class ShardRecord:
    name: str  # "00042.parquet"
    source: str  # the input shard it came from
    rows: int
    bytes: int
    sha256: str
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    spec: DatasetSpec
    shards: list[ShardRecord]
    version: int = VERSION  # the format its shards were written in

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for shard in self.shards:
            for reason, n in shard.skipped.items():
                total[reason] = total.get(reason, 0) + n
        return dict(sorted(total.items()))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": self.version,
            "spec": self.spec.to_json(),
            "rows": self.rows,
            "skipped": self.skipped(),
            "shards": [dataclasses.asdict(s) for s in sorted(self.shards, key=lambda s: s.name)],
        }

    @classmethod
    def from_json(cls, obj: dict) -> "Manifest":
        if obj.get("format") != FORMAT:
            raise ValueError(f"not a token dataset manifest (format={obj.get('format')!r})")
        if obj.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"token dataset version {obj.get('version')} is not supported (expected "
                             f"{' or '.join(map(str, READABLE_VERSIONS))})")
        return cls(DatasetSpec.from_json(obj["spec"]), [ShardRecord(**s) for s in obj["shards"]], obj["version"])


def shard_header(schema: pa.Schema) -> dict | None:
    """A shard's key-value metadata entry (format, version, spec, tensor columns); None before version 3."""
    raw = (schema.metadata or {}).get(KV_KEY.encode())
    return None if raw is None else json.loads(raw)


def shard_name(source: str) -> str:
    """`.../00042.tar` -> `00042.parquet`; input shards must be named by integers."""
    stem = source.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    if not SHARD_NAME.match(stem):
        raise ValueError(f"input shard {source!r}: names must be zero-padded integers like 00042.tar")
    return f"{stem}.parquet"


def build_table(spec: DatasetSpec, columns: dict) -> pa.Table:
    """A shard table from numpy arrays (tensors) and lists (scalars), in schema order."""
    schema = spec.schema()
    tensors = spec.tensor_columns()
    n = len(columns["key"])
    arrays = []
    for f in schema:
        value = columns[f.name]
        if f.name in tensors:
            dtype, shape = tensors[f.name]
            data = np.ascontiguousarray(value, dtype=dtype)
            if data.shape != (n, *shape):
                raise ValueError(f"column {f.name}: shape {data.shape}, expected {(n, *shape)}")
            arrays.append(pa.FixedSizeBinaryArray.from_buffers(f.type, n, [None, pa.py_buffer(data)]))
        else:
            arrays.append(pa.array(value, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_shard(dataset_url: str, record_source: str, table: pa.Table) -> ShardRecord:
    name = shard_name(record_source)
    with atomic_writer(join(dataset_url, name)) as fh:
        pq.write_table(
            table, fh, compression="zstd", row_group_size=ROW_GROUP_ROWS,
            use_dictionary=["caption", "content_id"], write_statistics=list(SIZE_COLUMNS),
        )
    return ShardRecord(name=name, source=record_source, rows=table.num_rows, bytes=fh.size,
                       sha256=fh.sha256.hexdigest())


def marker_url(dataset_url: str, name: str) -> str:
    return join(dataset_url, STATS_DIR, name.replace(".parquet", ".json"))


def write_marker(dataset_url: str, record: ShardRecord, skipped_samples: list[dict], spec: DatasetSpec) -> None:
    """The shard's completion marker, carrying the format version and spec the shard was made with."""
    write_json_atomic(
        marker_url(dataset_url, record.name),
        {"record": dataclasses.asdict(record), "skipped_samples": skipped_samples,
         "version": VERSION, "spec": spec.to_json()},
    )


@dataclass
class Marker:
    record: ShardRecord
    spec: DatasetSpec | None  # None: written without one (synthetic datasets, version 1)
    version: int  # the format version: shards of different versions differ in bytes
    path: str  # relative to the dataset folder, for messages

    def changes_to(self, spec: DatasetSpec, version: int = VERSION) -> list[str]:
        """How `spec` and format `version` differ from what this shard was made with; unknown counts
        as a change."""
        out = [] if self.version == version else [f"format version: {self.version} -> {version}"]
        if self.spec is None:
            return [*out, "settings: not recorded in the marker -> this dataset's"]
        return out + self.spec.changes_to(spec)


MARKER_BATCH = 1000


def read_markers(dataset_url: str) -> dict[str, Marker]:
    """Every completion marker, by shard name (those of versions 1 and 2 where the folder has no others)."""
    fs, root = url_to_fs(dataset_url)
    stats_dir = next((d for d in (STATS_DIR, LEGACY_NAMES[STATS_DIR]) if fs.exists(f"{root.rstrip('/')}/{d}")), None)
    if stats_dir is None:
        return {}
    stats = f"{root.rstrip('/')}/{stats_dir}"
    out = {}
    specs: dict[str, DatasetSpec] = {}  # one object per distinct spec, not one per shard
    paths = sorted(fs.glob(f"{stats}/*.json"))
    # Batched calls: on object storage fsspec fetches a batch's markers concurrently, not one GET at a
    # time; a batch at a time, since a marker also lists its skipped samples, which are not kept.
    for start in range(0, len(paths), MARKER_BATCH):
        batch = paths[start : start + MARKER_BATCH]
        contents = fs.cat(batch)
        for path in batch:
            obj = json.loads(contents[path])
            record = ShardRecord(**obj["record"])
            spec = None
            if obj.get("spec"):
                key = json.dumps(obj["spec"], sort_keys=True)
                spec = specs.get(key) or specs.setdefault(key, DatasetSpec.from_json(obj["spec"]))
            # Version 1 markers carried no spec, version 2 ones no version.
            version = obj.get("version", 2 if spec else 1)
            out[record.name] = Marker(record, spec, version, f"{stats_dir}/{path.rsplit('/', 1)[-1]}")
    return out


def completed_shards(dataset_url: str, spec: DatasetSpec) -> dict[str, ShardRecord]:
    """Records of every shard whose completion marker exists, by shard name; raises
    ValueError naming the shard and the settings when a marker was made with another spec
    or format version."""
    done = {}
    for name, marker in read_markers(dataset_url).items():
        changes = marker.changes_to(spec)
        if changes:
            raise ValueError(f"{dataset_url}: shard {name} was made with other settings (its marker -> this "
                             f"run): {'; '.join(changes)}. Refusing to mix them in one dataset; use another "
                             f"output folder, or delete {name} and its marker {marker.path}")
        done[name] = marker.record
    return done


def side_file(dataset_url: str, name: str) -> str | None:
    """URL of side file `name` (MANIFEST, EMPTY_PROMPT), or of its version 1-2 name where only that
    exists (their datasets stay readable); None if neither does."""
    fs, root = url_to_fs(dataset_url)
    for candidate in (name, LEGACY_NAMES[name]):
        if fs.exists(f"{root.rstrip('/')}/{candidate}"):
            return join(dataset_url, candidate)
    return None


def read_manifest(dataset_url: str) -> Manifest:
    url = side_file(dataset_url, MANIFEST)
    if url is None:
        raise FileNotFoundError(f"{dataset_url}: no token dataset manifest ({MANIFEST})")
    return Manifest.from_json(read_json(url))


def write_manifest(dataset_url: str, manifest: Manifest) -> None:
    write_json_atomic(join(dataset_url, MANIFEST), manifest.to_json())


def write_empty_prompt(dataset_url: str, hidden_states: np.ndarray, pooled: np.ndarray) -> None:
    data = safetensors.numpy.save({"hidden_states": np.ascontiguousarray(hidden_states, dtype="<f2"),
                 "pooled": np.ascontiguousarray(pooled, dtype="<f2")})
    with atomic_writer(join(dataset_url, EMPTY_PROMPT)) as fh:
        fh.write(data)


def read_empty_prompt(dataset_url: str) -> dict[str, np.ndarray] | None:
    url = side_file(dataset_url, EMPTY_PROMPT)
    if url is None:
        return None
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as fh:
        return safetensors.numpy.load(fh.read())


def tensor_view(column: pa.Array | pa.ChunkedArray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """(N, *shape) numpy view of a fixed-size binary column; zero-copy for one chunk."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.null_count:
        raise ValueError("tensor column has nulls")
    width = column.type.byte_width
    data = column.buffers()[1]
    flat = np.frombuffer(data, dtype=np.uint8, count=(column.offset + len(column)) * width)
    return flat[column.offset * width :].view(dtype).reshape(len(column), *shape)


class TokenDataset:
    """Reads a token dataset through its manifest."""

    def __init__(self, url: str):
        self.url = url
        self.manifest = read_manifest(url)
        self.spec = self.manifest.spec
        self.shards = sorted(self.manifest.shards, key=lambda s: s.name)

    @property
    def num_rows(self) -> int:
        return self.manifest.rows

    def _open(self, name: str) -> pq.ParquetFile:
        fs, path = url_to_fs(join(self.url, name))
        return pq.ParquetFile(fs.open(path, "rb"))

    def decode(self, batch: pa.RecordBatch | pa.Table) -> dict[str, np.ndarray | list]:
        """Columns as numpy: tensors reshaped without copying, scalars as arrays or lists."""
        tensors = self.spec.tensor_columns()
        out = {}
        for name in batch.schema.names:
            col = batch.column(name)
            if name in tensors:
                out[name] = tensor_view(col, *tensors[name])
            elif pa.types.is_string(col.type):
                out[name] = col.to_pylist()
            else:
                out[name] = col.to_numpy(zero_copy_only=False)
        return out

    def iter_batches(
        self, batch_size: int = 256, columns: list[str] | None = None, shards: list[str] | None = None
    ) -> Iterator[dict[str, np.ndarray | list]]:
        for name in shards or [s.name for s in self.shards]:
            with self._open(name) as pf:
                for batch in pf.iter_batches(batch_size=batch_size, columns=columns, use_threads=False):
                    yield self.decode(batch)

    def read_shard(self, name: str, columns: list[str] | None = None) -> pa.Table:
        with self._open(name) as pf:
            return pf.read(columns=columns)
