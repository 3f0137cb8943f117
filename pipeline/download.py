"""`amused download`: filtered metadata Parquet in, img2dataset webdataset shards out.

reader -> policy -> img2dataset -> summary:

- Before img2dataset sees a URL, the URL policy of `pipeline.urls` runs again (the input
  need not come from `amused filter`), and rows get a sample key if they lack one. The
  checked copies live in `_amused/input/`, one file per input file, so input file i
  becomes shard i (`number_sample_per_shard` covers a whole file).
- img2dataset runs in its incremental mode: a shard counts as done once its
  `NNNNN_stats.json` exists, so a rerun fetches only the missing shards.
- Work per input file and per shard runs as tasks where img2dataset runs: Ray tasks
  spread over the cluster's nodes (`--distributor ray`) or a pool of local processes
  (`multiprocessing`). The driver sees only small results.
- img2dataset writes a shard's samples in the order their downloads finish, which
  differs between runs with several threads; a task rewrites every finished shard once
  in key order (so two clean downloads of the same input give the same shards), writes
  its transient failures to `_amused/pending/NNNNN.parquet` and then its record,
  `_amused/records/NNNNN.json` (counts by outcome, pending samples by attempts, the
  node that wrote it): the shard's marker. The summary merges the records; each run
  leaves them all in one object, `_amused/records.parquet`, so a rerun reads one object
  instead of one per shard.
- `retry_failed` gathers the samples whose last attempt failed transiently (timeout,
  DNS, connection, 429, 5xx) from the pending files, by tasks that pack consecutive
  shards' samples into input files of at most one shard each, downloads them into a
  staging folder, and tasks move the finished shards in under new numbers after the
  existing ones (tar and metadata first, the stats file last), never touching a finished
  shard. A retried shard's record names the earlier failures its attempts supersede, so
  each sample counts once, in its last attempt.
- Every request img2dataset makes, first run or retry, goes through `pipeline.fetch_guard`
  with this run's policy: the URL, every redirect hop and every resolved address are
  judged before connecting (`resolve` pins names to addresses without DNS; a pinned
  address is judged like any DNS answer); a refusal is a permanent failure (`policy_url`,
  `policy_redirect`, `policy_address`) in the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import re
import socket
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal, TextIO, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from amused.pipeline.fetch_guard import guarded_downloads
from amused.pipeline.politeness import (
    BREAKER_OPEN,
    DOMAIN_OPTED_OUT,
    OPT_OUT_DIRECTIVES,
    ROBOTS_DISALLOWED,
    ROBOTS_UNREACHABLE,
    Politeness,
)
from amused.pipeline.urls import AddressPolicy, normalize, parse_allow, parse_pins, sample_keys, scheme_allowed
from amused.pipeline.wds import ShardFormatError, sort_shard
from amused.plumbing.config import opt
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
from amused.plumbing.terminal import local_log, output_to_log

STATE = "_amused"
SUMMARY = "download.json"
# Carried from the filter output into every sample's json (when present).
EXTRA_COLUMNS = ("sample_key", "aesthetic_score", "similarity", "nsfw", "watermark", "language")

# (reason, class, pattern over img2dataset's error message), first match wins; the
# politeness refusals (`pipeline.politeness`) match only at the start (urllib may wrap them
# in "<urlopen error ...>"), then the policy's messages, which quote the URL, come before
# the patterns a URL could contain.
_POLITE = r"^(<urlopen error )?"
_REASONS = (
    ("robots_disallowed", "permanent", _POLITE + re.escape(ROBOTS_DISALLOWED)),
    ("robots_unreachable", "transient", _POLITE + re.escape(ROBOTS_UNREACHABLE)),
    ("domain_breaker", "transient", _POLITE + re.escape(BREAKER_OPEN)),
    ("domain_opted_out", "permanent", _POLITE + re.escape(DOMAIN_OPTED_OUT)),
    ("policy_redirect", "permanent", r"URL policy refused redirect|Redirection to url .* is not allowed"),
    ("policy_address", "permanent", r"URL policy refused address"),
    ("policy_url", "permanent", r"URL policy refused"),
    ("timeout", "transient", r"timed out|timeout"),
    ("dns", "transient", r"name resolution|Name or service not known|nodename nor servname|getaddrinfo"),
    ("http_429", "transient", r"HTTP Error 429"),
    ("http_5xx", "transient", r"HTTP Error 5\d\d"),
    ("connection", "transient", r"Connection (reset|refused|aborted)|Remote end closed|RemoteDisconnected|"
                                r"IncompleteRead|EOF occurred|Network is unreachable|\[Errno (104|110|111|113)\]"),
    ("http_404", "permanent", r"HTTP Error 404"),
    ("http_410", "permanent", r"HTTP Error 410"),
    ("http_4xx", "permanent", r"HTTP Error 4\d\d"),
    ("opted_out", "permanent", r"X-Robots-Tag"),
    ("not_an_image", "permanent", r"Image decoding error|cannot identify image|not enough image data"),
    ("image_filtered", "permanent", r"image too small|image area too large|aspect ratio too large"),
    ("bad_url", "permanent", r"unknown url type|no host given|URL can't contain control characters"),
)
_COMPILED = [(name, kind, re.compile(p, re.IGNORECASE)) for name, kind, p in _REASONS]


def classify(error_message: str | None) -> tuple[str, str]:
    """(reason, 'transient' or 'permanent') of one img2dataset error message."""
    for name, kind, pattern in _COMPILED:
        if error_message and pattern.search(error_message):
            return name, kind
    return "other", "permanent"


Distributor = Literal["multiprocessing", "ray"]  # the CLI's choices and a YAML config's check


@dataclass
class DownloadConfig:
    input: str = opt(help="filtered metadata Parquet: a file, a folder of *.parquet or a glob")
    output: str = opt(help="folder for the webdataset shards (local or s3://)")
    image_size: int = opt(512, "shorter side after resizing (keep ratio); at least the training resolution")
    resize: bool = opt(True, "resize (only ever down) and re-encode; --no-resize keeps images as downloaded")
    samples_per_shard: int = opt(10_000, "at least the rows of the largest input file: one file, one shard")
    processes: int = opt(max(1, (os.cpu_count() or 1)), "download processes", output=False)
    threads: int = opt(64, "download threads per process", output=False)
    timeout: int = opt(10, "seconds per request")
    encode_quality: int = opt(95, "JPEG quality (1-100) when re-encoding")
    allow_hosts: str = opt("", "comma-separated addresses/networks/names exempt from the URL address policy")
    resolve: str = opt("", "HOST=ADDRESS,...: answer these host names with these addresses instead of DNS, like "
                           "curl --resolve (split DNS, tests); a pinned address is still judged by the URL policy, "
                           "only --allow-hosts exempts")
    user_agent_token: str | None = opt(None, "token added to the User-Agent and matched in robots.txt and "
                                             "X-Robots-Tag")
    contact_url: str = opt("", "http(s) or mailto: URL where site owners reach whoever runs this download; sent in "
                               "the User-Agent")
    domain_concurrency: int = opt(8, "requests in flight per domain, per download process")
    domain_rate: float = opt(10.0, "requests started per second per domain, per download process (0: no cap)")
    domain_breaker: int = opt(50, "consecutive failures or opt-out answers from one domain, per download process, "
                                  "after which its remaining URLs are skipped (0: never)")
    robots: bool = opt(True, "fetch each domain's robots.txt once per download process and skip what it disallows")
    retry_failed: bool = opt(False, "fetch the transient failures again and add the successes as new shards")
    max_attempts: int = opt(3, "attempts per sample, first download included, before a failure is final")
    distributor: Distributor = opt(
        "multiprocessing", "img2dataset distributor, and where the per-shard work runs: multiprocessing (local "
                           "processes) or ray (tasks on the cluster)")
    progress: bool = opt(True, "show a progress bar", output=False)
    ray_address: str | None = opt(None, "Ray cluster address with distributor ray (default: the running or a "
                                        "local Ray)", output=False)

    def __post_init__(self) -> None:
        for name in ("image_size", "samples_per_shard", "processes", "threads", "timeout", "max_attempts",
                     "domain_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be >= 1")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality: {self.encode_quality!r} must be a JPEG quality in 1..100")
        if self.distributor not in get_args(Distributor):
            raise ValueError(f"distributor: {self.distributor!r}: expected {' or '.join(get_args(Distributor))}")
        if self.user_agent_token is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", self.user_agent_token):
            raise ValueError(f"user_agent_token: {self.user_agent_token!r}: letters, digits, '.', '_' and '-' only "
                             f"(it goes into the User-Agent header and is matched in X-Robots-Tag)")
        if not self.domain_rate >= 0 or self.domain_rate == float("inf"):
            raise ValueError(f"domain_rate: {self.domain_rate!r} must be a finite number >= 0 (0: no cap)")
        if self.domain_breaker < 0:
            raise ValueError(f"domain_breaker: {self.domain_breaker!r} must be >= 0 (0: never)")
        if self.contact_url and not re.fullmatch(r"(https?://|mailto:)[!-~]+", self.contact_url):
            raise ValueError(f"contact_url: {self.contact_url!r}: an http(s):// or mailto: URL without spaces or "
                             f"control characters (it goes into the User-Agent header)")
        for name in ("input", "output"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name}: empty path")
        self.allow()  # names a bad allow_hosts or resolve entry now, not in a worker
        self.pins()

    def allow(self) -> tuple[str, ...]:
        return parse_allow(self.allow_hosts)

    def pins(self) -> dict[str, tuple[str, ...]]:
        return parse_pins(self.resolve)

    def policy(self) -> AddressPolicy:
        return AddressPolicy(self.allow())

    def politeness(self) -> Politeness:
        return Politeness(contact_url=self.contact_url, token=self.user_agent_token,
                          concurrency=self.domain_concurrency, rate=self.domain_rate, breaker=self.domain_breaker,
                          robots=self.robots)


@dataclass
class DownloadSummary:
    output: str
    shards: int = 0
    samples: int = 0
    successes: int = 0
    failures: dict = field(default_factory=dict)  # reason -> count, of samples whose last attempt failed
    transient_pending: int = 0
    policy_rejected: dict = field(default_factory=dict)
    unfinished_inputs: list = field(default_factory=list)  # input files img2dataset finished no shard of
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.successes / self.seconds if self.seconds else 0.0

    def table(self) -> str:
        kinds = dict((name, kind) for name, kind, _ in _REASONS)
        lines = [f"download -> {self.output}",
                 f"  shards {self.shards}, samples {self.samples:,}, successes {self.successes:,} "
                 f"({self.images_per_second:.1f} images/s over {self.seconds:.1f}s of shard time)"]
        for reason, n in sorted(self.failures.items(), key=lambda kv: -kv[1]):
            lines.append(f"  failed {reason:<16}{n:>10,}  ({kinds.get(reason, 'permanent')})")
        for rule, n in self.policy_rejected.items():
            if n:
                lines.append(f"  refused before download by {rule}: {n:,}")
        if self.transient_pending:
            lines.append(f"  {self.transient_pending:,} transient failures can be retried: amused download "
                         f"--retry-failed")
        if self.unfinished_inputs:
            named = ", ".join(f"{i:05d}" for i in self.unfinished_inputs[:10])
            lines.append(f"  {len(self.unfinished_inputs):,} input file(s) have no finished shard "
                         f"({named}{', ...' if len(self.unfinished_inputs) > 10 else ''}): img2dataset gave up "
                         f"on them; a rerun fetches them")
        return "\n".join(lines)


# ----- reader: checked copies of the input -------------------------------------------------

def prepare_input(source: str, dest: str, policy: AddressPolicy) -> dict:
    """Copies one metadata file with the URL policy applied and sample keys filled in."""
    counts_url = dest.removesuffix(".parquet") + ".json"
    if file_exists(counts_url):
        return read_json(counts_url)
    src_fs, src_path = url_to_fs(source)
    names = parquet_columns(source)
    missing = {"url", "caption"} - set(names)
    if missing:
        raise ValueError(f"{source}: missing column(s) {sorted(missing)}; run amused filter first or rename them")
    table = pq.read_table(src_path, filesystem=src_fs, columns=[c for c in ("url", "caption", *EXTRA_COLUMNS)
                                                               if c in names])
    normalized = normalize(table.column("url").combine_chunks())
    scheme_ok = scheme_allowed(normalized)
    address_ok = pc.and_(scheme_ok, policy(normalized))
    counts = {"url_scheme": len(table) - pc.sum(scheme_ok).as_py(),
              "url_address": pc.sum(scheme_ok).as_py() - pc.sum(address_ok).as_py()}
    table = table.filter(address_ok)
    if "sample_key" not in table.column_names:
        keys, _ = sample_keys(normalized.filter(address_ok))
        table = table.append_column("sample_key", keys)
    with atomic_writer(dest) as fh:
        pq.write_table(table, fh)
    write_json_atomic(counts_url, counts)
    return counts


def prepare_task(source: str, dest: str, allow: tuple[str, ...]) -> dict:
    """prepare_input as a task: the refusals, and the rows and columns of the checked copy
    (from its footer), so that the driver never opens an input file."""
    rejected = prepare_input(source, dest, AddressPolicy(allow))
    fs, path = url_to_fs(dest)
    meta = pq.ParquetFile(path, filesystem=fs).metadata
    return {"dest": dest, "rejected": rejected, "rows": meta.num_rows,
            "columns": meta.schema.to_arrow_schema().names}


# ----- worker: img2dataset -----------------------------------------------------------------

def run_img2dataset(url_list: str, output: str, extra: list[str], cfg: DownloadConfig, total: int,
                    done: int | None = None) -> None:
    """img2dataset from the input files at `url_list` into `output`. Its prints, its bare
    `1it [..]` bar and its processes' output go to logs/img2dataset.log of cfg.output; the
    terminal shows one bar of ours over the `total` samples (`done` of them in shards
    finished before; None: counted from their stats files), fed by the stats files of its
    shards as they appear."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports it; it would phone home
    # img2dataset pulls in torch and albumentations (+4 s on import); the CLI and the run
    # config import this module for DownloadConfig.
    from img2dataset import download as img2dataset_download

    with output_to_log(local_log(cfg.output, "img2dataset.log")) as terminal, \
            ShardProgress(output, total, done, terminal, disable=not cfg.progress), \
            guarded_downloads(cfg.allow(), cfg.pins(), cfg.politeness()):
        img2dataset_download(
            url_list=url_list, output_folder=output, input_format="parquet", output_format="webdataset",
            url_col="url", caption_col="caption", save_additional_columns=extra,
            image_size=cfg.image_size, resize_mode="keep_ratio" if cfg.resize else "no", resize_only_if_bigger=True,
            skip_reencode=not cfg.resize, encode_quality=cfg.encode_quality,
            processes_count=cfg.processes, thread_count=cfg.threads, timeout=cfg.timeout, retries=0,
            number_sample_per_shard=cfg.samples_per_shard, incremental_mode="incremental",
            distributor=cfg.distributor, enable_wandb=False, user_agent_token=cfg.user_agent_token,
            disallowed_header_directives=list(OPT_OUT_DIRECTIVES),
        )


