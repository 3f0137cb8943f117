"""`amused pretokenize`: webdataset image shards in, token dataset out, on Ray Data.

    input shards -> read (tar -> chunks of compressed bytes)      CPU tasks
                 -> decode + crop (bytes -> uint8 crops)           CPU tasks
                 -> encode (VQ-GAN ids, CLIP states or token ids)   actor pool, GPU or CPU
                 -> write: one call per shard to the NodeWriter      one actor per node
                    where its encoded chunks are: Parquet, marker

The driver sees block references, where each chunk is (the writer next to the block reads
its shard, chunk index and error) and each write's small record (rows, sha256, skips by reason,
the node that wrote it); encoded data never reaches it. A shard whose chunks or write were
lost with a node is rerun in another pass, up to ROUNDS.

A chunk is up to `batch_size` consecutive samples of one shard and is the encoders'
batch, so what the models compute for a sample never depends on which other shards
were in flight: an interrupted run resumes to the same bytes as an uninterrupted one.
Only compressed bytes and R x R crops cross between stages, never full decoded images.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal, get_args

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from amused.pipeline import shards as fmt
from amused.pipeline.images import decode_views
from amused.pipeline.wds import (
    IMAGE_EXTS,
    BadSample,
    RawSample,
    ShardFormatError,
    aesthetic_of,
    caption_of,
    metadata_of,
    original_size_of,
    shard_samples,
)
from amused.plumbing.config import opt
from amused.plumbing.fsio import list_files
from amused.plumbing.raysession import ray_session
from amused.plumbing.storage import VQGAN_SUBFOLDERS, url_to_fs

# Literal types: the CLI's choices and a YAML config's checks (plumbing.config) come from these.
Crop = Literal["center", "random"]
Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "fp32", "bf16"]
CROPS, DEVICES, DTYPES = get_args(Crop), get_args(Device), get_args(Dtype)


@dataclass
class PretokenizeConfig:
    input: str = opt(help="folder or glob of webdataset shards named NNNNN.tar (local or s3://)")
    output: str = opt(help="token dataset folder (local or s3://)")
    vqgan: str = opt(help="VQModel folder, or a diffusers pipeline folder with vqvae/")
    text_encoder: str = opt(help="folder with text_encoder/ + tokenizer/, or one CLIP text folder")
    resolution: int = opt(256, "square crop size in pixels: a multiple of 8 and of the VQ-GAN's pixels per token")
    crop: Crop = opt("center", "how each image becomes a square: its centre, or random crops (--views)")
    views: int = opt(1, "random-crop views stored per image (needs --crop random)")
    seed: int = opt(0, "seed of the random crops")
    min_side: int = opt(32, "skip images whose shorter side is below this")
    max_pixels: int = opt(64_000_000, "skip images whose header declares more pixels (decompression bombs)")
    batch_size: int = opt(64, "images per chunk: the encoder batch, before views")
    encoders: int | None = opt(None, "encoder actors (default: one per GPU, else 1)", output=False)
    device: Device = opt("auto", "encoder device (auto: cuda when the Ray cluster has GPUs)", output=False)
    dtype: Dtype = opt("auto", "encoder precision (auto: bf16 on GPU, fp32 on CPU); no fp16: the aMUSEd VQ-GAN "
                               "overflows to NaN in it")
    text: Literal[fmt.TEXT_MODES] = opt("states", "what a sample stores of its caption: states (the text encoder's outputs, ~118 KB "
                              "at 256 px) or ids (its 77 CLIP token ids, 154 B; training runs the frozen tower)")
    encoder_cpus: float = opt(1.0, "CPUs reserved by each CPU encoder actor", output=False)
    encoder_threads: int | None = opt(None, "torch threads per CPU encoder (default: cores / encoders)", output=False)
    # Out of the dataset's identity: on a CPU the encoders write the same bytes either way (a
    # chunk is one batch whatever runs beside it, on a thread count fixed by the machine); on a
    # GPU it turns cuDNN's autotuning off, whose choice may differ between any two runs anyway.
    deterministic: bool = opt(False, "deterministic kernels in the encoders (on a GPU: no cuDNN autotuning)",
                              output=False)
    decode_cpus: float = opt(0.5, "CPUs reserved by each decode task", output=False)
    ray_address: str | None = opt(None, "Ray cluster address (default: start a local Ray)", output=False)
    progress: bool = opt(True, "show a progress bar", output=False)

    def __post_init__(self):
        # Checked on construction, so that flags, a run config and Python callers all refuse
        # the same values before any work. The exact resolution rule (a multiple of the
        # VQ-GAN's pixels per token: 16 for aMUSEd's, 8 or 2 for the small presets) needs
        # the model folder; the job checks it on loading the model, before reading a shard.
        # Without the model, a multiple of 8 is what every VQ-GAN used here but the 2x test
        # preset needs, and it keeps the meaning configs have had.
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name}: {getattr(self, name)!r} is not allowed; expected {allowed}")

        if self.resolution <= 0 or self.resolution % 8:
            raise bad("resolution", "a positive multiple of 8 (and of the VQ-GAN's pixels per token)")
        if self.crop not in CROPS:
            raise bad("crop", " or ".join(CROPS))
        if self.views < 1:
            raise bad("views", "an integer >= 1")
        if self.views > 1 and self.crop != "random":
            raise ValueError(f"views: {self.views} needs crop 'random'; centre crops of one image are identical")
        if self.seed < 0:
            raise bad("seed", "an integer >= 0")
        if self.batch_size < 1:
            raise bad("batch_size", "an integer >= 1")
        if self.min_side < 1:
            raise bad("min_side", "an integer >= 1")
        if self.max_pixels < self.min_side ** 2:
            raise bad("max_pixels", f"at least min_side**2 = {self.min_side ** 2}")
        if self.encoders is not None and self.encoders < 1:
            raise bad("encoders", "an integer >= 1, or unset")
        if self.device not in DEVICES:
            raise bad("device", " or ".join(DEVICES))
        if self.dtype not in DTYPES:
            raise bad("dtype", " or ".join(DTYPES) + " (fp16: the aMUSEd VQ-GAN overflows to NaN in float16)")
        if self.text not in fmt.TEXT_MODES:
            raise bad("text", " or ".join(fmt.TEXT_MODES))
        if not self.encoder_cpus > 0:
            raise bad("encoder_cpus", "a number > 0")
        if self.encoder_threads is not None and self.encoder_threads < 1:
            raise bad("encoder_threads", "an integer >= 1, or unset")
        if not self.decode_cpus > 0:
            raise bad("decode_cpus", "a number > 0")


@dataclass
class PretokenizeReport:
    output: str
    shards_total: int = 0
    shards_already_done: int = 0
    shards_written: int = 0
    failed_shards: dict[str, str] = field(default_factory=dict)
    rows_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # The driver's own cost: the bytes it received (what ray.get returned to it, and Ray Data's
    # per-block metadata) and its CPU seconds, from the first block to the last write.
    driver_bytes: int = 0
    driver_cpu_seconds: float = 0.0
    writer_nodes: dict[str, str] = field(default_factory=dict)  # shard name -> Ray node id that wrote it

    @property
    def ok(self) -> bool:
        return not self.failed_shards

    def summary(self) -> str:
        rate = self.rows_written / self.seconds if self.seconds else 0.0
        lines = [
            f"pretokenize -> {self.output}",
            f"  shards: {self.shards_total} total, {self.shards_already_done} already done, "
            f"{self.shards_written} written, {len(self.failed_shards)} failed",
            f"  rows written: {self.rows_written} in {self.seconds:.1f}s ({rate:.1f} rows/s)",
        ]
        if self.rows_written:
            nodes = sorted(set(self.writer_nodes.values()))
            lines += [
                f"  driver: received {self.driver_bytes / self.rows_written:.0f} bytes/sample, "
                f"{self.driver_cpu_seconds / self.rows_written * 1e3:.2f} CPU s per 1,000 samples",
                f"  shards written on {len(nodes)} node(s): " + ", ".join(
                    f"{n[:8]} {sum(v == n for v in self.writer_nodes.values())}" for n in nodes),
            ]
        if self.skipped:
            lines.append("  skipped samples by reason:")
            lines += [f"    {reason:24s} {n}" for reason, n in sorted(self.skipped.items())]
        for name, error in sorted(self.failed_shards.items()):
            lines.append(f"  FAILED {name}: {error}")
        return "\n".join(lines)


def list_input_shards(url: str) -> list[str]:
    """Input tar URLs in name order: a folder of *.tar, or a glob.

    In img2dataset's output a tar is complete only once its `NNNNN_stats.json` exists
    (it writes the tar under its final name): there, tars without one are left out.
    """
    tars = list_files(url, ".tar")
    stats = {u[: -len("_stats.json")] for u in list_files(url, "_stats.json", required=False)}
    if stats:
        tars = [t for t in tars if t[: -len(".tar")] in stats]
    return tars


# ----- stage 1: read a tar into chunks of raw member bytes ---------------------------------

_MEMBERS = ("image", "txt", "json")


def read_chunks(row: dict, batch_size: int) -> Iterator[dict]:
    """One input shard -> rows, each a chunk of up to `batch_size` samples as raw bytes.

    The last row has `last` set; a malformed or damaged tar, or one holding another number
    of samples than img2dataset's stats file records, ends in a row carrying its error.
    """
    source, pending, chunk = row["source"], [], 0
    try:
        for sample in shard_samples(source):
            pending.append(sample)
            if len(pending) == batch_size:
                yield _pack(row, chunk, pending, last=False)
                chunk, pending = chunk + 1, []
    except ShardFormatError as exc:
        yield _pack(row, chunk, [], last=True, error=str(exc))
        return
    yield _pack(row, chunk, pending, last=True)


def _pack(row: dict, chunk: int, samples: list[RawSample], last: bool, error: str = "") -> dict:
    index, payload = [], bytearray()
    for sample in samples:
        entry: dict = {"key": sample.key, "members": sorted(sample.members)}
        image = sample.image
        parts = {"image": image[1] if image else None, "txt": sample.members.get("txt"),
                 "json": sample.members.get("json")}
        for name, data in parts.items():
            if data is not None:
                entry[name] = [len(payload), len(data)]
                payload += data
        index.append(entry)
    return {"shard": row["shard"], "source": row["source"], "chunk": chunk, "last": last, "error": error,
            "index": json.dumps(index), "payload": bytes(payload)}


def _unpack(row: dict) -> list[tuple[RawSample, list[str]]]:
    """(sample with its image, txt and json members, the extensions of every member it had)."""
    payload = row["payload"]
    samples = []
    for entry in json.loads(row["index"]):
        sample = RawSample(entry["key"])
        for name in _MEMBERS:
            if name in entry:
                start, length = entry[name]
                sample.members[name] = payload[start : start + length]
        samples.append((sample, entry["members"]))
    return samples


# ----- stage 2: decode and crop --------------------------------------------------------------

def decode_chunk(row: dict, resolution: int, crop: str, views: int, seed: int, min_side: int,
                 max_pixels: int) -> dict:
    items, skipped, crops = [], [], []
    stem = fmt.shard_name(row["source"]).split(".")[0]
    for sample, seen in _unpack(row):
        key = f"{stem}/{sample.key}"
        try:
            image = sample.members.get("image")
            if image is None:
                names = ", ".join(f"{sample.key}.{ext}" for ext in seen) or "none"
                raise BadSample("missing_image", f"members seen: {names}; images are read from "
                                                 f"{', '.join(IMAGE_EXTS)}")
            caption = caption_of(sample)
            meta = metadata_of(sample)
            aesthetic = aesthetic_of(meta)
            recorded = original_size_of(meta)
            orig, offsets, pixels = decode_views(image, resolution, crop, views, seed, key, min_side, max_pixels)
        except BadSample as exc:
            skipped.append({"key": sample.key, "reason": exc.reason, "detail": exc.detail[:300]})
            continue
        orig = _turned_like(recorded, orig) if recorded else orig
        content_id = str(meta.get("sample_key") or hashlib.sha256(image).hexdigest()[:32])
        for view, (top, left) in enumerate(offsets):
            items.append({"key": f"{key}/{view}/{content_id}", "content_id": content_id, "caption": caption,
                          "view": view, "orig_width": orig[0], "orig_height": orig[1], "crop_top": top,
                          "crop_left": left, "aesthetic_score": aesthetic})
        crops.append(pixels)
    pixels = np.concatenate(crops) if crops else np.zeros((0, resolution, resolution, 3), np.uint8)
    return {**_passthrough(row), "items": json.dumps(items), "skipped": json.dumps(skipped),
            "pixels": pixels.tobytes()}


def _turned_like(recorded: tuple[int, int], decoded: tuple[int, int]) -> tuple[int, int]:
    """img2dataset's pre-resize size, turned like the decoded image.

    img2dataset ignores EXIF orientation, so its width and height are swapped for a
    rotated photo whose orientation this pipeline applied.
    """
    w, h = recorded
    if w != h and decoded[0] != decoded[1] and (w > h) != (decoded[0] > decoded[1]):
        return h, w
    return recorded


def _passthrough(row: dict) -> dict:
    return {k: row[k] for k in ("shard", "source", "chunk", "last", "error")}


# ----- stage 3: encode on an actor pool -------------------------------------------------------

class ChunkEncoder:
    """Loads the VQ-GAN and CLIP (text "ids": its tokenizer alone) once per actor and encodes
    one chunk per call.

    On a GPU Ray runs `GPU_CALLS` calls of an actor at once (`_encoded`), and the models run
    one chunk at a time (`self.models`): while one chunk is on the GPU the other's CPU work
    goes on (Ray handing it over, unpacking it, copying its pixels into pinned memory, and
    building the encoded rows of the one before), so the GPU does not wait for it. What
    the models compute for a chunk does not depend on the other: the bytes are the same."""

    def __init__(self, vqgan: str, text_encoder: str, resolution: int, device: str, dtype: str,
                 threads: int | None, text: str = "states", deterministic: bool = False):
        # torch and diffusers (~9 s) load in the encoder actors and the driver only: Ray's read and
        # decode tasks import this module too.
        import torch

        from amused.plumbing.determinism import set_deterministic
        from amused.tokenizer.image import ImageTokenizer
        from amused.tokenizer.text import TextEncoder, load_tokenizer, token_ids

        if deterministic:  # for the actor's life: nothing else runs in its process
            set_deterministic(threads)
        elif threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.resolution = resolution
        self.image = ImageTokenizer.from_pretrained(vqgan, device=device, dtype=dtype)
        states = text == "states"
        self.text = TextEncoder.from_pretrained(text_encoder, device=device, dtype=dtype) if states else None
        self.token_ids = None if states else functools.partial(token_ids, load_tokenizer(text_encoder))
        # Held while the models (and the tokenizer, which is not safe to share between threads) run.
        self.models = threading.Lock()
        self.pin = self.image.device.type == "cuda"

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.encode(row) for row in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=_encoded_schema(rows[0]) if rows else None)

    def encode(self, row: dict) -> dict:
        items, skipped = json.loads(row["items"]), json.loads(row["skipped"])
        r = self.resolution
        pixels = np.frombuffer(row["pixels"], np.uint8).reshape(-1, r, r, 3)
        if self.pin and len(pixels):
            # Outside the lock: a pinned copy goes to the GPU at full speed, without staging.
            pinned = self.torch.empty(pixels.shape, dtype=self.torch.uint8, pin_memory=True)
            pinned.numpy()[...] = pixels
            pixels = pinned
        captions = sorted({item["caption"] for item in items})
        with self.models:
            tokens, finite = self.image.encode_with_mask(pixels)
            text, text_ok = self.encode_text(captions)
        where = {c: i for i, c in enumerate(captions)}
        rows = np.array([where[item["caption"]] for item in items], dtype=np.int64)
        keep = []
        for i, item in enumerate(items):
            reason = None if finite[i] else "non_finite_latents"
            reason = reason or (None if text_ok[rows[i]] else "non_finite_text")
            if reason:
                skipped.append({"key": item["key"], "reason": reason, "detail": ""})
            else:
                keep.append(i)
        keep_idx = np.asarray(keep, dtype=np.int64)
        return {
            **_passthrough(row),
            "items": json.dumps([items[i] for i in keep]),
            "skipped": json.dumps(skipped),
            "image_tokens": tokens[keep_idx].astype("<u2").tobytes(),
            **{name: values[rows[keep_idx]].tobytes() for name, values in text.items()},
        }

    def encode_text(self, captions: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The text tensor columns of each caption, by column name, and which captions gave finite values."""
        if self.text is None:  # text "ids": the tokenizer alone; ids are finite by construction
            return {"text_ids": self.token_ids(captions).numpy().astype("<u2")}, np.ones(len(captions), bool)
        emb = self.text.encode(captions)
        hidden = emb.hidden_states.float().cpu().numpy().astype("<f2")
        pooled = emb.pooled.float().cpu().numpy().astype("<f2")
        finite = np.isfinite(hidden).all(axis=(1, 2)) & np.isfinite(pooled).all(axis=1)
        return {"text_hidden_states": hidden, "text_pooled": pooled}, finite


