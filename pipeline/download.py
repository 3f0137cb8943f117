"""`amused download`: filtered metadata Parquet in, img2dataset webdataset shards out.

reader -> policy -> img2dataset -> summary:

- Before img2dataset sees a URL, the URL policy of `pipeline.urls` runs again (the input
  need not come from `amused filter`), and rows get a sample key if they lack one. The
  checked copies live in `_amused/input/`, one file per input file, so input file i
  becomes shard i (`number_sample_per_shard` covers a whole file).
- img2dataset runs in its incremental mode: a shard counts as done once its
  `NNNNN_stats.json` exists, so a rerun fetches only the missing shards.
- img2dataset writes a shard's samples in the order their downloads finish, which
  differs between runs with several threads; every finished shard is then rewritten once
  in key order, so two clean downloads of the same input give the same shards.
- `retry_failed` gathers the samples whose last attempt failed transiently (timeout,
  DNS, connection, 429, 5xx), downloads them into a staging folder and moves the
  finished shards in under new numbers after the existing ones (tar and metadata
  first, the stats file last), never touching a finished shard.
- Every request img2dataset makes, first run or retry, goes through `pipeline.fetch_guard`
  with this run's policy: the URL, every redirect hop and every resolved address are
  judged before connecting (`resolve` pins names to addresses without DNS; a pinned
  address is judged like any DNS answer); a refusal is a permanent failure (`policy_url`,
  `policy_redirect`, `policy_address`) in the summary.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tarfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from amused.pipeline.fetch_guard import guarded_downloads
from amused.pipeline.politeness import OPT_OUT_DIRECTIVES, Politeness
from amused.pipeline.urls import AddressPolicy, normalize, parse_allow, parse_pins, sample_keys, scheme_allowed
from amused.pipeline.wds import ShardFormatError, sort_shard
from amused.plumbing.config import opt
from amused.plumbing.fsio import atomic_writer, exists, list_files, parquet_columns, read_json, write_json_atomic
from amused.plumbing.storage import join, url_to_fs

STATE = "_amused"
SUMMARY = "download.json"
# Carried from the filter output into every sample's json (when present).
EXTRA_COLUMNS = ("sample_key", "aesthetic_score", "similarity", "nsfw", "watermark", "language")

# (reason, class, pattern over img2dataset's error message), first match wins; the
# policy's messages quote the URL, so they come before the patterns a URL could contain.
_REASONS = (
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
    distributor: str = opt("multiprocessing", "img2dataset distributor: multiprocessing or ray")

    def __post_init__(self) -> None:
        for name in ("image_size", "samples_per_shard", "processes", "threads", "timeout", "max_attempts",
                     "domain_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be >= 1")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality: {self.encode_quality!r} must be a JPEG quality in 1..100")
        if self.distributor not in ("multiprocessing", "ray"):
            raise ValueError(f"distributor: {self.distributor!r}: expected multiprocessing or ray")
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
        return "\n".join(lines)


# ----- reader: checked copies of the input -------------------------------------------------

def prepare_input(source: str, dest: str, policy: AddressPolicy) -> dict:
    """Copies one metadata file with the URL policy applied and sample keys filled in."""
    counts_url = dest.removesuffix(".parquet") + ".json"
    if exists(counts_url):
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


# ----- worker: img2dataset -----------------------------------------------------------------

def run_img2dataset(url_list: str, output: str, extra: list[str], cfg: DownloadConfig) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports it; it would phone home
    # img2dataset pulls in torch and albumentations (+4 s on import); the CLI and the run
    # config import this module for DownloadConfig.
    from img2dataset import download as img2dataset_download

    with guarded_downloads(cfg.allow(), cfg.pins(), cfg.politeness()):
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


# ----- writer side: what is on disk --------------------------------------------------------

def _shard_ids(output: str) -> list[int]:
    return sorted(int(u.rsplit("/", 1)[-1].split("_")[0]) for u in list_files(output, "_stats.json", required=False))


def _attempts(output: str, extra: list[str] = ()) -> pa.Table:
    """Every recorded attempt of the finished shards: key, status, error, shard (+ `extra`)."""
    fs, _ = url_to_fs(output)
    columns = ["sample_key", "status", "error_message", *extra]
    tables = []
    for shard in _shard_ids(output):
        path = url_to_fs(join(output, f"{shard:05d}.parquet"))[1]
        t = pq.read_table(path, filesystem=fs, columns=columns)
        tables.append(t.append_column("shard", pa.array([shard] * len(t), pa.int32())))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns}).append_column(
            "shard", pa.array([], pa.int32()))
    return pa.concat_tables(tables, promote_options="permissive")


def final_states(attempts: pa.Table) -> pa.Table:
    """One row per sample key: its last attempt, with `attempts`, `reason` and `kind`.

    A sample is retried only while it has never succeeded, so its last attempt tells
    whether it ever did.
    """
    t = attempts.sort_by([("sample_key", "ascending"), ("shard", "ascending")])
    keys = t.column("sample_key").to_numpy(zero_copy_only=False)
    last = np.ones(len(keys), dtype=bool)
    last[:-1] = keys[1:] != keys[:-1]
    ends = np.flatnonzero(last)
    final = t.filter(pa.array(last)).append_column("attempts", pa.array(np.diff(ends, prepend=-1)))
    messages = pc.fill_null(final.column("error_message"), "")
    distinct = pc.unique(messages)
    labels = [classify(m) for m in distinct.to_pylist()]
    where = pc.index_in(messages, distinct)
    success = pc.equal(final.column("status"), "success")
    reason = pc.if_else(success, "success", pa.array([r for r, _ in labels], pa.string()).take(where))
    kind = pc.if_else(success, "success", pa.array([k for _, k in labels], pa.string()).take(where))
    return final.append_column("reason", reason).append_column("kind", kind)


def summarize(output: str, policy_rejected: dict) -> DownloadSummary:
    summary = DownloadSummary(output=output, policy_rejected=policy_rejected)
    for shard in _shard_ids(output):
        summary.shards += 1
        summary.seconds += read_json(join(output, f"{shard:05d}_stats.json"))["duration"]
    final = final_states(_attempts(output))
    summary.samples = final.num_rows
    for row in final.group_by(["reason", "kind"]).aggregate([("sample_key", "count")]).to_pylist():
        if row["reason"] == "success":
            summary.successes = row["sample_key_count"]
        else:
            summary.failures[row["reason"]] = row["sample_key_count"]
            if row["kind"] == "transient":
                summary.transient_pending += row["sample_key_count"]
    return summary


# ----- retries -----------------------------------------------------------------------------

def _retry_round(cfg: DownloadConfig, extra: list[str]) -> int:
    """One retry round (or the unfinished one a crash left); returns how many samples it tried."""
    fs, _ = url_to_fs(cfg.output)
    plans = list_files(join(cfg.output, STATE, "retry-*", "plan.json"), ".json", required=False)
    unfinished = [p for p in plans if not exists(p.replace("plan.json", "done.json"))]
    if unfinished:
        plan_url = unfinished[0]
        plan = read_json(plan_url)
    else:
        final = final_states(_attempts(cfg.output, ["url", "caption", *(c for c in extra if c != "sample_key")]))
        retry = final.filter(pc.and_(pc.equal(final.column("kind"), "transient"),
                                     pc.less(final.column("attempts"), cfg.max_attempts)))
        if not retry.num_rows:
            return 0
        base = join(cfg.output, STATE, f"retry-{len(plans):03d}")
        with atomic_writer(join(base, "input", "00000.parquet")) as fh:
            pq.write_table(retry.select(["url", "caption", *extra]), fh)
        plan_url = join(base, "plan.json")
        plan = {"first_shard": max(_shard_ids(cfg.output), default=-1) + 1, "samples": retry.num_rows}
        write_json_atomic(plan_url, plan)
    base = plan_url.rsplit("/", 1)[0]
    staging = join(base, "out")
    run_img2dataset(join(base, "input"), staging, extra, cfg)
    for shard in _shard_ids(staging):
        target = plan["first_shard"] + shard
        if exists(join(cfg.output, f"{target:05d}_stats.json")):
            continue
        for suffix in (".tar", ".parquet", "_stats.json"):  # the stats file, img2dataset's marker, last
            fs.mv(url_to_fs(join(staging, f"{shard:05d}{suffix}"))[1],
                  url_to_fs(join(cfg.output, f"{target:05d}{suffix}"))[1])
    write_json_atomic(join(base, "done.json"), {"moved_to": plan["first_shard"]})
    return plan["samples"]


def _sort_shards(output: str) -> None:
    """Rewrites each finished shard's tar in key order (temp name, then rename); a marker
    under `_amused/sorted/` written after it lets a rerun skip it. A damaged tar is left
    as it is, for a person to look at; every intact shard is still sorted, then one error
    names each damaged shard and the files whose deletion makes a rerun fetch it again:
    img2dataset's incremental mode redoes an input file's shard whose stats file is
    missing; the samples of a retry round's shard go back to their earlier failure, which
    `--retry-failed` retries."""
    fs, _ = url_to_fs(output)
    plans = list_files(join(output, STATE, "retry-*", "plan.json"), ".json", required=False)
    first_retried = min((read_json(p)["first_shard"] for p in plans), default=None)
    damaged = []
    for shard in _shard_ids(output):
        marker = join(output, STATE, "sorted", f"{shard:05d}.json")
        if exists(marker):
            continue
        url = join(output, f"{shard:05d}.tar")
        try:
            with fs.open(url_to_fs(url)[1], "rb") as src, atomic_writer(url) as dst:
                members = sort_shard(src, dst)
        except tarfile.TarError as exc:
            files = " ".join(join(output, f"{shard:05d}{suffix}") for suffix in (".tar", ".parquet", "_stats.json"))
            retried = first_retried is not None and shard >= first_retried
            damaged.append(f"{url}: {exc} (to fetch it again, delete {files} and rerun amused download"
                           f"{' --retry-failed' if retried else ''})")
        else:
            write_json_atomic(marker, {"members": members})
    if damaged:
        raise ShardFormatError(f"{len(damaged)} damaged finished shard(s) left as they are, the others sorted: "
                               + "; ".join(damaged))


# ----- the stage ---------------------------------------------------------------------------

def download(cfg: DownloadConfig) -> DownloadSummary:
    """Downloads what is missing (and with `retry_failed`, what failed transiently)."""
    files = list_files(cfg.input, ".parquet")
    policy = cfg.policy()
    checked = join(cfg.output, STATE, "input")
    rejected: dict[str, int] = {}
    extra = None
    for i, source in enumerate(files):
        counts = prepare_input(source, join(checked, f"{i:05d}.parquet"), policy)
        for rule, n in counts.items():
            rejected[rule] = rejected.get(rule, 0) + n
        names = parquet_columns(join(checked, f"{i:05d}.parquet"))
        extra = [c for c in EXTRA_COLUMNS if c in names] if extra is None else [c for c in extra if c in names]
    largest = max(pq.ParquetFile(url_to_fs(u)[1], filesystem=url_to_fs(u)[0]).metadata.num_rows
                  for u in list_files(checked, ".parquet"))
    if largest > cfg.samples_per_shard:
        raise ValueError(f"an input file has {largest} rows > samples_per_shard {cfg.samples_per_shard}; "
                         f"raise it, or filter with --rows-per-shard {cfg.samples_per_shard}")
    started = time.monotonic()
    run_img2dataset(checked, cfg.output, extra, cfg)
    if cfg.retry_failed:
        while _retry_round(cfg, extra):
            pass
    _sort_shards(cfg.output)
    summary = summarize(cfg.output, rejected)
    write_json_atomic(join(cfg.output, STATE, SUMMARY),
                      {**dataclasses.asdict(summary), "wall_seconds": time.monotonic() - started})
    return summary