class ShardProgress:
    """One bar over the samples of img2dataset's shards, a shard counted when its stats file
    appears (its marker, as in img2dataset's incremental mode): successes, failures, images/s.
    A thread lists the folder every few seconds (every 30 on an object store, where a
    listing of 230,000 shards is some 230 requests) and reads only the new stats files.
    `done`: the samples of the shards finished before, whose stats files the first listing
    finds; None: counted from those files (a resumed retry round, whose folder is small)."""

    def __init__(self, output: str, total: int, done: int | None, file: TextIO, disable: bool):
        self.output, self.every = output, 2.0 if is_local(output) else 30.0
        self.bar = tqdm(total=total, initial=done or 0, unit="sample", desc="download", file=file, disable=disable,
                        dynamic_ncols=True)
        self.successes = self.failures = 0
        self.started = time.monotonic()
        # The shards finished before: in `done`, or counted by the first look. Should the first
        # listing fail, the first look that succeeds takes its place (the shards finished in
        # between then go uncounted: the bar is off, the job goes on).
        self.seen: set[str] | None = set() if disable or done is None else None
        if not disable:
            self.poll()
        self.successes = self.failures = 0  # the rate counts this run's shards only
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="download-progress", daemon=True)

    def __enter__(self) -> ShardProgress:
        if not self.bar.disable:  # no bar, no listings
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.bar.disable:
            self.stopped.set()
            self.thread.join()
            self.poll()
        self.bar.close()

    def _listing(self) -> list[str]:
        return list_files(self.output, "_stats.json", required=False)

    def _watch(self) -> None:
        while not self.stopped.wait(self.every):
            self.poll()

    def poll(self) -> None:
        try:
            listed = self._listing()
        except OSError:  # an object store's hiccup costs the bar one look, never the job
            return
        if self.seen is None:  # the first look at a folder whose finished shards are in `done`
            self.seen = set(listed)
            return
        for url in listed:
            if url in self.seen:
                continue
            try:
                stats = read_json(url)
            except (OSError, ValueError):  # written in place by img2dataset: the next look reads it whole
                continue
            self.seen.add(url)
            count, ok = int(stats.get("count", 0)), int(stats.get("successes", 0))
            self.successes += ok
            self.failures += count - ok
            self.bar.update(count)
        rate = self.successes / max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(f"ok={self.successes:,}, failed={self.failures:,}, images/s={rate:.1f}")


