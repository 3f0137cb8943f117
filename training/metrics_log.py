"""Rank 0's record of a training run: RUN_DIR/metrics.jsonl (and optional TensorBoard /
wandb), the metrics plot, and the progress record a driver and `amused status` read
(training/progress.py)."""

from __future__ import annotations

import json
from pathlib import Path

from amused.plumbing.plots import line_plots


class MetricsLog:
    """Rank 0's metrics.jsonl (and optional TensorBoard / wandb)."""

    def __init__(self, run_dir: str, cfg, resume_step: int, config: dict):
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.path.exists():
            # Lines past the checkpoint come from steps that are about to be redone.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self.fh = open(self.path, "a")
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:  # an optional dependency, imported only when asked for
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("log.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if cfg.wandb_project:
            import wandb  # an optional dependency, imported only when asked for

            self.wandb = wandb.init(project=cfg.wandb_project, dir=run_dir, config=config, resume="allow",
                                    id=Path(run_dir).resolve().name)

    def tick(self, step: int) -> None:
        """After every step: the progress record, when it is due (training/progress.py)."""

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def plot_metrics(run_dir: str, names: tuple[str, ...]) -> Path:
    """RUN_DIR/metrics.png: the task's main metrics (`Task.plot`) against step."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    series = {name: [(r["step"], r[name]) for r in records if r.get(name) is not None] for name in names}
    path = Path(run_dir) / "metrics.png"
    line_plots(series).save(path)
    return path