_PASS_FIELDS = [("shard", pa.int64()), ("source", pa.string()), ("chunk", pa.int64()), ("last", pa.bool_()),
                ("error", pa.string())]


def _encoded_schema(row: dict) -> pa.Schema:
    """An encoded chunk's: what it passes through, and its tensor columns (the spec's, by name) as bytes."""
    fields = _PASS_FIELDS + [("items", pa.string()), ("skipped", pa.string())]
    known = {name for name, _ in fields}
    return pa.schema(fields + [(name, pa.large_binary()) for name in row if name not in known])


# ----- stage 4: write each shard where its chunks are -----------------------------------------

_LOCATOR = ("source", "chunk", "last", "error")


def locate_chunks(block: pa.Table, start: int, end: int | None) -> list[tuple]:
    """(source, chunk, last, error, row) of each encoded chunk in rows [start, end) of a block.

    Run by the NodeWriter next to the block: the driver learns where each chunk is, never its data.
    """
    end = block.num_rows if end is None else end
    columns = block.slice(start, end - start).select(list(_LOCATOR)).to_pydict()
    return [(*values, start + i) for i, values in enumerate(zip(*(columns[c] for c in _LOCATOR)))]


def write_encoded_shard(output: str, spec: fmt.DatasetSpec, source: str, rows: list[tuple[int, int]],
                        *blocks: pa.Table) -> dict:
    """Writes one shard from its encoded chunks, chunk i being row `rows[i][1]` of block
    `rows[i][0]`: the Parquet file, then its marker. Run by the NodeWriter on the node holding
    most of the blocks' bytes; it returns only the small record the driver keeps, with the node
    that wrote it."""
    import ray  # see _encoder_plan

    tensors = spec.tensor_columns()
    chunks = [{name: blocks[b][name][r] for name in ("items", "skipped", *tensors)} for b, r in rows]
    items = [item for c in chunks for item in json.loads(c["items"].as_py())]
    skipped = [s for c in chunks for s in json.loads(c["skipped"].as_py())]
    columns = {name: [item[name] for item in items] for name in
               ("key", "content_id", "caption", "view", *fmt.SIZE_COLUMNS, "aesthetic_score")}
    for name, (dtype, shape) in tensors.items():
        data = b"".join(c[name].as_buffer() for c in chunks)
        columns[name] = np.frombuffer(data, dtype).reshape(-1, *shape)
    record = fmt.write_shard(output, source, fmt.build_table(spec, columns))
    for s in skipped:
        record.skipped[s["reason"]] = record.skipped.get(s["reason"], 0) + 1
    record.skipped = dict(sorted(record.skipped.items()))
    fmt.write_marker(output, record, skipped, spec)
    return {"record": dataclasses.asdict(record), "node": ray.get_runtime_context().get_node_id()}