# ----- tasks: where per-file and per-shard work runs ---------------------------------------

_IN_FLIGHT = 1_000  # tasks handed out ahead of their results: 230,000 shards are not all queued at once


class Tasks:
    """fn(**kwargs) per call, as Ray tasks spread over the cluster's nodes (distributor ray)
    or in one pool of `processes` local processes (multiprocessing), results in completion
    order. A task's exception ends the job, the same exception either way; every task is
    idempotent (its marker is written last), so Ray may rerun one whose node died."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self.pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[..., dict], calls: list[dict]) -> Iterator[dict]:
        if not calls:
            return
        if self.cfg.distributor == "ray":
            yield from ray_tasks(fn, calls, _IN_FLIGHT, scheduling_strategy="SPREAD")
            return
        if self.pool is None:  # spawn, like img2dataset: forking a process that runs threads is unsafe
            self.pool = ProcessPoolExecutor(self.cfg.processes, mp_context=multiprocessing.get_context("spawn"))
        todo = iter(calls)
        pending = {self.pool.submit(fn, **kw) for kw in itertools.islice(todo, _IN_FLIGHT)}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                pending |= {self.pool.submit(fn, **kw) for kw in itertools.islice(todo, len(done))}
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _node_name() -> str:
    """The Ray node id inside a Ray task, else the host name: a record names who wrote it."""
    ray = sys.modules.get("ray")  # a Ray worker has it imported; importing it here would cost 1.2-1.7 s
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


# ----- per shard: sorted tar, record, retry candidates --------------------------------------

SHARD_FILES = (".tar", ".parquet", "_stats.json")  # img2dataset's stats file, its marker, last


def _shard_ids(output: str) -> list[int]:
    return sorted(int(u.rsplit("/", 1)[-1].split("_")[0]) for u in list_files(output, "_stats.json", required=False))


def record_url(output: str, shard: int) -> str:
    return join(output, STATE, "records", f"{shard:05d}.json")


def pending_url(output: str, shard: int) -> str:
    return join(output, STATE, "pending", f"{shard:05d}.parquet")


def _reasons(status: pa.Array, messages: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(reason, kind) per attempt; 'success' for both when it succeeded. Classifies each
    distinct message once (a shard repeats a few messages many times)."""
    messages = pc.fill_null(messages.cast(pa.string()), "")
    distinct = pc.unique(messages)
    labels = [classify(m) for m in distinct.to_pylist()]
    where = pc.index_in(messages, distinct)
    success = pc.equal(status, "success")
    return (pc.if_else(success, "success", pa.array([r for r, _ in labels], pa.string()).take(where)),
            pc.if_else(success, "success", pa.array([k for _, k in labels], pa.string()).take(where)))


