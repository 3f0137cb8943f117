"""Rank 0's record of a training run: RUN_DIR/metrics.jsonl (and optional TensorBoard /
wandb), the metrics plot, and the progress record a driver and `amused status` read
(training/progress.py).

    RUN_DIR/metrics.jsonl     one JSON line per metrics interval (kept complete; cut back to
                              the resume step when a run resumes)
    RUN_DIR/tensorboard/      TensorBoard event files (log.tensorboard)
    RUN_DIR/wandb_id          the run's wandb id, made once, read back by every restart (log.wandb_project)
    RUN_DIR/progress.json     training/progress.py
    RUN_DIR/metrics.png       at the end (`plot_metrics`)

Everything is written to a local folder and published to the run folder: for a local run
folder the two are one and publishing is the write itself; for a run folder on object
storage (which cannot append) the local folder is this node's scratch copy
(plumbing.storage.scratch_folder) and each file is uploaded whole, replacing the old
object, at most every `publish_every` seconds and at the end. Uploads and progress.json
run in a background thread (`Uploads`); `close` waits for them. A node lost between two
uploads loses those seconds of lines; the steps after the resume checkpoint are redone
and logged again anyway.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from amused.plumbing.fsio import atomic_writer, file_exists, write_json_atomic
from amused.plumbing.plots import line_plots, save_png
from amused.plumbing.storage import is_local, join, scratch_folder, url_to_fs
from amused.training.progress import ProgressReport

METRICS_FILE = "metrics.jsonl"
TENSORBOARD = "tensorboard"
WANDB_ID_FILE = "wandb_id"


def read_metrics(run_dir: str) -> list[dict]:
    """The run's metrics lines, [] before the first."""
    fs, path = url_to_fs(join(run_dir, METRICS_FILE))
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wandb_run_id(run_dir: str) -> str:
    """The run folder's wandb id ("<folder>-<8 hex>"): made by the first start, the same for
    every restart and resume of the run, and another for every other run folder, even one
    of the same name. Created exclusively: a conditional PUT on S3."""
    url = join(run_dir, WANDB_ID_FILE)
    fs, path = url_to_fs(url)
    if not file_exists(url):
        fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        made = f"{run_dir.rstrip('/').rsplit('/', 1)[-1]}-{uuid.uuid4().hex[:8]}"
        try:
            fs.pipe_file(path, made.encode(), mode="create")
        except FileExistsError:
            pass  # another start made it first: its id is the run's
    return fs.cat_file(path).decode().strip()


class Uploads:
    """Rank 0's writes to the run folder, in one background thread: a step never waits on
    object storage (rank 0 waiting holds every rank at the next collective). Each job
    writes a whole current state, so of the jobs of one kind not started yet only the
    newest runs. A failed job is reported on stderr and its kind's next job tries again;
    `close` raises a failure of the last job of a kind."""

    def __init__(self):
        self.pending: dict[str, Callable[[], None]] = {}
        self.errors: dict[str, BaseException] = {}
        self.busy = self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="metrics-uploads", daemon=True)
        self.thread.start()

    def submit(self, kind: str, job: Callable[[], None]) -> None:
        with self.cond:
            self.pending[kind] = job
            self.cond.notify_all()

    def wait(self) -> None:
        """Until every job submitted so far has run."""
        with self.cond:
            self.cond.wait_for(lambda: not self.pending and not self.busy)

    def close(self) -> None:
        self.wait()
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join()
        for error in self.errors.values():
            raise error

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending or self.closed)
                if not self.pending:
                    return
                kind = next(iter(self.pending))
                job = self.pending.pop(kind)
                self.busy = True
            try:
                job()
                self.errors.pop(kind, None)
            except Exception as exc:  # the next job of its kind tries again; close() raises a last failure
                self.errors[kind] = exc
                print(f"{kind} upload failed, retried with the next one: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
            with self.cond:
                self.busy = False
                self.cond.notify_all()


class MetricsLog:
    """Rank 0's metrics.jsonl, TensorBoard events, wandb run and progress.json."""

    publish_every = 10.0  # seconds between uploads of metrics.jsonl and TensorBoard events to a remote run folder

    def __init__(self, run_dir: str, cfg, resume_step: int, config: dict, clock=time.monotonic):
        self.run_dir, self.clock = run_dir, clock
        self.remote = not is_local(run_dir)
        self.local = scratch_folder(run_dir) if self.remote else Path(url_to_fs(run_dir)[1])
        self.local.mkdir(parents=True, exist_ok=True)
        self.path = self.local / METRICS_FILE
        # The run folder's file is the truth (the scratch copy may be another launch's or gone);
        # lines past the checkpoint come from steps that are about to be redone.
        kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
        self.fh = open(self.path, "a")
        self.tb = self.wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # ~0.3 s to import even after torch: only when asked for

            # purge_step: TensorBoard hides the events a killed run logged past the resume step.
            self.tb = SummaryWriter(str(self.local / TENSORBOARD), purge_step=resume_step + 1 if resume_step else None)
        if cfg.wandb_project:
            import wandb  # an optional dependency, imported only when asked for

            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(self.local), config=config, resume="allow",
                                    id=wandb_run_id(run_dir))
        self.uploads = Uploads()
        self.published: dict[str, int] = {}  # sizes read for upload
        self.unsent: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.last_publish = clock()
        self._publish()
        self.progress = ProgressReport(
            run_dir, config["steps"], resume_step, config["data"]["global_batch_size"],
            put=lambda url, record: self.uploads.submit("progress", lambda: write_json_atomic(url, record)))

    def tick(self, step: int) -> None:
        """After every step: the progress record and the uploads, when they are due."""
        self.progress.tick(step)
        if self.clock() - self.last_publish >= self.publish_every:
            self._publish()

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(record, step=record["step"])
        self.progress.metrics(record)

    def close(self) -> None:
        self.fh.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        self._publish()
        self.progress.finish()
        self.uploads.close()

    def _publish(self) -> None:
        """Uploads the files that changed since the last upload (for a local run folder the
        write was the publishing). Read here, between two writes, so an upload is never
        of a line half-written."""
        self.last_publish = self.clock()
        if not self.remote:
            return
        if self.tb:
            self.tb.flush()
        with self.lock:
            for file in [self.path, *(sorted((self.local / TENSORBOARD).rglob("*")) if self.tb else [])]:
                name = file.relative_to(self.local).as_posix()
                if file.is_file() and self.published.get(name) != file.stat().st_size:
                    self.unsent[name] = file.read_bytes()
                    self.published[name] = len(self.unsent[name])
            if self.unsent:
                self.uploads.submit("metrics", self._upload)

    def _upload(self) -> None:
        """The files read and not uploaded yet; one that fails stays for the next upload."""
        with self.lock:
            files, self.unsent = self.unsent, {}
        for name, data in files.items():
            try:
                with atomic_writer(join(self.run_dir, name)) as out:
                    out.write(data)
            except BaseException:
                with self.lock:
                    for rest in list(files)[list(files).index(name):]:
                        self.unsent.setdefault(rest, files[rest])
                raise


def plot_metrics(run_dir: str, names: tuple[str, ...]) -> str:
    """RUN_DIR/metrics.png: the task's main metrics (`Task.plot`) against step."""
    records = read_metrics(run_dir)
    series = {name: [(r["step"], r[name]) for r in records if r.get(name) is not None] for name in names}
    return save_png(line_plots(series), join(run_dir, "metrics.png"))