class NodeWriter:
    """Locates and writes encoded chunks on one node, in one long-lived process per node and
    round. Zero-CPU tasks did the same but each ran in whatever worker was free: with the CPUs
    busy, Ray started a new worker for it, and its idle-worker reaper (1 s past the soft
    limit of one worker per CPU) killed it soon after, so most locates and writes paid Ray's
    and pyarrow's start-up again (measured: ~6 ms of CPU per sample, +40% for the job)."""

    def locate(self, block: pa.Table, start: int, end: int | None) -> list[tuple]:
        return locate_chunks(block, start, end)

    def write(self, output: str, spec: fmt.DatasetSpec, source: str, rows: list[tuple[int, int]],
              *blocks: pa.Table) -> dict:
        return write_encoded_shard(output, spec, source, rows, *blocks)


# A writer reserves no CPU: it is pinned to the node holding its blocks, and a node whose CPUs
# the encoder actors hold would otherwise never run it (the job would wait forever). How much
# is written at once is bounded by WRITE_MEMORY_SHARE instead; WRITER_THREADS writes overlap
# in a writer (Parquet encoding and compression release the GIL).
WRITER_THREADS = 4
ROUNDS = 3  # passes over the shards a node or worker failure left unwritten, before naming them failed
# Encoded bytes of the shards being written at once, as a share of the cluster's object store:
# their blocks stay pinned until written.
WRITE_MEMORY_SHARE = 0.25