def _counts(values: pa.Array) -> dict:
    return {str(v): int(n) for v, n in zip(*(pc.value_counts(values).flatten())) if v is not None}


def finish_shard(output: str, shard: int, extra: list[str], origin: dict | None) -> dict:
    """A finished shard's work after img2dataset, in the task that runs it: its tar
    rewritten in key order (temp name, then rename), its transient failures written to
    `_amused/pending/`, then its record under `_amused/records/` (the marker, last), which
    this returns. `origin` names the retry round and group of a retried shard: its input
    holds each sample's earlier attempts and failure reason, which this shard's attempt
    supersedes. A damaged tar is left as it is and gets no record; the result then names
    it and the files whose deletion makes a rerun fetch it again: img2dataset's
    incremental mode redoes an input file's shard whose stats file is missing; the samples
    of a retry round's shard go back to their earlier failure, which `--retry-failed`
    retries."""
    marker = record_url(output, shard)
    if file_exists(marker):
        return read_json(marker)
    started = time.monotonic()
    fs, _ = url_to_fs(output)
    name = join(output, f"{shard:05d}")
    try:
        with fs.open(url_to_fs(name + ".tar")[1], "rb") as src, atomic_writer(name + ".tar") as dst:
            members = sort_shard(src, dst)
    except tarfile.TarError as exc:
        files = " ".join(name + suffix for suffix in SHARD_FILES)
        return {"shard": shard, "damaged": f"{name}.tar: {exc} (to fetch it again, delete {files} and rerun amused "
                                           f"download{' --retry-failed' if origin else ''})"}
    table = pq.read_table(url_to_fs(name + ".parquet")[1], filesystem=fs,
                          columns=["key", "status", "error_message", "url", "caption", *extra])
    supersedes: dict = {}
    attempts = pa.array(np.ones(table.num_rows, np.int64))
    if origin:
        tried = pq.read_table(url_to_fs(_group_url(output, origin["plan"], origin["group"]))[1], filesystem=fs,
                              columns=["attempts", "reason"])
        # img2dataset's key is the shard number, then the row's index in its input file
        # (as many digits as samples_per_shard - 1 has): that row holds the earlier attempts.
        digits = math.ceil(math.log10(origin["samples_per_shard"]))
        rows = pa.array([int(k) % 10 ** digits for k in table.column("key").to_pylist()], pa.int64())
        earlier = tried.take(rows)
        attempts = pc.add(earlier.column("attempts"), 1)
        supersedes = _counts(earlier.column("reason"))
    reason, kind = _reasons(table.column("status"), table.column("error_message"))
    transient = pc.equal(kind, "transient")
    retry = table.select(["url", "caption", *extra]).append_column("attempts", attempts) \
        .append_column("reason", reason).filter(transient)
    if retry.num_rows:
        with atomic_writer(pending_url(output, shard)) as fh:
            pq.write_table(retry, fh)
    outcomes = _counts(reason)
    record = {"shard": shard, "round": int(origin["plan"].split("-")[1]) + 1 if origin else 0,
              "origin": origin, "members": members, "samples": table.num_rows,
              "successes": outcomes.pop("success", 0), "failures": outcomes,
              "pending": _counts(retry.column("attempts")), "supersedes": supersedes,
              "duration": read_json(name + "_stats.json")["duration"],
              "node": _node_name(), "seconds": round(time.monotonic() - started, 3)}
    write_json_atomic(marker, record)
    return record


