"""progress.json as rank 0 writes it (throttle, rate, ETA, restarts), the driver's bar
over it, and the status lines over a fabricated run folder (training/progress.py,
orchestration/status.py)."""

import io
import json
import re
import threading
import time
from pathlib import Path

import pytest

from amused.orchestration.status import training_lines
from amused.training.metrics_log import Uploads
from amused.training.progress import (
    LAUNCH_ENV,
    PROGRESS_FILE,
    TORCHRUN_RESTARTS_ENV,
    ProgressReport,
    follow_progress,
)

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / PROGRESS_FILE).read_text())


@pytest.fixture(autouse=True)
def launch_env(monkeypatch):
    monkeypatch.delenv(LAUNCH_ENV, raising=False)
    monkeypatch.delenv(TORCHRUN_RESTARTS_ENV, raising=False)


def test_written_at_start_then_at_most_every_two_seconds_and_at_metrics_lines(tmp_path):
    clock = Clock()
    report = ProgressReport(str(tmp_path), total=100, start_step=10, global_batch_size=32, clock=clock)
    assert record(tmp_path) | {"updated": 0} == {
        "step": 10, "total": 100, "loss": None, "samples_per_s": None, "eta_s": None, "state": "running",
        "launch": "", "restarts": 0, "started": clock.now, "updated": 0}
    for step in range(11, 15):  # 4 steps in 1.6 s: not due
        clock.now += 0.4
        report.tick(step)
    assert record(tmp_path)["step"] == 10
    clock.now += 0.4
    report.tick(15)  # 2.0 s after the first write: 4 steps in the 1.6 s since the first tick
    got = record(tmp_path)
    assert got["step"] == 15 and got["updated"] == clock.now
    assert got["samples_per_s"] == pytest.approx(4 / 1.6 * 32)
    assert got["eta_s"] == pytest.approx(85 / (4 / 1.6))
    clock.now += 0.1
    report.metrics({"step": 15, "loss": 2.5, "lr": 1e-3})  # a metrics line is written at once
    assert record(tmp_path)["loss"] == 2.5 and record(tmp_path)["updated"] == clock.now


def test_the_rate_forgets_steps_older_than_its_window(tmp_path):
    clock = Clock()
    report = ProgressReport(str(tmp_path), total=10_000, start_step=0, global_batch_size=1, clock=clock)
    step = 0
    for _ in range(50):  # slow: 1 step per second
        clock.now += 1.0
        step += 1
        report.tick(step)
    for _ in range(ProgressReport.window):  # then 10 steps per second
        clock.now += 0.1
        step += 1
        report.tick(step)
    clock.now += 2.0
    report.metrics({"step": step})
    assert record(tmp_path)["samples_per_s"] == pytest.approx(10.0)


def test_finish_says_finished_only_at_the_last_step(tmp_path):
    report = ProgressReport(str(tmp_path), total=4, start_step=0, global_batch_size=8)
    report.tick(3)
    report.finish()
    assert record(tmp_path)["state"] == "running"
    report.tick(4)
    report.finish()
    assert record(tmp_path)["state"] == "finished"


def test_restarts_count_starts_under_the_same_launch(tmp_path, monkeypatch):
    monkeypatch.setenv(LAUNCH_ENV, "launch-a")
    assert [ProgressReport(str(tmp_path), 10, 0, 8).record["restarts"] for _ in range(3)] == [0, 1, 2]
    assert record(tmp_path)["launch"] == "launch-a"
    monkeypatch.setenv(LAUNCH_ENV, "launch-b")  # a new `amused train`: its own count
    assert ProgressReport(str(tmp_path), 10, 0, 8).record["restarts"] == 0
    monkeypatch.delenv(LAUNCH_ENV)
    monkeypatch.setenv(TORCHRUN_RESTARTS_ENV, "2")  # torchrun counts its restarts itself
    assert ProgressReport(str(tmp_path), 10, 0, 8).record["restarts"] == 2
    (tmp_path / PROGRESS_FILE).write_text("{not json")  # a damaged record: counted from 0, no error
    monkeypatch.delenv(TORCHRUN_RESTARTS_ENV)
    monkeypatch.setenv(LAUNCH_ENV, "launch-b")
    assert ProgressReport(str(tmp_path), 10, 0, 8).record["restarts"] == 0


def write_progress(run_dir: Path, **fields) -> None:
    base = {"step": 0, "total": 60, "loss": None, "samples_per_s": None, "eta_s": None, "state": "running",
            "launch": "x", "restarts": 0, "started": time.time(), "updated": time.time()}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PROGRESS_FILE).write_text(json.dumps(base | fields))


