"""Object storage as it behaves: the stages behind a proxy that throttles (503 SlowDown),
fails (500), resets connections, loses answers and cuts bodies off still write the very
bytes of a fault-free run; one retry policy reaches every process; writes are never
seen half-done; and the number of LIST requests of a run does not grow with its shards."""

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import s3fs
import torch
from safetensors.torch import load_file

from amused.demo.datasets import write_shape_shards, write_token_dataset
from amused.pipeline.filter import REPORT, FilterConfig, filter_metadata
from amused.pipeline.pretokenize import PretokenizeConfig, pretokenize
from amused.plumbing.fsio import atomic_writer, exists, file_exists, list_files, read_json
from amused.plumbing.runlock import FolderLock
from amused.plumbing.storage import RETRY_POLICY, url_to_fs
from amused.training.checkpoint import EMA_WEIGHTS, MODEL_STATES
from amused.training.config import parse_config
from amused.training.uvit.task import train
from tests.s3proxy import Faults, S3Proxy
from tests.test_filter import RULES, laion_table

FAULTS = Faults(rate=0.15, seed=19)
FEW_REQUESTS = Faults(rate=0.3, seed=19)  # for a stage that makes few requests: still several faults
POLICY = {"mode": RETRY_POLICY["AWS_RETRY_MODE"], "total_max_attempts": int(RETRY_POLICY["AWS_MAX_ATTEMPTS"])}
ROOT = Path(__file__).resolve().parents[1]


def _client_retries() -> dict:
    return s3fs.S3FileSystem(skip_instance_cache=True).s3.meta.config.retries


