"""A run you can watch: the driver's progress bar over a 2-worker Ray Train run on an S3 run
folder, rank 0's progress.json, TensorBoard events and `amused status` lines from that run's
own files, and Ray Train's record kept in the run folder too; the
metrics log of a run folder on S3 (complete on every upload, cut back on resume); wandb
run ids (unique per run folder, kept by a resume)."""

import json
import re
import time
import uuid

import pytest
import s3fs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from amused.demo.datasets import write_token_dataset
from amused.orchestration.status import training_lines
from amused.plumbing.storage import SCRATCH_ENV
from amused.training import progress as progress_module
from amused.training.config import LogConfig, parse_config
from amused.training.launch import train_on_ray
from amused.training.metrics_log import WANDB_ID_FILE, MetricsLog, plot_metrics
from amused.training.progress import LAUNCH_ENV

STEPS = 8


def tensorboard_scalars(folder: str, tag: str) -> dict[int, float]:
    events = EventAccumulator(folder)
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_ray_training_shows_its_progress_on_the_driver_and_in_status(s3_bucket, tmp_path, ray_session, capfd,
                                                                     monkeypatch):
    """On a run folder on S3 (moto), as at LAION scale: besides the progress, the checkpoints,
    the lock and Ray Train's own record (RUN_DIR/ray, through our s3fs) all live there."""
    monkeypatch.setattr(progress_module, "POLL_S", 0.05)  # a tiny run's steps can come faster than one a second
    tokens = str(tmp_path / "tokens")
    write_token_dataset(tokens, [64])
    run_dir = f"{s3_bucket}/{uuid.uuid4().hex[:8]}/run"
    cfg = parse_config({
        "run_dir": run_dir, "steps": STEPS,
        "data": {"dataset": tokens, "global_batch_size": 8, "micro_batch_size": 4, "workers": 0},
        "model": {"preset": "tiny"}, "optim": {"lr": 1e-2, "warmup_steps": 1},
        "checkpoint": {"every": 4}, "log": {"every": 2, "progress": True, "tensorboard": True}})
    capfd.readouterr()
    started = time.time()
    result = train_on_ray(cfg, workers=2)
    assert result.step == STEPS and result.resumed_from is None

    # The driver's bar (the workers' own output does not reach the driver in the tests), as
    # lines: captured output is no terminal. One at the first record, one at the end.
    err = capfd.readouterr().err
    shown = re.findall(r"^train: +\d+% (\d+)/(\d+) \[\d\d:\d\d(.*)\]$", err, re.M)
    assert len(shown) >= 2 and all(int(total) == STEPS for _, total, _ in shown), err
    assert int(shown[0][0]) < STEPS
    assert shown[-1][0] == str(STEPS) and re.fullmatch(r", loss=[0-9.e+-]+, samples/s=[0-9.e+-]+, eta=0:00",
                                                       shown[-1][2]), err

    fs = s3fs.S3FileSystem()
    progress = json.loads(fs.cat(f"{run_dir}/progress.json"))
    metrics = [json.loads(line) for line in fs.cat(f"{run_dir}/metrics.jsonl").decode().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert progress["step"] == progress["total"] == STEPS and progress["state"] == "finished"
    assert progress["loss"] == metrics[-1]["loss"] and progress["samples_per_s"] > 0
    assert re.fullmatch("[0-9a-f]{32}", progress["launch"]) and progress["restarts"] == 0
    assert started < progress["started"] <= progress["updated"] < time.time()

    # TensorBoard's own reader finds rank 0's events, one per metrics line.
    fs.get(f"{run_dir}/tensorboard/", str(tmp_path / "tensorboard"), recursive=True)
    assert tensorboard_scalars(str(tmp_path / "tensorboard"), "loss") == pytest.approx(
        {m["step"]: m["loss"] for m in metrics})

    lines = training_lines("train", run_dir)
    assert lines[0].startswith(f"train progress: finished, step {STEPS}/{STEPS}, loss {progress['loss']:.4g}, ")
    assert "restarts 0, updated " in lines[0]
    assert lines[1].startswith(f"latest checkpoint: {run_dir}/checkpoints/step_{STEPS:08d} (step {STEPS}, ")
    assert "uploading" not in lines[1] and "incomplete" not in lines[1]

    assert fs.find(f"{run_dir}/ray/amused-train"), "Ray Train wrote nothing under RUN_DIR/ray"
    assert not fs.exists(f"{run_dir}/train.lock")


def log_config(**kw) -> LogConfig:
    return LogConfig(**{"every": 1, "progress": False, **kw})


TRAIN_JSON = {"steps": 8, "data": {"global_batch_size": 4}}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_run_folder_on_s3_gets_whole_metrics_events_and_progress(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch"))
    fs = s3fs.S3FileSystem()
    run_dir = f"{s3_bucket}/{uuid.uuid4().hex[:8]}/train"
    # A killed run's lines, past the checkpoint at step 4 it resumes from.
    fs.pipe(f"{run_dir}/metrics.jsonl", "".join(json.dumps({"step": s, "loss": 9.0}) + "\n"
                                                for s in range(1, 7)).encode())

    def remote_steps() -> list[int]:
        return [json.loads(line)["step"] for line in fs.cat(f"{run_dir}/metrics.jsonl").decode().splitlines()]

    clock = Clock()
    log = MetricsLog(run_dir, log_config(tensorboard=True), 4, TRAIN_JSON, clock=clock)
    log.uploads.wait()  # uploads run in the background: a step never waits on them
    assert remote_steps() == [1, 2, 3, 4]  # cut back at once: a reader never sees the redone steps twice
    for step in (5, 6):
        log.write({"step": step, "loss": 1.0 / step})
        log.tick(step)
    log.uploads.wait()
    assert remote_steps() == [1, 2, 3, 4]  # not due yet
    clock.now += log.publish_every
    log.tick(6)
    log.uploads.wait()
    assert remote_steps() == [1, 2, 3, 4, 5, 6]
    assert fs.glob(f"{run_dir}/tensorboard/events.out.tfevents.*")
    for step in (7, 8):
        log.write({"step": step, "loss": 1.0 / step})
        log.tick(step)
    log.close()
    assert remote_steps() == list(range(1, 9))
    progress = json.loads(fs.cat(f"{run_dir}/progress.json"))
    assert progress["state"] == "finished" and progress["step"] == 8 and progress["loss"] == 1.0 / 8

    fetched = tmp_path / "fetched"
    fs.get(f"{run_dir}/tensorboard/", str(fetched), recursive=True)
    assert tensorboard_scalars(str(fetched), "loss") == pytest.approx({s: 1.0 / s for s in (5, 6, 7, 8)})

    assert plot_metrics(run_dir, ("loss",)) == f"{run_dir}/metrics.png"
    assert fs.cat(f"{run_dir}/metrics.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_of_a_run_folder_on_s3(s3_bucket):
    fs = s3fs.S3FileSystem()
    run_dir = f"{s3_bucket}/{uuid.uuid4().hex[:8]}/train"
    now = time.time()
    fs.pipe(f"{run_dir}/progress.json", json.dumps(
        {"step": 13, "total": 20, "loss": 3.25, "samples_per_s": 8.0, "eta_s": 7.0, "state": "running",
         "launch": "l", "restarts": 1, "started": now - 60, "updated": now - 1}).encode())
    fs.pipe(f"{run_dir}/checkpoints/step_00000010/COMPLETE", b'{"step": 10, "files": {}}')
    fs.pipe(f"{run_dir}/checkpoints/step_00000010/trainer.json", b"{}")
    fs.pipe(f"{run_dir}/checkpoints/step_00000012/mp_rank_00_model_states.pt", b"partial")
    fs.pipe(f"{run_dir}/train.lock", b"{}")  # held while the training works
    lines = training_lines("train", run_dir, now=now)
    assert lines[0].startswith("train progress: running, step 13/20, loss 3.25, 8 samples/s, ETA 00:07, restarts 1, ")
    assert lines[1].startswith(f"latest checkpoint: {run_dir}/checkpoints/step_00000010 (step 10, ")
    assert lines[1].endswith("; uploading step 12")


def test_wandb_ids_are_unique_per_run_folder_and_kept_by_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv(LAUNCH_ENV, raising=False)
    ids = []
    for run_dir, resume in ((tmp_path / "a" / "train", 0), (tmp_path / "b" / "train", 0), (tmp_path / "a" / "train", 1)):
        log = MetricsLog(str(run_dir), log_config(wandb_project="amused-test"), resume, TRAIN_JSON)
        log.write({"step": resume + 1, "loss": 1.0})
        ids.append(log.wandb.id)
        log.close()
        assert (run_dir / WANDB_ID_FILE).read_text() == ids[-1]
    first, other, resumed = ids
    assert re.fullmatch("train-[0-9a-f]{8}", first)
    assert first != other and resumed == first