def follow_fabricated_run(run_dir: Path, lines: bool) -> str:
    write_progress(run_dir, step=60, state="finished", loss=9.0)  # the folder's last run
    out = io.StringIO()

    def shown(text: str) -> None:  # waits on what is drawn, not on time: a loaded machine polls late
        deadline = time.monotonic() + 5
        while text not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)

    with follow_progress(str(run_dir), 60, "train", poll_s=0.01, file=out, lines=lines):
        time.sleep(0.1)
        assert "60/60" not in out.getvalue()
        write_progress(run_dir, step=25, loss=2.345678, samples_per_s=123.4, eta_s=75, restarts=1)
        shown("25/60")
        (run_dir / PROGRESS_FILE).write_text("{half writ")  # a bad read is skipped, never raised
        time.sleep(0.05)
        write_progress(run_dir, step=59, loss=1.6, samples_per_s=130.0, eta_s=1)
        if not lines:  # a log line is printed only every so often
            shown("59/60")
        write_progress(run_dir, step=60, loss=1.5, samples_per_s=130.0, eta_s=0, state="finished")
    return out.getvalue()


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_ends_at_the_last_record(tmp_path):
    shown = follow_fabricated_run(tmp_path, lines=False)
    assert "\n" not in shown.rstrip("\n")
    draws = shown.rstrip("\n").split("\r")
    assert any("25/60" in d and "loss=2.346, samples/s=123, eta=01:15, restarts=1]" in d for d in draws)
    assert "59/60" in shown
    assert re.fullmatch(r"train: 100%\|[#█]+\| 60/60 \[\d\d:\d\d, loss=1.5, samples/s=130, eta=0:00\]", draws[-1])


def test_in_a_log_the_bar_is_a_line_at_most_every_30_seconds_and_at_the_end(tmp_path):
    shown = follow_fabricated_run(tmp_path, lines=None)  # a StringIO is no terminal
    assert re.sub(r"\[\d\d:\d\d", "[T", shown).splitlines() == [
        "train:  42% 25/60 [T, loss=2.346, samples/s=123, eta=01:15, restarts=1]",  # 59/60 came too soon
        "train: 100% 60/60 [T, loss=1.5, samples/s=130, eta=0:00]"]


def test_the_bar_ends_with_the_block_even_without_a_record(tmp_path):
    out = io.StringIO()
    with follow_progress(str(tmp_path / "nothing-yet"), 8, "vqgan", poll_s=0.01, file=out):
        time.sleep(0.05)
    assert re.fullmatch(r"vqgan:   0% 0/8 \[\d\d:\d\d\]\n", out.getvalue())


def test_status_of_a_running_training_with_a_checkpoint_being_uploaded(tmp_path):
    run_dir = tmp_path / "train"
    now = time.time()
    write_progress(run_dir, step=27, total=60, loss=2.5, samples_per_s=51.2, eta_s=66, restarts=2, updated=now - 3)
    for step, complete in ((10, True), (20, True), (30, False)):
        folder = run_dir / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (folder / "COMPLETE").write_text(json.dumps({"step": step, "files": {}}))
    (run_dir / "train.lock").write_text("{}")  # the training holds its lock while it works
    lines = training_lines("train", str(run_dir), now=now)
    assert lines[0] == ("train progress: running, step 27/60, loss 2.5, 51.2 samples/s, ETA 01:06, restarts 2, "
                        f"updated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now - 3))} (3s ago)")
    assert lines[1].startswith(f"latest checkpoint: {run_dir}/checkpoints/step_00000020 (step 20, ")
    assert lines[1].endswith("; uploading step 30")
    assert training_lines("vqgan", str(tmp_path / "empty")) == []

    # Stopped: it released its lock (progress.json still says running: the run never got to the end).
    (run_dir / "train.lock").unlink()
    assert training_lines("train", str(run_dir), now=now)[1].endswith("; step 30 incomplete (left by a stopped run)")
    write_progress(run_dir, step=60, state="finished")  # a folder a finished run left behind
    assert training_lines("train", str(run_dir), now=now)[1].endswith("; step 30 incomplete (left by a stopped run)")


def test_uploads_run_in_order_newest_per_kind_and_a_last_failure_is_raised_at_close(capsys):
    uploads = Uploads()
    gate, ran = threading.Event(), []
    uploads.submit("metrics", gate.wait)  # holds the thread while the next ones queue
    for n in range(3):
        uploads.submit("progress", lambda n=n: ran.append(("progress", n)))
    uploads.submit("files", lambda: ran.append(("files", 0)))
    gate.set()
    uploads.wait()
    assert ran == [("progress", 2), ("files", 0)]  # progress 0 and 1 were superseded before they ran

    def fail():
        raise OSError("503 SlowDown")

    uploads.submit("progress", fail)
    uploads.wait()
    assert "progress upload failed, retried with the next one: OSError: 503 SlowDown" in capsys.readouterr().err
    uploads.submit("progress", lambda: ran.append(("progress", 3)))  # the next one succeeds: nothing to raise
    uploads.submit("metrics", fail)
    with pytest.raises(OSError, match="503 SlowDown"):
        uploads.close()
    assert ran[-1] == ("progress", 3) and not uploads.thread.is_alive()
