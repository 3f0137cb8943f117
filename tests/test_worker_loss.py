"""Restart on worker loss under Ray Train: a SIGKILLed worker process makes Ray Train
restart the worker group, which resumes from the newest complete checkpoint by itself;
after `max_failures` restarts the run stops naming its last good checkpoint; a rank's
deterministic error (training.launch.deterministic) is not retried. Ray Train's storage on
S3 is shown by tests/test_progress.py's Ray training, whose run folder is on S3.

One module fixture makes the runs the tests compare:
  killed     2 Ray Train workers; one is SIGKILLed once a checkpoint is complete
  reference  the killed run's resume checkpoint copied into a fresh folder, resumed
             there by 2 workers without a fault
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from ray._private import state as ray_state
from safetensors.torch import load_file

from amused.demo.datasets import write_token_dataset
from amused.training.checkpoint import MARKER, Checkpoint, tag
from amused.training.config import TrainConfig, parse_config
from amused.training.launch import train_on_ray
from tests.test_train_dist import losses

ROOT = Path(__file__).resolve().parents[1]

STEPS = 32
EVERY = 8
WORKERS = 2


def config(run_dir: Path | str, dataset: str, **over) -> TrainConfig:
    cfg = {
        "run_dir": str(run_dir), "steps": STEPS, "seed": 1,
        "data": {"dataset": dataset, "global_batch_size": 16, "micro_batch_size": 8, "workers": 0,
                 "window_rows": 64},
        "model": {"preset": "tiny"},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "schedule": "cosine"},
        "ema": {"decay": 0.9},
        "checkpoint": {"every": EVERY, "keep": STEPS // EVERY},
        "log": {"every": 1, "progress": False},
        **over,
    }
    return parse_config(cfg)


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(c.step for c in Checkpoint.every(run_dir))


def train_workers() -> list[dict]:
    """Ray Train's worker actors that this Ray has created, live or dead. From the GCS's
    actor table: the state API (ray.util.state) needs the dashboard, which the tests' Ray
    runs without."""
    return [a for a in ray_state.actors().values() if a["ActorClassName"] == "RayTrainWorker"]


def worker_pids() -> set[int]:
    """The live Ray Train worker processes (every test here runs one training at a time)."""
    return {a["Pid"] for a in train_workers() if a["State"] == "ALIVE" and a["Pid"]}


def workers_started() -> int:
    return len(train_workers())


def wait_for(what, timeout: float = 240.0, run: Future | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        if run is not None and run.done():
            run.result()  # its error, if any
            raise AssertionError("the run finished before the test could act on it")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what.__name__ if hasattr(what, '__name__') else what}")


def kill_one_worker(run: Future, spare: frozenset[int] = frozenset()) -> set[int]:
    """SIGKILLs one process of a full worker group none of whose processes is in `spare`
    (an earlier group's); returns the group's pids."""
    def group() -> set[int]:
        pids = worker_pids()
        return pids if len(pids) == WORKERS and not pids & spare else set()

    pids = wait_for(group, run=run)
    os.kill(min(pids), signal.SIGKILL)
    return pids


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("worker-loss") / "tokens")
    write_token_dataset(path, [300, 200, 150])
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset, ray_session) -> dict:
    folder = tmp_path_factory.mktemp("runs")
    killed = folder / "killed"
    out: dict = {"killed": killed}
    started = workers_started()
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(train_on_ray, config(killed, dataset, max_failures=2), WORKERS)
        first = killed / "checkpoints" / tag(EVERY) / MARKER
        wait_for(first.exists, run=run)
        out["complete_before_kill"] = complete_steps(killed)
        kill_one_worker(run)
        out["complete_after_kill"] = complete_steps(killed)
        out["still_running"] = not (killed / "checkpoints" / tag(STEPS) / MARKER).exists()
        out["result"] = run.result(timeout=600)
    out["workers_started"] = workers_started() - started

    resumed = out["result"].resumed_from
    reference = folder / "reference"
    shutil.copytree(killed / "checkpoints" / tag(resumed), reference / "checkpoints" / tag(resumed))
    out["reference"] = reference
    out["reference_result"] = train_on_ray(config(reference, dataset), WORKERS)
    return out


def test_a_killed_worker_is_replaced_and_the_run_finishes_from_its_last_checkpoint(runs):
    assert runs["still_running"], "the run finished before a worker could be killed"
    result = runs["result"]
    assert result.step == STEPS and result.checkpoint.endswith(tag(STEPS))
    # Ray Train started a second group of workers: one restart, no more.
    assert runs["workers_started"] == 2 * WORKERS
    # It resumed from the newest checkpoint complete when the worker died: one more may have
    # been completed between the test's first look and the kill, and one whose gather the victim
    # had finished may get its marker from rank 0 just after the test's second look.
    resumed, before, after = result.resumed_from, runs["complete_before_kill"], runs["complete_after_kill"]
    assert resumed % EVERY == 0 and max(before) <= resumed <= max(after) + EVERY, (resumed, before, after)
    assert sorted(losses(runs["killed"])) == list(range(1, STEPS + 1))


def test_the_restarted_run_equals_an_uninterrupted_run_from_the_same_checkpoint(runs):
    killed, reference = runs["killed"], runs["reference"]
    start = runs["result"].resumed_from
    assert runs["reference_result"].resumed_from == start and runs["reference_result"].step == STEPS
    a, b = losses(killed), losses(reference)
    assert sorted(b) == list(range(start + 1, STEPS + 1))
    assert {s: a[s] for s in b} == b  # the same ranks, so bit for bit
    final = Checkpoint.at(killed / "checkpoints" / tag(STEPS)), Checkpoint.at(reference / "checkpoints" / tag(STEPS))
    for ema in (False, True):
        x, y = (c.state_dict(ema) for c in final)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"ema={ema}"
    x, y = (load_file(str(Path(c.folder) / "rng" / "rank_00001.safetensors")) for c in final)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_after_max_failures_the_run_stops_naming_its_last_good_checkpoint(tmp_path, dataset, ray_session):
    """max_failures 0: the first lost worker stops the run (the fixture's run shows a restart;
    Ray's policy counts restarts, our message reports what it gave up with)."""
    run_dir = tmp_path / "run"
    started = workers_started()
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(train_on_ray, config(run_dir, dataset, max_failures=0), WORKERS)
        wait_for((run_dir / "checkpoints" / tag(EVERY) / MARKER).exists, run=run)
        kill_one_worker(run)
        with pytest.raises(RuntimeError) as caught:
            run.result(timeout=600)
    assert workers_started() - started == WORKERS  # no restart
    message = str(caught.value)
    last = Checkpoint.latest(run_dir)
    assert last is not None and last.step >= EVERY
    assert "\n" not in message
    assert message.startswith("training stopped after 0 restart(s) (train.max_failures)")
    assert f"the last good checkpoint is {last.folder} (step {last.step}); rerun to resume from it" in message
    assert not (run_dir / "train.lock").exists()


def test_a_deterministic_error_is_not_retried(tmp_path, dataset, ray_session):
    """A rank's ValueError at start-up (here: no token dataset at data.dataset) would come
    back on every restart: the run stops at once with the rank's own line. One worker: the
    rule itself (launch.deterministic) is checked in tests/test_launch_units.py; this is
    Ray Train's controller honouring it."""
    started = workers_started()
    with pytest.raises(ValueError, match=f"data.dataset: no token dataset at {tmp_path / 'none'}"):
        train_on_ray(config(tmp_path / "run", str(tmp_path / "none"), max_failures=3), 1)
    assert workers_started() - started == 1  # one group, no restart


@pytest.mark.slow
def test_a_lost_node_is_replaced_and_the_run_finishes(tmp_path, dataset):
    run_dir = tmp_path / "run"
    steps = 48  # more than the in-process tests: removing a node takes longer than killing a process
    (tmp_path / "config.json").write_text(json.dumps(config(run_dir, dataset, steps=steps).to_json()))
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "tests/worker_loss_cluster_job.py"), str(tmp_path / "config.json"),
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "result.json").read_text())
    assert out["while_running"], "the node must go mid-run"
    result = out["result"]
    assert result["step"] == steps and result["resumed_from"] >= max(out["complete_before"])
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
