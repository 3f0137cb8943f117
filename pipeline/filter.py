"""`amused filter`: image-text metadata Parquet in, filtered and shuffled download shards out.

Three passes of plain Ray tasks, each resumable by its own completion files under
`_work/` (scratch in Arrow IPC):

1. per input file: read the mapped columns, apply the rules with pyarrow compute, key
   each kept row by its normalised URL and give it a seeded rank; write the rows sorted
   by rank, each batch's rank range recorded (so pass 2 reads only its rank range).
2. per rank range (partition): gather the range from every file, sort, drop duplicate
   keys. Ranges split the 64-bit rank space evenly, so partition order is rank order:
   the global result does not depend on the partition count, the file split or the
   number of workers.
3. per partition: cut the global order into download shards of `rows_per_shard` rows
   (`00000.parquet`, ...), a shard reading into the next partition where it must.

`_report.json`, written last, marks the job complete: rows in/out and rejections by
rule, per file and in total. A row rejected by several rules counts under the first.
A recorded width or height that is present but no plausible pixel count (0, negative,
fractional, NaN, above MAX_RECORDED_SIDE, text that is no number, a boolean) is bad
metadata: such rows are dropped as `invalid_size` whatever the size rules; a null size
is unknown and passes unless a size rule needs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from amused.pipeline.urls import AddressPolicy, key_text, key_words, normalize, parse_allow, scheme_allowed, seeded_rank
from amused.pipeline.wds import MAX_RECORDED_SIDE
from amused.plumbing.config import opt, output_settings
from amused.plumbing.fsio import (
    atomic_writer,
    file_exists,
    list_files,
    parquet_columns,
    read_json,
    write_json_atomic,
)
from amused.plumbing.raysession import ray_session, ray_tasks
from amused.plumbing.storage import is_local, join, url_to_fs

REPORT = "_report.json"
WORK = "_work"

# canonical column -> Arrow type of the output
CANONICAL = {
    "url": pa.string(), "caption": pa.string(), "width": pa.int64(), "height": pa.int64(),
    "similarity": pa.float64(), "nsfw": pa.float64(), "watermark": pa.float64(),
    "aesthetic_score": pa.float64(), "language": pa.string(),
}
OUTPUT_SCHEMA = pa.schema([pa.field("sample_key", pa.string(), nullable=False)]
                          + [pa.field(k, t) for k, t in CANONICAL.items()])
# Pass 1's rows: the output's, with the key as two integers (the hex text is made for kept rows only).
_WORK_SCHEMA = pa.schema([pa.field(k, t) for k, t in CANONICAL.items()] + [
    pa.field("_rank", pa.uint64()), pa.field("_k0", pa.uint64()), pa.field("_k1", pa.uint64()),
    pa.field("_file", pa.int32())])
SCRATCH = ".arrow"
_BATCH_ROWS = 16_384  # the read granularity of a rank range: a partition reads < 1 batch too many per file
_RANK_BOUNDS = b"amused.rank_bounds"

_LAION = dict(url="URL", caption="TEXT", width="WIDTH", height="HEIGHT", similarity="similarity", nsfw="punsafe",
              watermark="pwatermark", aesthetic_score="AESTHETIC_SCORE", language="LANGUAGE")
SCHEMAS: dict[str, dict[str, str]] = {
    # LAION-5B, LAION-2B-en/multi, LAION-Aesthetics (AESTHETIC_SCORE), LAION-400M
    "laion": _LAION,
    "datacomp": dict(url="url", caption="text", width="original_width", height="original_height",
                     similarity="clip_l14_similarity_score"),
    "coyo": dict(url="url", caption="text", width="width", height="height", similarity="clip_similarity_vitl14",
                 nsfw="nsfw_score_opennsfw2", watermark="watermark_score", aesthetic_score="aesthetic_score_laion_v2"),
    "cc12m": dict(url="url", caption="caption"),
    "custom": {},
}
# Detection order matters: the most specific column sets first.
_SIGNATURES = (("laion", {"URL", "TEXT"}), ("datacomp", {"url", "text", "clip_l14_similarity_score"}),
               ("coyo", {"url", "text", "clip_similarity_vitl14"}), ("cc12m", {"url", "caption"}))
_NUMBER = r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$"
# Inclusive bounds of the numeric settings that no rule reads (None: no bound); the rules'
# own settings carry theirs in RULES. NaN and inf are in none.
_BOUNDS = {"rows_per_shard": (1, None), "partition_rows": (1, None), "workers": (1, None)}


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


# ----- the row rules ----------------------------------------------------------------------

def _within(x, low, high):
    ok = pc.greater_equal(x, low) if low is not None else pc.is_valid(x)
    return pc.and_(ok, pc.less_equal(x, high)) if high is not None else ok


def _size_ok(c, s):
    ok = pc.and_(pc.is_valid(c["width"]), pc.is_valid(c["height"]))
    if s["min_width"] is not None:
        ok = pc.and_(ok, pc.greater_equal(c["width"], s["min_width"]))
    if s["min_height"] is not None:
        ok = pc.and_(ok, pc.greater_equal(c["height"], s["min_height"]))
    return ok


def _ratio_ok(c, s):
    w, h = pc.cast(c["width"], pa.float64()), pc.cast(c["height"], pa.float64())
    positive = pc.and_(pc.greater(w, 0), pc.greater(h, 0))
    ratio = pc.max_element_wise(pc.divide(w, h), pc.divide(h, w))
    return pc.and_(positive, pc.less_equal(ratio, s["max_aspect_ratio"]))


Bounds = tuple[float | None, float | None]


@dataclass(frozen=True)
class Rule:
    """A row rule: `passes(columns, settings)` says per row whether it is kept. `settings`
    names the FilterConfig fields it reads, each with its inclusive bounds (None: not a
    number); a rule is on when any of them is set (not None, False or an empty list),
    or `always`. A `min_X` above its `max_X` is refused: no row would pass."""

    name: str  # the reason its rejections count under
    settings: dict[str, Bounds | None]
    columns: tuple[str, ...]  # the canonical columns it needs mapped
    passes: Callable[[dict[str, pa.Array], dict], pa.Array]
    always: bool = False


# In the order rejections are attributed: a row failing several rules counts under the first.
RULES: tuple[Rule, ...] = (
    Rule("url_scheme", {}, ("url",), lambda c, s: scheme_allowed(c["_normalized"]), always=True),
    Rule("url_address", {"allow_hosts": None}, ("url",),
         lambda c, s: AddressPolicy(parse_allow(s["allow_hosts"]))(c["_normalized"]), always=True),
    Rule("caption_chars", {"min_caption_chars": (0, None), "max_caption_chars": (0, None)}, ("caption",),
         lambda c, s: _within(pc.utf8_length(c["caption"]), s["min_caption_chars"], s["max_caption_chars"])),
    Rule("caption_words", {"min_caption_words": (0, None), "max_caption_words": (0, None)}, ("caption",),
         lambda c, s: _within(pc.count_substring_regex(c["caption"], r"\S+"), s["min_caption_words"],
                              s["max_caption_words"])),
    Rule("language", {"languages": None}, ("language",), lambda c, s: pc.is_in(
        pc.utf8_lower(c["language"]), pa.array([x.lower() for x in _csv(s["languages"])], pa.string()))),
    # No column needed: metadata without sizes has none that is invalid.
    Rule("invalid_size", {"drop_invalid_sizes": None}, (), lambda c, s: pc.invert(c["_invalid_size"])),
    Rule("image_size", {"min_width": (0, None), "min_height": (0, None)}, ("width", "height"), _size_ok),
    Rule("aspect_ratio", {"max_aspect_ratio": (1, None)}, ("width", "height"), _ratio_ok),
    Rule("similarity", {"min_similarity": (-1, 1)}, ("similarity",),  # a cosine similarity
         lambda c, s: pc.greater_equal(c["similarity"], s["min_similarity"])),
    Rule("nsfw", {"max_nsfw": (0, 1)}, ("nsfw",),  # a probability
         lambda c, s: pc.less_equal(c["nsfw"], s["max_nsfw"])),
    Rule("watermark", {"max_watermark": (0, 1)}, ("watermark",),  # a probability
         lambda c, s: pc.less_equal(c["watermark"], s["max_watermark"])),
    Rule("aesthetic", {"min_aesthetic": (None, None)}, ("aesthetic_score",),
         lambda c, s: pc.greater_equal(c["aesthetic_score"], s["min_aesthetic"])),
)


def _set(value) -> bool:
    return value is not None and value is not False and (not isinstance(value, str) or bool(_csv(value)))


@dataclass(frozen=True)
class RuleSet:
    """The rule settings of one config (picklable: Ray tasks receive it); `active` are the
    rules they turn on, in table order."""

    settings: dict

    def active(self) -> list[Rule]:
        return [r for r in RULES if r.always or any(_set(self.settings[name]) for name in r.settings)]

    def verdicts(self, cols: dict[str, pa.Array]) -> Iterator[tuple[str, pa.Array]]:
        """(rule name, whether each row passes it; null counts as failing) per active rule."""
        for rule in self.active():
            yield rule.name, pc.fill_null(rule.passes(cols, self.settings), False)

    def needed_columns(self) -> set[str]:
        return {c for rule in self.active() for c in rule.columns}

    def names(self) -> list[str]:
        return [r.name for r in self.active()] + ["duplicate_url"]


def _check_bounds(name: str, value, bounds: Bounds) -> None:
    low, high = bounds
    if value is None:
        return
    finite = isinstance(value, int) or math.isfinite(value)  # an int of any size is finite
    if not (finite and (low is None or value >= low) and (high is None or value <= high)):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}" if low is not None else "finite"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_rule(rule: Rule, values: dict) -> None:
    for name, bounds in rule.settings.items():
        if bounds is not None:
            _check_bounds(name, values[name], bounds)
    for name in rule.settings:
        high_name = "max_" + name.removeprefix("min_")
        if name.startswith("min_") and high_name in rule.settings:
            low, high = values[name], values[high_name]
            if low is not None and high is not None and low > high:
                raise ValueError(f"{name} {low} is above {high_name} {high}: no {rule.columns[0]} passes")


@dataclass
class FilterConfig:
    input: str = opt(help="metadata Parquet: a file, a folder of *.parquet, or a glob (local or s3://)")
    output: str = opt(help="folder for the download shards and _report.json")
    schema: str = opt("auto", f"column names of the input: auto, {', '.join(SCHEMAS)}")
    columns: str = opt("", "column mapping on top of the schema, e.g. 'url=URL,caption=TEXT,nsfw=punsafe'")
    min_width: int | None = opt(None, "minimum original width in pixels")
    min_height: int | None = opt(None, "minimum original height in pixels")
    max_aspect_ratio: float | None = opt(None, "maximum of width/height and height/width")
    min_similarity: float | None = opt(None, "minimum image-text CLIP similarity")
    max_nsfw: float | None = opt(None, "maximum NSFW probability")
    max_watermark: float | None = opt(None, "maximum watermark probability")
    min_aesthetic: float | None = opt(None, "minimum aesthetic score")
    min_caption_chars: int | None = opt(1, "minimum caption length in characters (after trimming)")
    max_caption_chars: int | None = opt(None, "maximum caption length in characters")
    min_caption_words: int | None = opt(None, "minimum caption length in words")
    max_caption_words: int | None = opt(None, "maximum caption length in words")
    languages: str = opt("", "comma-separated caption languages to keep (needs a language column)")
    dedup: bool = opt(True, "drop repeated URLs (after normalisation) across all input files")
    drop_invalid_sizes: bool = opt(True, "drop rows whose recorded width/height is present but not an integer in "
                                         f"[1, {MAX_RECORDED_SIDE}] (--no-drop-invalid-sizes: keep them, size unknown)")
    allow_hosts: str = opt("", "comma-separated addresses/networks/names exempt from the URL address policy")
    seed: int = opt(0, "seed of the shuffle before sharding")
    rows_per_shard: int = opt(10_000, "rows per download shard")
    partition_rows: int = opt(2_000_000, "rows per de-duplication partition (memory of one task)", output=False)
    workers: int | None = opt(None, "concurrent Ray tasks per pass (default: as many as fit)", output=False)
    ray_address: str | None = opt(None, "Ray cluster address (default: a local Ray)", output=False)
    progress: bool = opt(True, "progress bars", output=False)

    def __post_init__(self) -> None:
        if self.schema != "auto" and self.schema not in SCHEMAS:
            raise ValueError(f"schema {self.schema!r}: expected auto or one of {sorted(SCHEMAS)}")
        for name, bounds in _BOUNDS.items():
            _check_bounds(name, getattr(self, name), bounds)
        rules = self.rules()
        for rule in RULES:
            _check_rule(rule, rules.settings)
        self.column_overrides()
        # Each active rule once on no rows: a setting its predicate cannot use (an allow
        # list that does not parse) is refused now, not in the first Ray task.
        empty = canonical_table(pa.table({}), {})
        list(rules.verdicts({**empty, "_normalized": normalize(empty["url"])}))

    def column_overrides(self) -> dict[str, str]:
        out = {}
        for item in _csv(self.columns):
            name, sep, source = item.partition("=")
            if not sep or name.strip() not in CANONICAL or not source.strip():
                raise ValueError(f"columns: {item!r} is not CANONICAL=SOURCE with CANONICAL in {sorted(CANONICAL)}")
            out[name.strip()] = source.strip()
        return out

    def rules(self) -> RuleSet:
        return RuleSet({name: getattr(self, name) for rule in RULES for name in rule.settings})


# ----- column mapping ---------------------------------------------------------------------

def resolve_mapping(schema: str, overrides: dict[str, str], first_file_columns: list[str]) -> tuple[str, dict]:
    if schema == "auto":
        present = set(first_file_columns)
        schema = next((name for name, needed in _SIGNATURES if needed <= present), "custom")
        if schema == "custom" and not {"url", "caption"} <= set(overrides):
            raise ValueError(f"cannot tell the schema from columns {sorted(present)}; pass --schema or "
                             f"--columns url=...,caption=...")
    return schema, {**SCHEMAS[schema], **overrides}


def check_columns(path: str, names: list[str], mapping: dict[str, str], needed: set[str]) -> None:
    for canonical in sorted(needed | {"url", "caption"}):
        source = mapping.get(canonical)
        if source is None:
            raise ValueError(f"no input column is mapped to {canonical!r}, which a rule needs; "
                             f"add --columns {canonical}=NAME")
        if source not in names:
            raise ValueError(f"{path}: missing column {source!r} (mapped to {canonical!r})")


def _as_float(arr: pa.Array) -> pa.Array:
    """Numbers as float64; unparseable strings and other types become null (the rule rejects them)."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        numeric = pc.fill_null(pc.match_substring_regex(arr, _NUMBER), False)
        return pc.cast(pc.utf8_trim_whitespace(pc.if_else(numeric, arr, None)), pa.float64())
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_decimal(arr.type):
        return pc.cast(arr, pa.float64())
    return pa.nulls(len(arr), pa.float64())


