"""Where an evaluation's results lie, reading them back and writing pictures beside them:
no Ray or torch, so `amused status` and the run's evaluate stage read results without
paying for them. Every location is a URL (a local path or any fsspec URL, s3://...)."""

from __future__ import annotations

from amused.plumbing.fsio import list_files, read_json
from amused.plumbing.storage import join
from amused.training.config import EvalConfig


def results_dir(run_dir: str, cfg: EvalConfig) -> str:
    return cfg.output or join(str(run_dir), "eval")


def read_results(out_dir: str) -> list[dict]:
    """Every eval/step_N.json of `out_dir`, oldest step first."""
    found = list_files(join(str(out_dir), "step_*.json"), ".json", required=False)
    return sorted((read_json(url) for url in found), key=lambda r: r["step"])