@dataclass
class _Shard:
    chunks: dict[int, tuple] = field(default_factory=dict)  # chunk -> (block ref, row, bytes)
    last: int | None = None
    error: str = ""

    def complete(self) -> bool:
        return self.last is not None and len(self.chunks) == self.last + 1


class _Round:
    """One pass of the pipeline over some input shards, as the driver sees it: it learns where
    each encoded chunk is (block and row), submits a shard's write once all its chunks are
    known, and keeps the writes' records; at most `budget` encoded bytes are being written at once."""

    def __init__(self, output: str, spec: fmt.DatasetSpec, report: PretokenizeReport, bar: tqdm, budget: int):
        import ray  # see _encoder_plan

        self.ray, self.output, self.spec, self.report, self.bar, self.budget = ray, output, spec, report, bar, budget
        self.writer_class = ray.remote(num_cpus=0, max_concurrency=WRITER_THREADS)(NodeWriter)
        self.writers: dict[str, object] = {}  # node id -> its NodeWriter, for this round
        self.shards: dict[str, _Shard] = {}
        self.locating: dict = {}  # locate task -> (block ref, block bytes)
        self.queued: list[str] = []  # sources whose chunks are all located, waiting for the budget
        self.writing: dict = {}  # write task -> (source, bytes)
        self.in_flight = 0
        self.written: set[str] = set()
        self.lost: dict[str, str] = {}  # source -> what was lost, where known

    def run(self, bundles) -> None:
        for bundle in bundles:
            # What Ray Data hands the driver per block: its reference, metadata and schema.
            self.report.driver_bytes += len(pickle.dumps((bundle.schema, [e.metadata for e in bundle.blocks])))
            for entry, piece in zip(bundle.blocks, bundle.slices):
                span = (piece.start_offset, piece.end_offset) if piece else (0, None)
                locate = self._writer([entry.ref]).locate.remote(entry.ref, *span)
                self.locating[locate] = (entry.ref, entry.metadata.size_bytes)
            self._poll(wait=False)
            while self.queued:  # over budget: stop taking blocks until writes finish
                self._poll(wait=True)
        while self.locating or self.writing or self.queued:
            self._poll(wait=True)

    def _get(self, ref):
        value = self.ray.get(ref)
        self.report.driver_bytes += len(pickle.dumps(value))
        return value

    def _poll(self, wait: bool) -> None:
        refs = [*self.locating, *self.writing]
        if refs:
            ready, _ = self.ray.wait(refs, num_returns=1 if wait else len(refs), timeout=None if wait else 0)
            for ref in ready:
                self._located(ref) if ref in self.locating else self._written(ref)
        self._submit()

    def _located(self, task) -> None:
        block, size = self.locating.pop(task)
        try:
            found = self._get(task)
        except self.ray.exceptions.RayError:
            return  # the block is gone with its node: its shards stay incomplete and rerun next round
        for source, chunk, last, error, row in found:
            shard = self.shards.setdefault(source, _Shard())
            shard.chunks[chunk] = (block, row, size // max(1, len(found)))
            shard.last = chunk if last else shard.last
            shard.error = error or shard.error
            if shard.complete():
                self.queued.append(source)

    def _submit(self) -> None:
        while self.queued:
            shard = self.shards[self.queued[0]]
            size = sum(bytes_ for _, _, bytes_ in shard.chunks.values())
            if not shard.error and self.writing and self.in_flight + size > self.budget:
                return
            source = self.queued.pop(0)
            del self.shards[source]
            if shard.error:  # a malformed or damaged tar: named, never written
                self.report.failed_shards[fmt.shard_name(source)] = shard.error
                self.bar.update(1)
                continue
            order = [shard.chunks[i] for i in range(shard.last + 1)]
            where = {ref: i for i, ref in enumerate(dict.fromkeys(ref for ref, _, _ in order))}
            rows = [(where[ref], row) for ref, row, _ in order]
            write = self._writer(list(where)).write.remote(self.output, self.spec, source, rows, *where)
            self.writing[write] = (source, size)
            self.in_flight += size

    def _writer(self, blocks: list) -> object:
        """The writer on the node holding most of these blocks' bytes, even when it is busy for
        now: Ray's own locality preference gives way to any node with a free CPU, and the
        blocks would cross the network. If that node dies first, the call fails and the shard
        reruns next round, with writers of its own."""
        held: dict[str, int] = {}
        for where in self.ray.experimental.get_object_locations(blocks).values():
            for node in where["node_ids"]:
                held[node] = held.get(node, 0) + (where["object_size"] or 0)
        # Blocks small enough to live in the driver's own memory: the driver's node.
        node = max(held, key=held.get) if held else self.ray.get_runtime_context().get_node_id()
        if node not in self.writers:
            pin = self.ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node, soft=False)
            self.writers[node] = self.writer_class.options(scheduling_strategy=pin).remote()
        return self.writers[node]

    def _written(self, task) -> None:
        source, size = self.writing.pop(task)
        self.in_flight -= size
        name = fmt.shard_name(source)
        try:
            out = self._get(task)
        except self.ray.exceptions.RayTaskError as exc:  # the write itself failed (storage, Arrow)
            cause = exc.cause or exc
            self.report.failed_shards[name] = f"writing failed ({type(cause).__name__}: {cause})"
            self.bar.update(1)
            return
        except self.ray.exceptions.RayError as exc:  # its blocks or its worker lost: rerun next round
            self.lost[source] = f"{type(exc).__name__}"
            return
        record = fmt.ShardRecord(**out["record"])
        self.written.add(source)
        self.report.shards_written += 1
        self.report.rows_written += record.rows
        for reason, n in record.skipped.items():
            self.report.skipped[reason] = self.report.skipped.get(reason, 0) + n
        self.report.writer_nodes[name] = out["node"]
        self.bar.update(1)