def _as_size(arr: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(sides as int64, null where unknown or invalid; whether each row's value was present
    but invalid). An empty or blank string is unknown, like null."""
    x = _as_float(arr)
    ok = pc.fill_null(pc.and_(pc.and_(pc.greater_equal(x, 1.0), pc.less_equal(x, float(MAX_RECORDED_SIDE))),
                              pc.equal(pc.floor(x), x)), False)  # NaN compares false: not ok
    given = pc.is_valid(arr)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        given = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(arr)), 0), False)
    return pc.cast(pc.if_else(ok, x, None), pa.int64()), pc.and_(given, pc.invert(ok))


def _as_text(arr: pa.Array) -> pa.Array:
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        try:
            arr = pc.cast(arr, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return pa.nulls(len(arr), pa.string())
    return pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))


_CONVERT = {"similarity": _as_float, "nsfw": _as_float, "watermark": _as_float, "aesthetic_score": _as_float}


def canonical_table(table: pa.Table, mapping: dict[str, str]) -> dict[str, pa.Array]:
    """The canonical columns, plus `_invalid_size`: rows whose width or height was given
    but is no plausible side (those sides themselves are null here)."""
    cols = {"_invalid_size": pa.array(np.zeros(table.num_rows, dtype=bool))}
    for name, kind in CANONICAL.items():
        source = mapping.get(name)
        if source is None or source not in table.column_names:
            cols[name] = pa.nulls(table.num_rows, kind)
            continue
        arr = table.column(source).combine_chunks()
        if name in ("width", "height"):
            cols[name], invalid = _as_size(arr)
            cols["_invalid_size"] = pc.or_(cols["_invalid_size"], invalid)
        else:
            cols[name] = _CONVERT.get(name, _as_text)(arr)
    return cols


# ----- pass 1: one input file ------------------------------------------------------------

def _work(output: str, *parts: str) -> str:
    return join(output, WORK, *parts)


def _done(output: str, folder: str, index: int) -> dict | None:
    """A unit's result once its marker and its data both exist (a marker beside no data is
    from an older scratch layout: redone)."""
    marker = _work(output, folder, f"{index:05d}.json")
    if file_exists(marker) and file_exists(_work(output, folder, f"{index:05d}{SCRATCH}")):
        return read_json(marker)
    return None


def _write_scratch(url: str, table: pa.Table, ranked: bool) -> None:
    """Arrow IPC: 3-4x faster to write and read than Parquet, and read once. `ranked`
    tables (sorted by `_rank`) record each batch's first and last rank in the schema, so a
    rank range is read batch by batch, from S3 too."""
    batches = table.combine_chunks().to_batches(max_chunksize=_BATCH_ROWS)
    if ranked:
        bounds = [[int(pc.min(b["_rank"]).as_py()), int(pc.max(b["_rank"]).as_py())] for b in batches]
        table = table.replace_schema_metadata({_RANK_BOUNDS: json.dumps(bounds)})
    # lz4 where bytes cost more than CPU (object storage); on a local disk, none.
    options = pa.ipc.IpcWriteOptions(compression=None if is_local(url) else "lz4")
    with atomic_writer(url) as fh, pa.ipc.new_file(fh, table.schema, options=options) as writer:
        for batch in batches:
            writer.write_batch(batch)


def _read_scratch(url: str, lo: int = 0, hi: int = 1 << 64, rows: int | None = None) -> pa.Table:
    """The rows of a scratch file (its first `rows` or more, where given), or of a ranked one
    the rows whose rank is in [lo, hi)."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as fh:
        reader = pa.ipc.open_file(fh)
        if rows is not None:
            batches, have = [], 0
            while have < rows and len(batches) < reader.num_record_batches:
                batches.append(reader.get_batch(len(batches)))
                have += batches[-1].num_rows
            return pa.Table.from_batches(batches, schema=reader.schema)
        if (lo, hi) == (0, 1 << 64):
            return reader.read_all()
        bounds = json.loads(reader.schema.metadata[_RANK_BOUNDS])
        table = pa.Table.from_batches([reader.get_batch(i) for i, (first, last) in enumerate(bounds)
                                       if last >= lo and first < hi], schema=reader.schema)
    rank = table.column("_rank").to_numpy()
    start = int(np.searchsorted(rank, np.uint64(lo)))
    end = len(rank) if hi >= 1 << 64 else int(np.searchsorted(rank, np.uint64(hi)))
    return table.slice(start, end - start)


