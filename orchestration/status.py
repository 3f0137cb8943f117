"""`amused status RUN_DIR`: where a run stands, from its state files and outputs alone."""

from __future__ import annotations

import json
import time

from tqdm import tqdm

from amused.orchestration.run import read_run_config, read_state
from amused.orchestration.run_config import RunConfig
from amused.orchestration.stages import STAGES
from amused.plumbing.fsio import exists, read_json
from amused.plumbing.storage import join, url_to_fs
from amused.training.checkpoint import MARKER, complete_steps, step_folder, step_folders
from amused.training.distributed import train_lock
from amused.training.evaluation.metrics import METRICS
from amused.training.evaluation.results import read_results
from amused.training.metrics_log import read_metrics
from amused.training.progress import RUNNING, read_progress
from amused.training.uvit.task import UViTTask

# The training metrics status shows: the task's main ones and what the engine logs for every task.
_TRAINING_METRICS = ("step", *UViTTask.plot, "samples_per_s")


def _counts(counts: dict | None) -> str:
    if not counts:
        return ""
    shown = {k: v for k, v in counts.items() if k not in ("checkpoint", "exported", "metrics", "grid") and v not in
             (None, {}, [])}
    return json.dumps(shown, default=str)[:160]


def status(run_dir: str) -> str:
    cfg = read_run_config(run_dir)
    rows = [("stage", "status", "seconds", "progress", "counts")]
    for stage in STAGES:
        if not stage.enabled(cfg):
            continue
        state = read_state(run_dir, stage.name)
        status_, seconds = (state["status"], f"{state.get('seconds', 0) + state.get('seconds_before', 0):.1f}") \
            if state else ("pending", "")
        rows.append((stage.name, status_, seconds, stage.progress(cfg), _counts((state or {}).get("counts"))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    lines += _latest(cfg)
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h ago"


def _when(at: float, now: float) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(at))} ({_ago(max(0.0, now - at))})"


def _checkpoints(run_dir: str) -> tuple[tuple[str, int, float] | None, list[int]]:
    """(url, step, time) of the newest complete checkpoint, and the steps of newer
    folders without a marker yet (being written or uploaded, or left by a crash)."""
    complete = complete_steps(run_dir)
    newest = complete[-1] if complete else -1
    pending = sorted(s for s in step_folders(run_dir) if s > newest)
    if not complete:
        return None, pending
    fs, marker = url_to_fs(join(step_folder(run_dir, newest), MARKER))
    return (step_folder(run_dir, newest), newest, fs.modified(marker).timestamp()), pending


def training_lines(name: str, run_dir: str, now: float | None = None) -> list[str]:
    """A training's progress (RUN_DIR/progress.json, written by its rank 0) and its checkpoints."""
    now = time.time() if now is None else now
    out = []
    p = read_progress(run_dir)
    if p:
        shown = [p["state"], f"step {p['step']}/{p['total']}"]
        if p.get("loss") is not None:
            shown.append(f"loss {p['loss']:.4g}")
        if p.get("samples_per_s") is not None:
            shown.append(f"{p['samples_per_s']:.3g} samples/s")
        if p["state"] == RUNNING and p.get("eta_s") is not None:
            shown.append(f"ETA {tqdm.format_interval(p['eta_s'])}")
        shown += [f"restarts {p.get('restarts', 0)}", f"updated {_when(p['updated'], now)}"]
        out.append(f"{name} progress: " + ", ".join(shown))
    latest, pending = _checkpoints(run_dir)
    if latest or pending:
        line = f"latest checkpoint: {latest[0]} (step {latest[1]}, {_when(latest[2], now)})" if latest \
            else "latest checkpoint: none complete yet"
        if pending:
            # A folder without its marker is being written only while a training works in the folder:
            # progress says running (a killed run's says so too) and the training's lock is held (a
            # stopped run released it; one killed with SIGKILL left it: the next start takes it over).
            writing = bool(p) and p["state"] == RUNNING and exists(train_lock(run_dir).url)
            line += "; " + ", ".join(f"uploading step {s}" if writing else
                                     f"step {s} incomplete (left by a stopped run)" for s in pending)
        out.append(f"{name} " + line if name != "train" else line)
    return out


def _latest(cfg: RunConfig) -> list[str]:
    out = []
    if cfg.vqgan is not None:
        out += training_lines("vqgan", cfg.vqgan.run_dir)
    out += training_lines("train", cfg.train.run_dir)
    records = read_metrics(cfg.train.run_dir)
    if records:
        out.append("latest training metrics: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in records[-1].items()
            if k in _TRAINING_METRICS))
    if cfg.evaluate is not None and exists(cfg.evaluate.output):
        results = read_results(cfg.evaluate.output)
        if results:
            r = max(results, key=lambda r: r["step"])
            out.append(f"latest evaluation: step {r['step']} {', '.join(m.show(r) for m in METRICS)} "
                       f"({cfg.evaluate.output})")
    plots = [p for p in (join(cfg.train.run_dir, "metrics.png"), cfg.vqgan and join(cfg.vqgan.run_dir, "metrics.png"),
                         cfg.evaluate and join(cfg.evaluate.output, "metrics.png")) if p and exists(p)]
    if plots:
        out.append(f"metric plots: {', '.join(plots)}")
    samples = join(cfg.run_dir, "samples/result.json")
    if exists(samples):
        s = read_json(samples)
        pf = s.get("prompt_following")
        out.append(f"samples: {s['grid']}" + (f"; prompt following {pf['score']:.0%} ({pf['matches']}/{pf['samples']})"
                                              if pf else ""))
    return out

