"""Where an evaluation's results lie and reading them back: pure JSON, no Ray or torch,
so `amused status` and the run's evaluate stage read results without paying for them."""

from __future__ import annotations

from pathlib import Path

from amused.plumbing.fsio import read_json
from amused.training.config import EvalConfig


def results_dir(run_dir: str | Path, cfg: EvalConfig) -> Path:
    return Path(cfg.output) if cfg.output else Path(run_dir) / "eval"


def read_results(out_dir: str | Path) -> list[dict]:
    """Every eval/step_N.json of `out_dir`, oldest step first."""
    return sorted((read_json(str(p)) for p in Path(out_dir).glob("step_*.json")), key=lambda r: r["step"])