def filter_file(item: dict, output: str, mapping: dict, rules: RuleSet, seed: int) -> dict:
    """Filters one metadata file into `_work/files/NNNNN.arrow`, its kept rows keyed and
    sorted by seeded rank; returns its counts."""
    index, path = int(item["index"]), str(item["path"])
    done = _done(output, "files", index)
    if done is not None:
        return done
    src_fs, src_path = url_to_fs(path)
    sources = sorted(set(mapping.values()) & set(parquet_columns(path)))
    with src_fs.open(src_path, "rb") as fh:  # one open: through `filesystem=` pyarrow asks for the file 7 times
        table = pq.read_table(fh, columns=sources)
    cols = canonical_table(table, mapping)
    cols["_normalized"] = normalize(cols["url"])
    alive = pa.array(np.ones(table.num_rows, dtype=bool))
    rejected = {}
    for name, ok in rules.verdicts(cols):
        rejected[name] = pc.sum(pc.and_(alive, pc.invert(ok))).as_py() or 0
        alive = pc.and_(alive, ok)
    kept = np.flatnonzero(alive.to_numpy(zero_copy_only=False))
    words = key_words(cols["_normalized"].take(kept))
    rank = seeded_rank(words[:, 0], seed)
    by_rank, _ = _key_order(rank, words[:, 0], words[:, 1])
    out = pa.table({k: cols[k] for k in CANONICAL}).take(kept[by_rank])
    for name, values in (("_rank", rank), ("_k0", words[:, 0]), ("_k1", words[:, 1])):
        out = out.append_column(name, pa.array(values[by_rank]))
    out = out.append_column("_file", pa.array(np.full(len(kept), index, dtype=np.int32)))
    _write_scratch(_work(output, "files", f"{index:05d}{SCRATCH}"), out.cast(_WORK_SCHEMA), ranked=True)
    counts = {"index": index, "file": path, "rows_in": table.num_rows, "rows_kept": out.num_rows,
              "rejected": rejected}
    write_json_atomic(_work(output, "files", f"{index:05d}.json"), counts)
    return counts