def digests(url: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every object under `url`, by name relative to it."""
    fs, root = url_to_fs(url)
    return {p[len(root) + 1:]: hashlib.sha256(fs.cat_file(p)).hexdigest()
            for p in fs.find(root) if p.rsplit("/", 1)[-1] not in skip}


class Run:
    """What the proxy saw while `fn` ran: requests by kind, faults injected, seconds."""

    def __init__(self, proxy: S3Proxy, fn, faults: Faults | None = None):
        proxy.reset_counts()
        proxy.faults = faults
        started = time.monotonic()
        try:
            self.result = fn()
        finally:
            proxy.faults = None
        self.seconds = time.monotonic() - started
        self.requests = Counter(proxy.requests)
        self.injected = Counter({k: v for k, v in proxy.injected.items() if ":" not in k})

    def line(self, name: str) -> str:
        return (f"{name}: {sum(self.requests.values())} requests {dict(sorted(self.requests.items()))}, "
                f"{sum(self.injected.values())} faults {dict(sorted(self.injected.items()))}, {self.seconds:.1f} s")


def test_every_s3_client_gets_the_retry_policy(s3_server, ray_session):
    """The driver, a Ray worker and a process that never imports our code (as img2dataset's
    are) all make their S3 clients with the policy of amused.plumbing.storage."""
    assert _client_retries() == POLICY
    assert ray.get(ray.remote(_client_retries).remote()) == POLICY
    probe = "import json, s3fs; print(json.dumps(s3fs.S3FileSystem(skip_instance_cache=True).s3.meta.config.retries))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == POLICY


def test_workers_of_a_cluster_started_without_our_settings_get_them(s3_server):
    """On a real cluster the workers descend from `ray start`, not from our process: the
    job's runtime_env carries the retry policy and the listing-cache setting to them."""
    env = {k: v for k, v in os.environ.items() if k not in (*RETRY_POLICY, "FSSPEC_S3")}
    done = subprocess.run([sys.executable, "-m", "tests.storage_env_job"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["retries"] == POLICY
    assert json.loads(seen["env"]["FSSPEC_S3"]) == {"use_listings_cache": False}


def test_a_failed_write_leaves_nothing_a_write_is_one_put_and_a_marker_check_one_head(s3_faults, monkeypatch):
    bucket = "s3://amused-test/atomic"
    fs, root = url_to_fs(bucket)
    monkeypatch.setattr(fs, "default_block_size", 5 << 20)  # s3fs's smallest part, so a part goes out
    with pytest.raises(RuntimeError, match="stop"):
        with atomic_writer(f"{bucket}/big.bin") as fh:
            fh.write(b"x" * (6 << 20))
            assert fs.call_s3("list_multipart_uploads", Bucket="amused-test").get("Uploads")
            raise RuntimeError("stop")
    assert not fs.exists(f"{root}/big.bin")
    assert fs.call_s3("list_multipart_uploads", Bucket="amused-test").get("Uploads", []) == []
    s3_faults.reset_counts()
    with atomic_writer(f"{bucket}/small.bin") as fh:
        fh.write(b"done")
    assert dict(s3_faults.requests) == {"PUT": 1}
    assert fs.cat_file(f"{root}/small.bin") == b"done"
    s3_faults.reset_counts()
    assert file_exists(f"{bucket}/small.bin") and not file_exists(f"{bucket}/missing.json")
    assert dict(s3_faults.requests) == {"HEAD": 2}


# ---------------------------------------------------------------- stages under faults


def put_filter_input(url: str, files: int) -> None:
    for f in range(files):
        rows = [(f"https://example.org/{f}/{i}.jpg", f"picture {f}-{i}", {}, None) for i in range(10)]
        rows += [(f"https://example.org/{f}/dup.jpg", "a duplicate", {}, "duplicate_url"),
                 (f"https://example.org/{f}/small.jpg", "small", {"HEIGHT": 10.0}, "image_size")]
        with atomic_writer(f"{url}/{f:05d}.parquet") as fh:
            pq.write_table(laion_table(rows), fh)


def run_filter(proxy, src: str, out: str, faults=None) -> Run:
    cfg = FilterConfig(input=src, output=out, rows_per_shard=4, progress=False, **RULES)
    return Run(proxy, lambda: filter_metadata(cfg), faults)


def pretokenize_config(tiny_models, src: str, out: str) -> PretokenizeConfig:
    return PretokenizeConfig(input=src, output=out, vqgan=str(tiny_models / "vqgan"), text_encoder=str(tiny_models),
                             resolution=64, batch_size=4, progress=False)


def put_shape_shards(url: str, shards: int, local: Path) -> None:
    write_shape_shards(str(local), shards=shards, per_shard=3, seed=9)
    s3fs.S3FileSystem().put(str(local) + "/", url.removeprefix("s3://") + "/", recursive=True)


@pytest.fixture(scope="module")
def filter_clean(s3_proxy, s3_bucket, ray_session) -> tuple[str, Run]:
    put_filter_input(f"{s3_bucket}/f2/in", 2)
    return f"{s3_bucket}/f2", run_filter(s3_proxy, f"{s3_bucket}/f2/in", f"{s3_bucket}/f2/clean")


@pytest.fixture(scope="module")
def pretokenize_clean(s3_proxy, s3_bucket, ray_session, tiny_models, tmp_path_factory) -> tuple[str, Run]:
    put_shape_shards(f"{s3_bucket}/p2/in", 2, tmp_path_factory.mktemp("p2"))
    out = f"{s3_bucket}/p2/clean"
    return f"{s3_bucket}/p2", Run(s3_proxy, lambda: pretokenize(pretokenize_config(tiny_models, f"{s3_bucket}/p2/in",
                                                                                      out)))


def test_filter_under_faults_writes_the_fault_free_bytes(s3_proxy, filter_clean, capsys):
    base, clean = filter_clean
    faulty = run_filter(s3_proxy, f"{base}/in", f"{base}/faulty", FAULTS)
    with capsys.disabled():
        print("\n" + clean.line("filter fault-free") + "\n" + faulty.line("filter with faults"))
    assert sum(faulty.injected.values()) >= 5
    assert digests(f"{base}/faulty", skip=(REPORT,)) == digests(f"{base}/clean", skip=(REPORT,))
    want, got = read_json(f"{base}/clean/{REPORT}"), read_json(f"{base}/faulty/{REPORT}")
    assert got["total"] == want["total"] and got["files"] == want["files"]


def test_pretokenize_under_faults_writes_the_fault_free_bytes(s3_proxy, pretokenize_clean, tiny_models, capsys):
    base, clean = pretokenize_clean
    faulty = Run(s3_proxy, lambda: pretokenize(pretokenize_config(tiny_models, f"{base}/in", f"{base}/faulty")),
                 FEW_REQUESTS)
    with capsys.disabled():
        print("\n" + clean.line("pretokenize fault-free") + "\n" + faulty.line("pretokenize with faults"))
    assert faulty.result.ok and faulty.result.rows_written == clean.result.rows_written == 6
    assert sum(faulty.injected.values()) >= 5
    assert digests(f"{base}/faulty") == digests(f"{base}/clean")


def test_training_from_s3_under_faults_saves_the_fault_free_weights(s3_proxy, s3_bucket, tmp_path, capsys):
    dataset = f"{s3_bucket}/train-tokens"
    write_token_dataset(dataset, [24, 24])

    def run(name: str, faults):
        cfg = parse_config({
            "run_dir": str(tmp_path / name), "steps": 4, "seed": 0,
            "data": {"dataset": dataset, "global_batch_size": 8, "micro_batch_size": 8, "workers": 0},
            "model": {"preset": "tiny"}, "optim": {"lr": 1e-2, "warmup_steps": 1}, "ema": {"decay": 0.5},
            "checkpoint": {"every": 4}, "log": {"every": 4, "progress": False}})
        return Run(s3_proxy, lambda: Path(train(cfg).checkpoint), faults)

    # It reads ~10 objects: a high rate, so that several of them fail whatever their names.
    clean, faulty = run("clean", None), run("faulty", Faults(rate=0.5, seed=20))
    with capsys.disabled():
        print("\n" + clean.line("train fault-free") + "\n" + faulty.line("train with faults"))
    assert sum(faulty.injected.values()) >= 3
    assert (faulty.result / EMA_WEIGHTS).read_bytes() == (clean.result / EMA_WEIGHTS).read_bytes()
    want, got = (torch.load(r / MODEL_STATES, weights_only=True)["module"] for r in (clean.result, faulty.result))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert load_file(str(faulty.result / EMA_WEIGHTS)).keys() == load_file(str(clean.result / EMA_WEIGHTS)).keys()


# ---------------------------------------------------------------- listing calls per run


def test_filter_lists_as_often_for_three_times_the_files(s3_proxy, s3_bucket, filter_clean, capsys):
    put_filter_input(f"{s3_bucket}/f6/in", 6)
    _, small = filter_clean
    large = run_filter(s3_proxy, f"{s3_bucket}/f6/in", f"{s3_bucket}/f6/clean")
    with capsys.disabled():
        print(f"\nfilter LIST requests (one-name probes): 2 files -> {small.requests['LIST']} "
              f"({small.requests['LIST_PROBE']}), 6 files -> {large.requests['LIST']} ({large.requests['LIST_PROBE']})")
    # Both kinds: a one-name probe per missing marker is a listing per file too.
    assert (large.requests["LIST"], large.requests["LIST_PROBE"]) == (small.requests["LIST"],
                                                                       small.requests["LIST_PROBE"])


@pytest.mark.slow
def test_pretokenize_lists_as_often_for_three_times_the_shards(s3_proxy, s3_bucket, pretokenize_clean, tiny_models,
                                                               tmp_path, capsys):
    put_shape_shards(f"{s3_bucket}/p6/in", 6, tmp_path / "p6")
    _, small = pretokenize_clean
    large = Run(s3_proxy, lambda: pretokenize(pretokenize_config(tiny_models, f"{s3_bucket}/p6/in",
                                                                  f"{s3_bucket}/p6/clean")))
    with capsys.disabled():
        print(f"\npretokenize LIST requests (one-name probes): 2 shards -> {small.requests['LIST']} "
              f"({small.requests['LIST_PROBE']}), 6 shards -> {large.requests['LIST']} ({large.requests['LIST_PROBE']})")
    assert large.result.rows_written == 18
    assert (large.requests["LIST"], large.requests["LIST_PROBE"]) == (small.requests["LIST"],
                                                                       small.requests["LIST_PROBE"])


def test_a_listing_sees_what_another_process_wrote_after_it(s3_bucket):
    """A driver that listed a folder, then let its workers write there, lists it again."""
    url = f"{s3_bucket}/seen/_stats"
    with atomic_writer(f"{url}/00000.json") as fh:
        fh.write(b"{}")
    assert list_files(url, ".json") == [f"{url}/00000.json"]
    write = f"from amused.plumbing.fsio import atomic_writer\nwith atomic_writer('{url}/00001.json') as fh: fh.write(b'1')"
    subprocess.run([sys.executable, "-c", write], check=True, cwd=ROOT)
    assert list_files(url, ".json") == [f"{url}/00000.json", f"{url}/00001.json"]
    assert exists(f"{url}/00001.json")


def test_a_lock_whose_create_answer_was_lost_is_held_not_refused(s3_faults, s3_bucket):
    """The conditional PUT lands but its answer is lost; botocore's retry then finds the
    key taken (412), by this very process: the lock is ours, not another holder's."""
    url = f"{s3_bucket}/lost-answer/run.lock"
    s3_faults.faults = Faults(rate=0.99, seed=1, modes=("lost",), max_in_a_row=1)
    try:
        lock = FolderLock(url)
        lock.acquire()
    finally:
        s3_faults.faults = None
    assert s3_faults.injected["PUT:lost"] >= 1
    assert lock.mine is not None and exists(url)
    lock.release()
    assert not exists(url)