def land_shard(output: str, staged: str, shard: int, extra: list[str], origin: dict) -> dict:
    """A retry round's finished shard moved from its staging folder to shard number `shard`
    (tar and metadata first, the stats file last), then finished there. The staging stats
    file is copied, not moved: it stays img2dataset's marker there, so a round resumed
    after a crash does not fetch its landed shards again."""
    fs, _ = url_to_fs(output)
    target = join(output, f"{shard:05d}")
    if not file_exists(target + "_stats.json"):
        for suffix in SHARD_FILES[:-1]:
            if file_exists(staged + suffix):
                fs.mv(url_to_fs(staged + suffix)[1], url_to_fs(target + suffix)[1])
        fs.copy(url_to_fs(staged + "_stats.json")[1], url_to_fs(target + "_stats.json")[1])
    return finish_shard(output, shard, extra, origin)


def write_group(output: str, dest: str, sources: list[list[int]], below: int, extra: list[str]) -> dict:
    """One retry input file: each source shard's pending samples with at least its `lo`
    and fewer than `below` attempts ([shard, lo] pairs), in source order."""
    fs, _ = url_to_fs(output)
    tables = []
    for shard, lo in sources:
        t = pq.read_table(url_to_fs(pending_url(output, shard))[1], filesystem=fs,
                          columns=["url", "caption", *extra, "attempts", "reason"])
        a = t.column("attempts")
        tables.append(t.filter(pc.and_(pc.greater_equal(a, lo), pc.less(a, below))))
    table = pa.concat_tables(tables)
    with atomic_writer(dest) as fh:
        pq.write_table(table, fh)
    return {"rows": table.num_rows}


