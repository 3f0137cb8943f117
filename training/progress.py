"""Progress of a training run that the people and tools watching it read: rank 0 writes
RUN_DIR/progress.json (`ProgressReport`); the driver that launched the ranks shows it
(`follow_progress`: a bar on a terminal, lines in a log; `ProgressView`) and `amused status`
prints it (orchestration/status.py).

    RUN_DIR/progress.json   {"step", "total", "loss", "samples_per_s", "eta_s", "state",
                             "launch", "restarts", "started", "updated"}

It is one small object replaced whole (a single PUT on S3), at most every
`ProgressReport.every` seconds, at every metrics line and at the end, so a reader on any
host sees a whole record and a run on object storage pays a request every few seconds.

A launch (one `train_on_ray` call, one torchrun) has an id in the ranks' environment
(LAUNCH_ENV); rank 0 counts its starts under the same id as restarts (Ray Train restarts
the workers of a launch after a worker loss; torchrun says how often it restarted in
TORCHELASTIC_RESTART_COUNT).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

from amused.plumbing.fsio import read_json, write_json_atomic
from amused.plumbing.storage import join

LAUNCH_ENV = "AMUSED_LAUNCH_ID"
TORCHRUN_RESTARTS_ENV = "TORCHELASTIC_RESTART_COUNT"
PROGRESS_FILE = "progress.json"
RUNNING, FINISHED = "running", "finished"
POLL_S = 1.0  # how often the driver reads progress.json


def progress_url(run_dir: str) -> str:
    return join(run_dir, PROGRESS_FILE)


def read_progress(run_dir: str) -> dict | None:
    """The run's progress record; None before rank 0 wrote one. A read error propagates
    (the caller decides whether a storage hiccup matters)."""
    try:
        return read_json(progress_url(run_dir))
    except FileNotFoundError:
        return None


class ProgressReport:
    """Rank 0's RUN_DIR/progress.json, written by `put` (training/metrics_log.py: in the
    background). Samples/s (and so the ETA) is the rate over the last ~`every * window`
    seconds of steps, so the start-up and an old checkpoint stall drop out of it."""

    every = 2.0  # seconds between writes, besides those at metrics lines and at the end
    window = 16  # rate points kept

    def __init__(self, run_dir: str, total: int, start_step: int, global_batch_size: int,
                 clock: Callable[[], float] = time.time, put: Callable[[str, dict], None] = write_json_atomic):
        self.url, self.total, self.batch, self.clock, self.put = (progress_url(run_dir), total, global_batch_size,
                                                                 clock, put)
        launch = os.environ.get(LAUNCH_ENV, "")
        now = clock()
        self.record = {"step": start_step, "total": total, "loss": None, "samples_per_s": None, "eta_s": None,
                       "state": RUNNING, "launch": launch, "restarts": self._restarts(run_dir, launch),
                       "started": now, "updated": now}
        self.points: deque[tuple[float, int]] = deque(maxlen=self.window)
        # Written at once: a start that dies before its first step still counts as a restart.
        self._write(now)

    @staticmethod
    def _restarts(run_dir: str, launch: str) -> int:
        if TORCHRUN_RESTARTS_ENV in os.environ and not launch:
            return int(os.environ[TORCHRUN_RESTARTS_ENV])
        try:
            before = read_progress(run_dir)
        except (OSError, ValueError):  # a damaged record counts nothing; the run goes on
            before = None
        if launch and before and before.get("launch") == launch:
            return int(before.get("restarts", 0)) + 1
        return 0

    def tick(self, step: int) -> None:
        """After every step; writes when `every` seconds passed since the last write."""
        now = self.clock()
        self.points.append((now, step))
        self.record["step"] = step
        if now - self.record["updated"] >= self.every:
            self._write(now)

    def metrics(self, record: dict) -> None:
        """At a metrics line: its loss, written at once."""
        if isinstance(record.get("loss"), (int, float)):
            self.record["loss"] = record["loss"]
        self.record["step"] = record["step"]
        self._write(self.clock())

    def finish(self) -> None:
        self.record["state"] = FINISHED if self.record["step"] >= self.total else RUNNING
        self._write(self.clock())

    def _write(self, now: float) -> None:
        if len(self.points) > 1:
            (t0, s0), (t1, s1) = self.points[0], self.points[-1]
            if t1 > t0 and s1 > s0:
                steps_per_s = (s1 - s0) / (t1 - t0)
                self.record.update(samples_per_s=steps_per_s * self.batch,
                                   eta_s=max(0, self.total - self.record["step"]) / steps_per_s)
        self.record["updated"] = now
        self.put(self.url, dict(self.record))


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return tqdm.format_interval(seconds)


_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class ProgressView:
    """A progress record shown to a person: step of total, loss, samples/s, ETA, restarts.
    On a terminal a tqdm bar redrawn in place; anywhere else (a pipe, a file, CI or Ray job
    logs, which show whole lines) the same text as one line at most every `line_every`
    seconds and at the end: tqdm's redraws end no line, so a log would show nothing until
    the bar closed."""

    line_every = 30.0

    def __init__(self, total: int, desc: str, file=None, lines: bool | None = None):
        self.total, self.desc, self.file = total, desc, file or sys.stderr
        self.lines = not (getattr(self.file, "isatty", None) and self.file.isatty()) if lines is None else lines
        self.started = time.monotonic()
        self.step, self.postfix, self.printed = 0, "", (None, "", float("-inf"))
        self.bar = None if self.lines else tqdm(total=total, desc=desc, unit="step", file=self.file,
                                                dynamic_ncols=True, bar_format=_FORMAT)

    def show(self, record: dict) -> None:
        self.step = min(int(record.get("step", 0)), self.total)
        loss, rate = record.get("loss"), record.get("samples_per_s")
        shown = []
        if isinstance(loss, (int, float)):
            shown.append(f"loss={loss:.4g}")
        if isinstance(rate, (int, float)):
            shown.append(f"samples/s={rate:.3g}")
        shown.append("eta=" + ("0:00" if record.get("state") == FINISHED else _eta(record.get("eta_s"))))
        if record.get("restarts"):
            shown.append(f"restarts={record['restarts']}")
        self.postfix = ", ".join(shown)
        self._draw(final=False)

    def close(self) -> None:
        self._draw(final=True)

    def _draw(self, final: bool) -> None:
        if self.bar is not None:
            self.bar.n = self.step
            self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.refresh()
            if final:
                self.bar.close()
            return
        now = time.monotonic()
        changed = (self.step, self.postfix) != self.printed[:2]
        if changed and (final or (self.step != self.printed[0] and now - self.printed[2] >= self.line_every)):
            line = tqdm.format_meter(self.step, self.total, now - self.started, prefix=self.desc, postfix=self.postfix,
                                     bar_format=_FORMAT.replace("|{bar}|", ""))
            print(line, file=self.file, flush=True)
            self.printed = (self.step, self.postfix, now)


@contextmanager
def follow_progress(run_dir: str, total: int, desc: str, poll_s: float | None = None, file=None,
                    lines: bool | None = None) -> Iterator[None]:
    """Shows the progress of the training this (the driver's) process waits on in the block,
    from RUN_DIR/progress.json, which a thread reads every `poll_s` (POLL_S) seconds; the last
    record is shown when the block ends. `file`, `lines`: ProgressView's."""
    view = ProgressView(total, desc, file, lines)
    try:
        # The record of an earlier launch (this folder's last run) is not this one's progress.
        stale = [read_progress(run_dir)]
    except Exception:  # the stale record only hides itself; the view works without it
        stale = [None]

    def poll() -> None:
        try:
            record = read_progress(run_dir)
        except Exception:  # a storage hiccup or a record read half-way: the next poll sees the next one
            return
        if record and record != stale[0]:
            stale[0] = None
            view.show(record)

    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(poll_s or POLL_S):
            poll()

    thread = threading.Thread(target=follow, name=f"{desc}-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()
        view.close()
