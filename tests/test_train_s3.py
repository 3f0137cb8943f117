"""Checkpoints on object storage (the S3 test server on 127.0.0.1, tests/conftest.py):
published from a local copy with the marker last, read back through a node's local copy,
pruned remotely, and a 2-rank training killed during an upload, every local copy
deleted, resumed on 1 rank with the losses of an uninterrupted run; a 2-rank resume
whose ranks have a scratch each (a node each) fetches each rank's share only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import s3fs
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from amused.demo.datasets import write_token_dataset
from amused.plumbing.storage import SCRATCH_ENV, join
from amused.training.checkpoint import (
    EMA_WEIGHTS,
    MARKER,
    MODEL_STATES,
    TRAINER,
    CheckFailed,
    Checkpoint,
    Publisher,
    local_copy,
    newest_intact,
    publish,
    step_folder,
    tag,
)
from tests.s3proxy import S3Proxy
from tests.samples import kill_launch
from tests.test_train_dist import LOSS_RTOL, STEPS, losses, torchrun, write_config


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """This test's node-local scratch: empty, as on a fresh node."""
    path = tmp_path / "scratch"
    monkeypatch.setenv(SCRATCH_ENV, str(path))
    return path


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _write_step(run_dir: str, step: int, size: int = 1000) -> Path:
    """A step's files in its local copy, as a one-rank training writes them."""
    folder = local_copy(step_folder(run_dir, step))
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((size,), float(step))}, str(folder / EMA_WEIGHTS))
    torch.save({"module": {"w": torch.full((size,), -float(step))}}, folder / MODEL_STATES)
    (folder / TRAINER).write_text(json.dumps({"step": step}))
    (folder / "rng" / "rank_00000.json").write_text(json.dumps({"step": step}))
    return folder


def _objects(url: str) -> dict[str, bytes]:
    fs = s3fs.S3FileSystem()
    root = url.removeprefix("s3://").rstrip("/")
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def _gets(proxy: S3Proxy, name: str) -> int:
    return sum(1 for line in proxy.lines if line.startswith("GET ") and line.endswith(name))


def _flip_a_byte_remote(url: str) -> None:
    fs = s3fs.S3FileSystem()
    data = bytearray(fs.cat_file(url))
    data[len(data) // 2] ^= 1
    fs.pipe_file(url, bytes(data))


def test_the_marker_is_written_last_with_every_files_checksum(s3_bucket, s3_faults, scratch, one_rank):
    run = f"{s3_bucket}/marker-last"
    folder = _write_step(run, 8)
    publisher = Publisher(run, keep=3, asynchronous=True)
    publisher.submit(8)
    publisher.wait()
    puts = [line.split()[-1] for line in s3_faults.lines if line.startswith("PUT ")]
    step8 = [p for p in puts if tag(8) in p]
    assert step8[-1].endswith(f"{tag(8)}/{MARKER}") and len(step8) == 5  # 4 files, then the marker
    assert puts.index(step8[-1]) == max(puts.index(p) for p in step8)
    assert puts[-1].endswith("checkpoints/latest.json")
    marker = json.loads(_objects(step_folder(run, 8))[MARKER])
    assert set(marker["files"]) == {EMA_WEIGHTS, MODEL_STATES, TRAINER, "rng/rank_00000.json"}
    for name, entry in marker["files"].items():
        assert entry["size"] == (folder / name).stat().st_size


def test_a_remote_checkpoint_reads_through_a_checked_local_copy(s3_faults, scratch, one_rank):
    run = "s3://amused-test/reader"
    _write_step(run, 2)
    Publisher(run, keep=3, asynchronous=False).submit(2)
    shutil.rmtree(scratch)  # another node: nothing local

    latest = Checkpoint.latest(run)
    assert (latest.step, latest.folder, latest.run_dir) == (2, step_folder(run, 2), run)
    assert Checkpoint.at(latest.folder) == latest and [c.step for c in Checkpoint.every(run)] == [2]
    s3_faults.reset_counts()
    path = latest.weights(ema=True)
    assert path == local_copy(latest.folder) / EMA_WEIGHTS and path.is_relative_to(scratch)
    assert _gets(s3_faults, EMA_WEIGHTS) == 1
    assert latest.state_dict(ema=True)["w"][0].item() == 2.0
    assert Checkpoint.at(latest.folder).weights(ema=True) == path
    assert _gets(s3_faults, EMA_WEIGHTS) == 1  # downloaded once: a matching local copy is reused

    _flip_a_byte_remote(join(latest.folder, MODEL_STATES))
    with pytest.raises(ValueError, match=f"checkpoint file {join(latest.folder, MODEL_STATES)}: damaged, sha256"):
        latest.weights(ema=False)
    assert not local_copy(latest.folder).joinpath(MODEL_STATES).exists()  # nothing damaged is kept


def test_a_resume_that_cannot_fetch_a_checkpoint_sets_nothing_aside_and_can_retry(
        s3_bucket, scratch, one_rank, monkeypatch, tmp_path):
    run = f"{s3_bucket}/unfetchable"
    for step in (2, 4):
        _write_step(run, step)
        Publisher(run, keep=3, asynchronous=False).submit(step)
    shutil.rmtree(scratch)
    (tmp_path / "full").write_text("")
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "full" / "scratch"))  # no local copy can be written
    with pytest.raises(CheckFailed, match=f"could not check checkpoint {step_folder(run, 4)} .*nothing was set aside"):
        newest_intact(run, lambda fn, *args: fn(*args))  # one rank decides for itself
    assert Checkpoint.latest(run).step == 4 and not s3fs.S3FileSystem().exists(f"{run}/checkpoints/damaged")
    monkeypatch.setenv(SCRATCH_ENV, str(scratch))
    assert newest_intact(run, lambda fn, *args: fn(*args)) == {"step": 4}  # the retry