# ----- driver: merging records ---------------------------------------------------------------

CACHE = "records.parquet"  # every record known at the end of a run, in one object


def _plans(output: str) -> list[tuple[str, dict]]:
    """(name, plan) of every retry round, oldest first."""
    plans = []
    for url in list_files(join(output, STATE, "retry-*", "plan.json"), ".json", required=False):
        plan = read_json(url)
        if "groups" not in plan:  # rounds before per-shard records kept no groups: their shards cannot be traced
            raise ValueError(f"{url}: a retry round of an older amused download, whose shards this version cannot "
                             f"trace to their samples' earlier attempts; summarise or retry this folder with the "
                             f"version that wrote it, or download into a new folder")
        plans.append((url.rsplit("/", 2)[-2], plan))
    return plans


def _group_url(output: str, plan: str, group: int) -> str:
    return join(output, STATE, plan, "input", f"{group:05d}.parquet")


def _origin(shard: int, plans: list[tuple[str, dict]]) -> dict | None:
    """The retry round and group whose shard `shard` is (the newest round's, should a
    number be reused after a damaged shard was deleted), or None for an input file's."""
    for name, plan in reversed(plans):
        group = shard - plan["first_shard"]
        if 0 <= group < len(plan["groups"]):
            return {"plan": name, "group": group, "samples_per_shard": plan["samples_per_shard"]}
    return None