# Chunks a GPU encoder actor works on at once (ChunkEncoder): one on the GPU, one in its CPU work.
GPU_CALLS = 2


@dataclass(frozen=True)
class EncoderPlan:
    """The encoders' settings with `auto` resolved against the Ray cluster."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "fp32" or "bf16"
    actors: int
    threads: int | None  # torch threads per CPU actor
    # Calls an actor runs at once: GPU_CALLS on a GPU; one on the CPU, whose torch threads
    # already take the actor's cores.
    calls: int = 1


def _encoder_plan(cfg: PretokenizeConfig) -> EncoderPlan:
    import ray  # +1.7 s on import; the CLI and the run config import this module for its config

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if cfg.device == "cuda" and not gpus:
        raise ValueError("device: 'cuda', but the Ray cluster has no GPUs; use device auto or cpu")
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus else "cpu")
    actors = cfg.encoders or (gpus if device == "cuda" else 1)
    threads = None if device == "cuda" else (cfg.encoder_threads or max(1, (os.cpu_count() or 1) // actors))
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    return EncoderPlan(device=device, dtype=dtype, actors=actors, threads=threads,
                       calls=GPU_CALLS if device == "cuda" else 1)


def _dataset_spec(cfg: PretokenizeConfig, plan: EncoderPlan) -> fmt.DatasetSpec:
    """Fingerprints the models and reads their shapes (on the driver, on CPU); with text
    "states", writes the empty prompt's embeddings next to the shards (with "ids" the
    training step computes them with the tower it runs anyway)."""
    from amused.tokenizer.image import ImageTokenizer  # torch: see ChunkEncoder
    from amused.tokenizer.text import TextEncoder

    image = ImageTokenizer.from_pretrained(cfg.vqgan, device="cpu")
    text = TextEncoder.from_pretrained(cfg.text_encoder, device="cpu")
    spec = fmt.DatasetSpec(
        resolution=cfg.resolution, token_grid=image.grid(cfg.resolution), codebook_size=image.codebook_size,
        text_seq_len=text.seq_len, text_hidden_size=text.hidden_size, text_pooled_dim=text.pooled_dim,
        image_tokenizer=fmt.ModelIdentity.of(cfg.vqgan, VQGAN_SUBFOLDERS),
        text_encoder=fmt.ModelIdentity.of(cfg.text_encoder), crop=cfg.crop, views=cfg.views,
        seed=cfg.seed, min_side=cfg.min_side, max_pixels=cfg.max_pixels,
        encoder_device=plan.device, encoder_dtype=plan.dtype, text=cfg.text,
    )
    if cfg.text == "ids":
        dtype = spec.tensor_columns()["text_ids"][0]
        if len(text.tokenizer) > np.iinfo(dtype).max + 1:
            raise ValueError(f"text: 'ids' stores token ids as {dtype.name}, but the tokenizer of {cfg.text_encoder} "
                             f"has {len(text.tokenizer):,} tokens; use text: states")
    elif fmt.read_empty_prompt(cfg.output) is None:
        empty = text.encode([""])
        fmt.write_empty_prompt(cfg.output, empty.hidden_states[0].float().numpy(), empty.pooled[0].float().numpy())
    return spec


def _check_output(output: str, spec: fmt.DatasetSpec) -> dict[str, fmt.ShardRecord]:
    """The shards already done; refuses a folder whose manifest, or any shard's marker, was
    made with other settings (a manifest deleted does not hide them)."""
    fs, path = url_to_fs(output)
    has_manifest = fs.exists(f"{path.rstrip('/')}/{fmt.MANIFEST}")
    if has_manifest:
        changes = fmt.read_manifest(output).spec.changes_to(spec)
        if changes:
            raise ValueError(f"{output} holds a token dataset made with other settings (existing -> this run): "
                             f"{'; '.join(changes)}. Refusing to mix them; use another output folder")
    done = fmt.completed_shards(output, spec)
    if not has_manifest:
        fmt.write_manifest(output, fmt.Manifest(spec, []))
    return done


def finalize_manifest(output: str, spec: fmt.DatasetSpec) -> fmt.Manifest:
    manifest = fmt.Manifest(spec, list(fmt.completed_shards(output, spec).values()))
    fmt.write_manifest(output, manifest)
    return manifest


def pretokenize(cfg: PretokenizeConfig) -> PretokenizeReport:
    """Runs the job; shards already complete in `cfg.output` are skipped."""
    return _pretokenize(cfg, ChunkEncoder)


def _pretokenize(cfg: PretokenizeConfig, encoder: type) -> PretokenizeReport:
    """The job with `encoder` as the actors' class: benchmarks/pretokenize.py passes a model-free
    one to time the data plane alone."""
    started = time.monotonic()
    sources = list_input_shards(cfg.input)
    names = [fmt.shard_name(s) for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"input shards map to the same output name: {sorted(n for n in names if names.count(n) > 1)}")
    # Ray even when nothing is left to do: `auto` resolves against the cluster, and the
    # resolved device and dtype are part of the dataset's identity.
    with ray_session(cfg.ray_address):
        plan = _encoder_plan(cfg)
        spec = _dataset_spec(cfg, plan)
        done = _check_output(cfg.output, spec)
        pending = [s for s, n in zip(sources, names) if n not in done]
        report = PretokenizeReport(output=cfg.output, shards_total=len(sources),
                                   shards_already_done=len(sources) - len(pending))
        if pending:
            _run(cfg, spec, plan, pending, report, encoder)
    finalize_manifest(cfg.output, spec)
    report.seconds = time.monotonic() - started
    return report


def _run(cfg: PretokenizeConfig, spec: fmt.DatasetSpec, plan: EncoderPlan, pending: list[str],
         report: PretokenizeReport, encoder: type) -> None:
    import ray  # see _encoder_plan

    cpu = time.process_time()
    budget = int(ray.cluster_resources().get("object_store_memory", 1 << 30) * WRITE_MEMORY_SHARE)
    bar = tqdm(total=len(pending), unit="shard", desc="pretokenize", disable=not cfg.progress)
    todo, lost = pending, {}
    for _ in range(ROUNDS):
        job = _Round(cfg.output, spec, report, bar, budget)
        job.run(_encoded(cfg, plan, todo, encoder).iter_internal_ref_bundles())
        todo = [s for s in todo if s not in job.written and fmt.shard_name(s) not in report.failed_shards]
        lost = {s: job.lost.get(s, "its encoded chunks") for s in todo}
        if not todo:
            break
    bar.close()
    for source, what in lost.items():
        report.failed_shards[fmt.shard_name(source)] = (f"lost to node or worker failures in each of {ROUNDS} "
                                                          f"rounds (last: {what})")
    report.driver_cpu_seconds += time.process_time() - cpu


def _encoded(cfg: PretokenizeConfig, plan: EncoderPlan, sources: list[str], encoder: type):
    """The Ray Dataset of encoded chunks (read -> decode -> encode) of `sources`."""
    import ray  # see _encoder_plan

    resources = {"num_gpus": 1} if plan.device == "cuda" else {"num_cpus": cfg.encoder_cpus}
    items = [{"shard": i, "source": s} for i, s in enumerate(sources)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(read_chunks, fn_kwargs={"batch_size": cfg.batch_size}, num_cpus=0.25)
    ds = ds.map(decode_chunk, num_cpus=cfg.decode_cpus, fn_kwargs=dict(
        resolution=cfg.resolution, crop=cfg.crop, views=cfg.views, seed=cfg.seed, min_side=cfg.min_side,
        max_pixels=cfg.max_pixels))
    pool = ray.data.ActorPoolStrategy(size=plan.actors, max_concurrent_calls_per_actor=plan.calls,
                                      enable_true_multi_threading=plan.calls > 1)
    return ds.map_batches(
        encoder, batch_size=1, batch_format="pyarrow", compute=pool,
        fn_constructor_kwargs=dict(vqgan=cfg.vqgan, text_encoder=cfg.text_encoder, resolution=cfg.resolution,
                                   device=plan.device, dtype=plan.dtype, threads=plan.threads, text=cfg.text,
                                   deterministic=cfg.deterministic),
        **resources,
    )