def _read_model_states(rank: int, url: str, barrier) -> None:
    barrier.wait()
    Checkpoint.at(url).weights(ema=False)


def test_the_ranks_of_a_node_download_a_file_they_all_read_once(s3_faults, scratch, one_rank):
    run = "s3://amused-test/shared-read"
    _write_step(run, 2, size=4 << 20)
    Publisher(run, keep=3, asynchronous=False).submit(2)
    shutil.rmtree(scratch)
    s3_faults.reset_counts()
    mp.spawn(_read_model_states, args=(step_folder(run, 2), mp.get_context("spawn").Barrier(2)), nprocs=2)
    assert _gets(s3_faults, MODEL_STATES) == 1
    assert (local_copy(step_folder(run, 2)) / MODEL_STATES).stat().st_size > 16 << 20


def test_a_partial_upload_never_counts_and_a_resume_removes_it(s3_bucket, scratch, one_rank, capsys):
    run = f"{s3_bucket}/partial"
    _write_step(run, 2)
    Publisher(run, keep=3, asynchronous=False).submit(2)
    folder = _write_step(run, 4)
    publish(folder, step_folder(run, 4), [EMA_WEIGHTS, MODEL_STATES])  # killed before the rest and the marker
    assert Checkpoint.latest(run).step == 2
    with pytest.raises(ValueError, match="is not a complete training checkpoint"):
        Checkpoint.at(step_folder(run, 4))
    shutil.rmtree(scratch)
    assert newest_intact(run, lambda fn, *args: fn(*args)) == {"step": 2}
    assert f"removed checkpoint folders a crash left incomplete: {tag(4)}" in capsys.readouterr().err
    assert not _objects(step_folder(run, 4))


def test_a_failed_upload_names_the_file_and_leaves_no_marker(s3_server, scratch, one_rank):
    run = "s3://no-such-bucket/run"
    _write_step(run, 2)
    publisher = Publisher(run, keep=3, asynchronous=True)
    publisher.submit(2)
    with pytest.raises(RuntimeError, match=f"checkpoint {step_folder(run, 2)} was not saved .*"
                                           f"{join(step_folder(run, 2), EMA_WEIGHTS)}: upload failed"):
        publisher.wait()
    publisher.wait()  # raised once


def test_pruning_removes_remote_objects_and_local_copies(s3_bucket, s3_faults, scratch, one_rank):
    run = f"{s3_bucket}/prune"
    publisher = Publisher(run, keep=2, asynchronous=True)
    for step in (2, 4, 6):
        _write_step(run, step)
        publisher.submit(step)
    publisher.wait()
    # The marker goes first: a pruning cut short leaves an incomplete folder, not a "complete" one missing files.
    removals = [line for line in s3_faults.lines if line.startswith(("DELETE", "DELETE_MANY"))]
    assert removals[0].startswith("DELETE ") and removals[0].endswith(f"{tag(2)}/{MARKER}"), removals
    assert sorted(_objects(f"{run}/checkpoints")) == sorted(
        [f"{tag(s)}/{n}" for s in (4, 6) for n in (EMA_WEIGHTS, MODEL_STATES, TRAINER, "rng/rank_00000.json", MARKER)]
        + ["latest.json"])
    assert sorted(p.name for p in local_copy(f"{run}/checkpoints").iterdir()) == [tag(4), tag(6)]