def _read_cache(output: str) -> dict[int, dict]:
    url = join(output, STATE, CACHE)
    if not file_exists(url):
        return {}
    fs, path = url_to_fs(url)
    t = pq.read_table(path, filesystem=fs)
    return dict(zip(t.column("shard").to_pylist(), map(json.loads, t.column("record").to_pylist())))


def shard_records(cfg: DownloadConfig, extra: list[str], tasks: Tasks, known: dict[int, dict] | None = None
                  ) -> dict[int, dict]:
    """The record of every finished shard, finishing (as tasks) those without one.

    One listing of the output and one of `_amused/records/`, then the records from `known`
    or the one-object cache `_amused/records.parquet` that each run leaves: a rerun over
    230,000 finished shards reads one object, not 230,000. Only a record whose file is
    listed counts, so deleting a record makes its shard be finished again. A damaged shard
    raises, after every intact one is finished and cached."""
    shards = _shard_ids(cfg.output)
    listed = {int(u.rsplit("/", 1)[-1].removesuffix(".json"))
              for u in list_files(join(cfg.output, STATE, "records"), ".json", required=False)}
    cached = _read_cache(cfg.output) if known is None else known
    records = {s: cached[s] for s in shards if s in listed and s in cached}
    plans = _plans(cfg.output)
    calls = [{"output": cfg.output, "shard": s, "extra": extra, "origin": _origin(s, plans)}
             for s in shards if s not in records]
    damaged = {}
    for result in tasks.map(finish_shard, calls):
        if "damaged" in result:
            damaged[result["shard"]] = result["damaged"]
        else:
            records[result["shard"]] = result
    records = dict(sorted(records.items()))
    if records != cached:
        with atomic_writer(join(cfg.output, STATE, CACHE)) as fh:
            pq.write_table(pa.table({"shard": pa.array(list(records), pa.int32()),
                                     "record": [json.dumps(r, sort_keys=True) for r in records.values()]}), fh)
    if damaged:
        raise ShardFormatError(f"{len(damaged)} damaged finished shard(s) left as they are, the others sorted: "
                               + "; ".join(damaged[s] for s in sorted(damaged)))
    return records


def merge(output: str, records: dict[int, dict], policy_rejected: dict) -> DownloadSummary:
    """The summary from the shards' records: each sample counted once, in its last attempt
    (a retried shard's record names the earlier failures its attempts supersede)."""
    kinds = dict((name, kind) for name, kind, _ in _REASONS)
    summary = DownloadSummary(output=output, policy_rejected=policy_rejected)
    failures: Counter = Counter()
    for shard in sorted(records):
        r = records[shard]
        summary.shards += 1
        summary.seconds += r["duration"]
        summary.samples += r["samples"] - sum(r["supersedes"].values())
        summary.successes += r["successes"]
        failures.update(r["failures"])
        failures.subtract(r["supersedes"])
    summary.failures = {reason: n for reason, n in failures.items() if n}
    summary.transient_pending = sum(n for reason, n in summary.failures.items()
                                    if kinds.get(reason) == "transient")
    return summary


# ----- retries -----------------------------------------------------------------------------

def retry_groups(records: dict[int, dict], plans: list[tuple[str, dict]], below: int, per_shard: int
                 ) -> list[list[list[int]]]:
    """The next round's input files, as [[source shard, lo], ...] per file: consecutive
    shards whose pending samples (at least lo, fewer than `below` attempts) fit one shard.
    A shard's pending samples with fewer attempts than an earlier round's limit were taken
    by that round, if the round's shard holding them landed (has its record)."""
    taken: dict[int, int] = {}
    for name, plan in plans:
        for group, sources in enumerate(plan["groups"]):
            landed = records.get(plan["first_shard"] + group)
            if landed and landed["origin"] and (landed["origin"]["plan"], landed["origin"]["group"]) == (name, group):
                for shard, _ in sources:
                    taken[shard] = max(taken.get(shard, 0), plan["below"])
    groups: list[list[list[int]]] = []
    room = 0
    for shard, record in records.items():
        lo = taken.get(shard, 0)
        n = sum(count for attempts, count in record["pending"].items() if lo <= int(attempts) < below)
        if not n:
            continue
        if n > room:
            groups.append([])
            room = per_shard
        groups[-1].append([shard, lo])
        room -= n
    return groups