# ----- pass 2: one rank range ------------------------------------------------------------

def rank_bounds(p: int, partitions: int) -> tuple[int, int]:
    return (p << 64) // partitions, ((p + 1) << 64) // partitions


# The global order: seeded rank, then key; copies of one key by their columns (the first is kept).
_SORT_KEYS = [(c, "ascending") for c in ("_rank", "_k0", "_k1", *CANONICAL, "_file")]


def _key_order(rank: np.ndarray, k0: np.ndarray, k1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the order by seeded rank, then key (the order of the hex keys); whether each row of
    that order has the previous row's key). Ranks are a bijection of the key's first word,
    so they tie only within one key (or a 64-bit collision): numpy sorts the ranks, and the
    full key orders only the tied rows. A stable sort: pass 2's sorted runs merge fast."""
    order = np.argsort(rank, kind="stable")
    ranked = rank[order]
    tied_rank = ranked[1:] == ranked[:-1]
    repeat = np.zeros(len(order), dtype=bool)
    if tied_rank.any():
        at = np.flatnonzero(np.concatenate([tied_rank, [False]]) | np.concatenate([[False], tied_rank]))
        rows = order[at]  # whole groups of one rank, in rank order: sorting them keeps the groups in place
        order[at] = rows[np.lexsort((k1[rows], k0[rows], rank[rows]))]
        previous = order[:-1]
        repeat[1:] = tied_rank & (k0[order[1:]] == k0[previous]) & (k1[order[1:]] == k1[previous])
    return order, repeat


def _global_order(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """`_key_order` of the rows, copies of one key ordered by all their columns (Arrow's
    comparator, on those rows only): the first copy is the one de-duplication keeps."""
    order, repeat = _key_order(*(table.column(c).to_numpy() for c in ("_rank", "_k0", "_k1")))
    if repeat.any():
        copies = repeat.copy()
        copies[:-1] |= repeat[1:]
        at = np.flatnonzero(copies)
        order[at] = order[at][pc.sort_indices(table.take(order[at]), _SORT_KEYS).to_numpy()]
    return order, repeat


def dedup_partition(item: dict, output: str, files: list[int], partitions: int, dedup: bool) -> dict:
    p = int(item["partition"])
    done = _done(output, "parts", p)
    # A partition made under another plan (its pin lost, or two drivers on one output) covers
    # another rank range: redone, never reused.
    if done is not None and done.get("partitions") == partitions:
        return done
    lo, hi = rank_bounds(p, partitions)
    table = pa.concat_tables([_read_scratch(_work(output, "files", f"{i:05d}{SCRATCH}"), lo, hi)
                              for i in files])
    order, repeat = _global_order(table)
    duplicates: dict[str, int] = {}
    if dedup and repeat.any():
        ids, n = np.unique(table.column("_file").to_numpy()[order[repeat]], return_counts=True)
        duplicates = {str(int(i)): int(c) for i, c in zip(ids, n)}
        order = order[~repeat]
    rows = table.take(order)
    words = np.stack([rows.column("_k0").to_numpy(), rows.column("_k1").to_numpy()], axis=1)
    rows = rows.select(list(CANONICAL)).add_column(0, "sample_key", key_text(words)).cast(OUTPUT_SCHEMA)
    _write_scratch(_work(output, "parts", f"{p:05d}{SCRATCH}"), rows, ranked=False)
    result = {"partition": p, "partitions": partitions, "rows": rows.num_rows, "duplicates": duplicates}
    write_json_atomic(_work(output, "parts", f"{p:05d}.json"), result)
    return result


# ----- pass 3: download shards -----------------------------------------------------------

def shard_url(output: str, index: int) -> str:
    return join(output, f"{index:05d}.parquet")


def _write_shard(url: str, rows: pa.Table) -> None:
    # One chunk: the Parquet writer cuts pages where chunks end, and chunks end where partitions do.
    with atomic_writer(url) as fh:
        pq.write_table(rows.combine_chunks(), fh, compression="zstd")


def write_shards(item: dict, output: str, offsets: list[int], rows_per_shard: int, threads: int = 1) -> dict:
    """Writes the shards that start in partition `item['partition']` (global row order),
    `threads` at a time (the writer holds no GIL: more threads where tasks are fewer than CPUs)."""
    p, total = int(item["partition"]), offsets[-1]
    start, end = offsets[p], offsets[p + 1]
    first = -(-start // rows_per_shard)
    shards = list(range(first, -(-end // rows_per_shard))) if end > start else []
    todo = [s for s in shards if not file_exists(shard_url(output, s))]
    if not todo:
        return {"partition": p, "written": 0}
    need_end = min(total, (todo[-1] + 1) * rows_per_shard)
    tables, q = [], p
    while q < len(offsets) - 1 and offsets[q] < need_end:
        if offsets[q + 1] > offsets[q]:  # a later partition only as far as the last shard reaches
            tables.append(_read_scratch(_work(output, "parts", f"{q:05d}{SCRATCH}"),
                                        rows=None if q == p else need_end - offsets[q]))
        q += 1
    rows = pa.concat_tables(tables)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: _write_shard(shard_url(output, s), rows.slice(
            s * rows_per_shard - start, min(rows_per_shard, total - s * rows_per_shard))), todo))
    return {"partition": p, "written": len(todo)}


# ----- the job ---------------------------------------------------------------------------

@dataclass
class FilterReport:
    output: str
    schema: str
    files: list[dict] = field(default_factory=list)
    total: dict = field(default_factory=dict)
    shards: int = 0
    seconds: float = 0.0

    def table(self, max_files: int = 20) -> str:
        rules = [r for r in self.total["rejected"] if self.total["rejected"][r]] or list(self.total["rejected"])
        head = f"{'file':<28}{'rows in':>12}{'rows out':>12}" + "".join(f"{r:>15}" for r in rules)
        lines = [head, "-" * len(head)]
        shown = self.files if len(self.files) <= max_files else self.files[:max_files]
        for f in (*shown, {**self.total, "file": "TOTAL"}):
            name = f["file"].rsplit("/", 1)[-1][-27:]
            lines.append(f"{name:<28}{f['rows_in']:>12,}{f['rows_out']:>12,}"
                         + "".join(f"{f['rejected'].get(r, 0):>15,}" for r in rules))
        if len(shown) < len(self.files):
            lines.insert(2 + len(shown), f"... {len(self.files) - len(shown)} more files in {REPORT}")
        lines.append(f"{self.shards} download shards in {self.output} ({self.seconds:.1f}s, schema {self.schema})")
        return "\n".join(lines)


def _job_fingerprint(cfg: FilterConfig, files: list[str], mapping: dict) -> dict:
    # What the output depends on: the settings declared to change it, with the input
    # given as the listed files (the same files under another folder name are the same
    # job) and the output folder left out (the job lives in it; a moved folder resumes).
    settings = {k: v for k, v in output_settings(cfg).items() if k not in ("input", "output")}
    settings.update(files=files, mapping=mapping)
    return {"settings": settings,
            "sha256": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()}


def _check_or_start_job(cfg: FilterConfig, job: dict) -> None:
    url = _work(cfg.output, "job.json")
    fs, path = url_to_fs(url)
    if fs.exists(path):
        if read_json(url)["sha256"] != job["sha256"]:
            raise ValueError(f"{cfg.output} holds an unfinished filter job with other settings or inputs; "
                             f"use another output folder or delete it")
    else:
        write_json_atomic(url, job)


def _ray_map(items: list[dict], fn, kwargs: dict, workers: int | None, desc: str, progress: bool) -> list[dict]:
    """`fn(item, **kwargs)` for each item as Ray tasks, at most `workers` at a time; the
    results, in completion order. Plain tasks, not Ray Data: a pass of a few large tasks
    pays no dataset planning, and the workers no import of Ray Data (5 s cold on 2 CPUs)."""
    calls = [{"item": item, **kwargs} for item in items]
    results = ray_tasks(fn, calls, workers or len(items))
    return list(tqdm(results, total=len(items), desc=desc, disable=not progress))


def _cpus() -> int:
    import ray  # +1.2-1.7 s on import; the CLI and the run config import this module for FilterConfig

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _partitions(output: str, wanted: int) -> int:
    """The job's partition count, fixed by its first run: the units of passes 2 and 3 are its
    rank ranges, so a rerun on another cluster (or with other partition_rows) keeps them."""
    url = _work(output, "partitions.json")
    if file_exists(url):
        return int(read_json(url)["partitions"])
    write_json_atomic(url, {"partitions": wanted})
    return wanted


def _schemas(files: list[str]) -> list[list[str]]:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(parquet_columns, files))


def filter_metadata(cfg: FilterConfig) -> FilterReport:
    """Runs (or resumes) the filter job; returns its report, also written to `_report.json`."""
    started = time.monotonic()
    report_url = join(cfg.output, REPORT)
    fs, report_path = url_to_fs(report_url)
    files = list_files(cfg.input, ".parquet")
    schemas = _schemas(files)
    schema, mapping = resolve_mapping(cfg.schema, cfg.column_overrides(), schemas[0])
    rules = cfg.rules()
    for path, names in zip(files, schemas):
        check_columns(path, names, mapping, rules.needed_columns())
    job = _job_fingerprint(cfg, files, mapping)
    if fs.exists(report_path):
        done = read_json(report_url)
        if done["job"] != job["sha256"]:
            raise ValueError(f"{cfg.output} holds a finished filter job with other settings or inputs")
        return FilterReport(**{k: v for k, v in done.items() if k != "job"})
    _check_or_start_job(cfg, job)

    with ray_session(cfg.ray_address):
        counts = _ray_map([{"index": i, "path": p} for i, p in enumerate(files)], filter_file,
                          dict(output=cfg.output, mapping=mapping, rules=rules, seed=cfg.seed),
                          cfg.workers, "filter: files", cfg.progress)
        counts.sort(key=lambda c: c["index"])
        kept = sum(c["rows_kept"] for c in counts)
        # At least one partition per task slot: the partition count does not change the output.
        slots = min(_cpus(), cfg.workers or _cpus())
        partitions = _partitions(cfg.output, max(slots, math.ceil(kept / cfg.partition_rows)))
        parts = _ray_map([{"partition": p} for p in range(partitions)], dedup_partition,
                         dict(output=cfg.output, files=list(range(len(files))), partitions=partitions,
                              dedup=cfg.dedup), cfg.workers, "filter: dedup", cfg.progress)
        parts.sort(key=lambda r: r["partition"])
        offsets = np.concatenate([[0], np.cumsum([r["rows"] for r in parts])]).astype(int).tolist()
        _ray_map([{"partition": p} for p in range(partitions)], write_shards,
                 dict(output=cfg.output, offsets=offsets, rows_per_shard=cfg.rows_per_shard,
                      threads=max(1, _cpus() // min(partitions, slots))),
                 cfg.workers, "filter: shards", cfg.progress)

    report = _report(cfg, schema, counts, parts, rules)
    report.seconds = time.monotonic() - started
    write_json_atomic(report_url, {**dataclasses.asdict(report), "job": job["sha256"]})
    fs.rm(url_to_fs(_work(cfg.output))[1], recursive=True)
    return report


def _report(cfg: FilterConfig, schema: str, counts: list[dict], parts: list[dict], rules: RuleSet) -> FilterReport:
    duplicates = np.zeros(len(counts), dtype=np.int64)
    for part in parts:
        for index, n in part["duplicates"].items():
            duplicates[int(index)] += n
    names = rules.names()
    files = []
    for c, dup in zip(counts, duplicates):
        rejected = {name: int(c["rejected"].get(name, 0)) for name in names}
        rejected["duplicate_url"] = int(dup)
        files.append({"file": c["file"], "rows_in": c["rows_in"], "rows_out": c["rows_kept"] - int(dup),
                      "rejected": rejected})
    total = {"rows_in": sum(f["rows_in"] for f in files), "rows_out": sum(f["rows_out"] for f in files),
             "rejected": {n: sum(f["rejected"][n] for f in files) for n in names}}
    shards = -(-total["rows_out"] // cfg.rows_per_shard)
    return FilterReport(output=cfg.output, schema=schema, files=files, total=total, shards=shards)