def test_after_an_error_the_checkpoint_in_flight_still_gets_its_marker(s3_bucket, scratch, one_rank, capsys):
    run = f"{s3_bucket}/settle"
    _write_step(run, 2, size=1 << 20)
    publisher = Publisher(run, keep=3, asynchronous=True)
    publisher.submit(2)
    publisher.settle()  # what the loop does on its way out with an error
    assert Checkpoint.latest(run).step == 2
    missing = f"{s3_bucket}-missing/settle"  # no such bucket
    _write_step(missing, 4)
    publisher = Publisher(missing, keep=3, asynchronous=True)
    publisher.submit(4)
    publisher.settle()  # its failure is noted; the loop's error is the one raised
    assert f"note: checkpoint {step_folder(missing, 4)} was not saved" in capsys.readouterr().err


def test_async_and_sync_publish_the_same_files(s3_bucket, scratch, one_rank):
    markers = {}
    for mode in (True, False):
        run = f"{s3_bucket}/same-{mode}"
        publisher = Publisher(run, keep=5, asynchronous=mode)
        for step in (2, 4):
            _write_step(run, step)
            publisher.submit(step)
        publisher.wait()
        markers[mode] = {k: v for k, v in _objects(f"{run}/checkpoints").items()}
    assert markers[True].keys() == markers[False].keys()
    assert markers[True] == markers[False]  # the same bytes, the markers' checksums included


# ---------------------------------------------------------------- a training killed during an upload

class _HoldUploads(S3Proxy):
    """A proxy that holds every upload `hold(request line)` picks (the client waits for its
    answer) until `released`, then drops it: an upload in flight for as long as a test needs."""

    def __init__(self, upstream: str, hold):
        self.hold, self.held, self.released = hold, 0, threading.Event()
        super().__init__(upstream)

    def _decide(self, line: str, op: str) -> str | None:
        if op == "PUT" and self.hold(line):
            with self.lock:
                self.held += 1
            self.released.wait()
            return "reset"
        return super()._decide(line, op)


def _remote_metrics(run_dir: str) -> dict[int, dict]:
    text = s3fs.S3FileSystem().cat_file(join(run_dir, "metrics.jsonl").removeprefix("s3://")).decode()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert len({r["step"] for r in lines}) == len(lines), "a step was logged twice"
    return {r["step"]: r for r in lines}