def _retry_round(cfg: DownloadConfig, extra: list[str], records: dict[int, dict], inputs: int, tasks: Tasks
                 ) -> tuple[int, dict[int, dict]]:
    """One retry round (or the unfinished one a crash left): (samples it tried, records of
    the shards it landed). Its plan is written after its input files, its done.json after
    its shards landed."""
    plans = _plans(cfg.output)
    unfinished = [(n, p) for n, p in plans if not file_exists(join(cfg.output, STATE, n, "done.json"))]
    if unfinished:
        name, plan = unfinished[0]
    else:
        groups = retry_groups(records, plans, cfg.max_attempts, cfg.samples_per_shard)
        if not groups:
            return 0, {}
        name = f"retry-{len(plans):03d}"
        fs, input_dir = url_to_fs(join(cfg.output, STATE, name, "input"))
        if fs.exists(input_dir):  # a crash before the plan: its input files may not be this plan's
            fs.rm(input_dir, recursive=True)
        calls = [{"output": cfg.output, "dest": _group_url(cfg.output, name, g), "sources": sources,
                  "below": cfg.max_attempts, "extra": extra} for g, sources in enumerate(groups)]
        rows = sum(r["rows"] for r in tasks.map(write_group, calls))
        # Never an input file's number, even one img2dataset finished no shard of: a rerun fetches it there.
        plan = {"first_shard": max(inputs, max(records, default=-1) + 1), "groups": groups, "below": cfg.max_attempts,
                "samples_per_shard": cfg.samples_per_shard, "samples": rows}
        write_json_atomic(join(cfg.output, STATE, name, "plan.json"), plan)
    base = join(cfg.output, STATE, name)
    staging = join(base, "out")
    # A round resumed after a crash shows its whole size, the shards it had finished counted from their stats.
    run_img2dataset(join(base, "input"), staging, extra, cfg, plan["samples"])
    calls = [{"output": cfg.output, "staged": join(staging, f"{g:05d}"), "shard": plan["first_shard"] + g,
              "extra": extra, "origin": {"plan": name, "group": g, "samples_per_shard": plan["samples_per_shard"]}}
             for g in _shard_ids(staging)]
    landed = {r["shard"]: r for r in tasks.map(land_shard, calls) if "damaged" not in r}
    write_json_atomic(join(base, "done.json"), {"landed": sorted(landed)})
    return plan["samples"], landed


# ----- the stage ---------------------------------------------------------------------------

def download(cfg: DownloadConfig) -> DownloadSummary:
    """Downloads what is missing (and with `retry_failed`, what failed transiently)."""
    with ray_session(cfg.ray_address) if cfg.distributor == "ray" else contextlib.nullcontext():
        tasks = Tasks(cfg)
        try:
            return _download(cfg, tasks)
        finally:
            tasks.close()


def _download(cfg: DownloadConfig, tasks: Tasks) -> DownloadSummary:
    files = list_files(cfg.input, ".parquet")
    checked = join(cfg.output, STATE, "input")
    rejected: Counter = Counter()
    extra = list(EXTRA_COLUMNS)
    rows: dict[int, int] = {}
    calls = [{"source": source, "dest": join(checked, f"{i:05d}.parquet"), "allow": cfg.allow()}
             for i, source in enumerate(files)]
    for result in tasks.map(prepare_task, calls):
        rejected.update(result["rejected"])
        extra = [c for c in extra if c in result["columns"]]
        rows[int(result["dest"].rsplit("/", 1)[-1].split(".")[0])] = result["rows"]
    largest = max(rows.values(), default=0)
    if largest > cfg.samples_per_shard:
        raise ValueError(f"an input file has {largest} rows > samples_per_shard {cfg.samples_per_shard}; "
                         f"raise it, or filter with --rows-per-shard {cfg.samples_per_shard}")
    started = time.monotonic()
    finished = set(_shard_ids(cfg.output))  # input file i becomes shard i
    run_img2dataset(checked, cfg.output, extra, cfg, sum(rows.values()),
                    sum(n for i, n in rows.items() if i in finished))
    records = shard_records(cfg, extra, tasks)
    while cfg.retry_failed:
        tried, landed = _retry_round(cfg, extra, records, len(files), tasks)
        if not tried:
            break
        records = shard_records(cfg, extra, tasks, {**records, **landed})
    summary = merge(cfg.output, records, dict(rejected))
    summary.unfinished_inputs = [i for i in range(len(files)) if i not in records]
    write_json_atomic(join(cfg.output, STATE, SUMMARY),
                      {**dataclasses.asdict(summary), "wall_seconds": time.monotonic() - started})
    return summary