def _kill_during_upload_then_resume_on_one_rank(tmp_path, s3_proxy, s3_bucket, steps: int, every: int):
    """A 2-rank run on S3 SIGKILLed while rank 1 uploads checkpoint 2 x `every` (rank 0's
    files of it already stored), every local copy deleted, resumed on 1 rank; and the
    same run uninterrupted on a local folder. Their losses, and the resume's output."""
    dataset = str(tmp_path / "tokens")
    write_token_dataset(dataset, [300, 200, 150])
    run_dir = f"{s3_bucket}/killed-{tmp_path.name}"
    over = {"steps": steps, "checkpoint": {"every": every, "keep": 5}}
    straight = subprocess.Popen(torchrun(2, write_config(tmp_path, "straight", dataset, **over)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cut = tag(2 * every)
    proxy = _HoldUploads(f"http://{s3_proxy.upstream}",
                         lambda line: cut in line and ("rank_1_" in line or "rank_00001" in line))
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, SCRATCH_ENV: str(tmp_path / "scratch-killed")}
    config = write_config(tmp_path, "killed", dataset, run_dir=run_dir, **over)
    killed = subprocess.Popen(torchrun(2, config), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    fs = s3fs.S3FileSystem()
    cut_folder = step_folder(run_dir, 2 * every).removeprefix("s3://")
    try:
        deadline = time.monotonic() + 400
        # Rank 0 uploads its files in name order, its ZeRO partition last: all of them, then.
        while not (proxy.held and any("zero_pp_rank_0" in p for p in fs.find(cut_folder))) \
                and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        running = killed.poll() is None
        kill_launch(killed)
    finally:
        proxy.released.set()
        proxy.close()
    assert running and proxy.held, "the run did not reach the upload to interrupt"
    stored = {p.rpartition(f"{cut}/")[2] for p in fs.find(cut_folder)}
    assert MARKER not in stored and "mp_rank_00_model_states.pt" in stored  # rank 0's part only
    assert not any("rank_1_" in name or "rank_00001" in name for name in stored)
    shutil.rmtree(tmp_path / "scratch-killed")  # a fresh cluster: no local copies anywhere
    with pytest.MonkeyPatch.context() as env:
        # What a launch on 3 ranks would have left in the resuming node's local copy, listed by no
        # marker: the universal conversion must not see it (it counts the ZeRO partitions it finds).
        env.setenv(SCRATCH_ENV, str(tmp_path / "scratch-resume"))
        stale = local_copy(step_folder(run_dir, every)) / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by another launch")

    resume = subprocess.run(torchrun(1, write_config(tmp_path, "killed", dataset, run_dir=run_dir,
                                                     data__micro_batch_size=16, **over)),
                            env={**os.environ, SCRATCH_ENV: str(tmp_path / "scratch-resume")},
                            capture_output=True, text=True, timeout=600)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    assert straight.wait(timeout=600) == 0
    return _remote_metrics(run_dir), losses(tmp_path / "straight"), resume.stdout + resume.stderr, run_dir


def _check_exact_resume(steps: int, every: int, result) -> None:
    metrics, want, output, run_dir = result
    got = {step: r["loss"] for step, r in metrics.items()}
    # The line after a checkpoint says how long the loop stood still for it; the others have no such key.
    assert metrics[2 * every + 1]["checkpoint_s"] > 0 and "checkpoint_s" not in metrics[2 * every + 2]
    assert f"removed checkpoint folders a crash left incomplete: {tag(2 * every)}" in output
    assert f"resumed from step {every}" in output
    fs = s3fs.S3FileSystem()
    assert fs.exists(join(run_dir, "checkpoints", "universal", tag(every), MARKER).removeprefix("s3://"))
    assert Checkpoint.latest(run_dir).step == steps
    # Before the resume step: the same computation, bit for bit (the lines the killed run
    # had uploaded); after it, one rank sums what two did (test_train_dist.LOSS_RTOL).
    assert all(step in got for step in range(every + 1, steps + 1))
    for step, loss in got.items():
        if step <= every:
            assert loss == want[step], step
        else:
            assert loss == pytest.approx(want[step], rel=LOSS_RTOL), step


def test_killed_during_an_upload_resumes_exactly_on_a_fresh_cluster_with_fewer_ranks(tmp_path, s3_proxy, s3_bucket):
    steps, every = 12, 4
    _check_exact_resume(steps, every, _kill_during_upload_then_resume_on_one_rank(tmp_path, s3_proxy, s3_bucket,
                                                                                   steps, every))


@pytest.mark.slow
def test_killed_during_an_upload_resumes_exactly_the_full_length_run(tmp_path, s3_proxy, s3_bucket):
    steps, every = STEPS, 20
    _check_exact_resume(steps, every, _kill_during_upload_then_resume_on_one_rank(tmp_path, s3_proxy, s3_bucket,
                                                                                   steps, every))


def _torchrun_scratch_per_rank(nproc: int, config: Path, scratch_base: Path) -> list[str]:
    """`torchrun` whose every rank has a scratch of its own (as on one GPU per node)."""
    cmd = torchrun(nproc, config)
    module = cmd.index("-m", cmd.index("torch.distributed.run"))
    script = f'AMUSED_SCRATCH="{scratch_base}/rank$LOCAL_RANK" exec "$0" "$@"'
    return [*cmd[:module], "--no-python", "sh", "-c", script, sys.executable, *cmd[module:]]


def test_a_resume_on_as_many_ranks_downloads_each_ranks_share_only(tmp_path, s3_bucket):
    dataset = str(tmp_path / "tokens")
    write_token_dataset(dataset, [300, 200, 150])
    run_dir = f"{s3_bucket}/share-{tmp_path.name}"
    over = {"checkpoint": {"every": 4, "keep": 5}}
    for steps, scratch in ((4, "scratch-first"), (8, "scratch-resume")):
        done = subprocess.run(
            _torchrun_scratch_per_rank(2, write_config(tmp_path, "run", dataset, run_dir=run_dir, steps=steps, **over),
                                       tmp_path / scratch), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from step 4" in done.stdout + done.stderr
    with pytest.MonkeyPatch.context() as env:
        held = {}
        for rank in (0, 1):
            env.setenv(SCRATCH_ENV, str(tmp_path / "scratch-resume" / f"rank{rank}"))
            folder = local_copy(step_folder(run_dir, 4))
            held[rank] = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    # Every rank's DeepSpeed load reads the model states, its EMA load its piece of the EMA; the rest is each rank's own.
    assert held[1] == {MODEL_STATES, EMA_WEIGHTS, "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng/rank_00001.json",
                       "rng/rank_00001.safetensors"}
    assert MODEL_STATES in held[0] and EMA_WEIGHTS in held[0] and not any("rank_1" in n or "00001" in n for n in held[0])
