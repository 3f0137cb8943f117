"""`deterministic: true`: the scaled-down demo run twice, each time from an empty folder
(the same path, the same image server port: both are written into what the stages store),
writes the same bytes in every stage's outputs."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from amused.orchestration.run import run
from amused.orchestration.run_config import parse_run_config
from tests.samples import demo_config, free_port

# What is not compared byte for byte, and why:
#   logs/, data/images/logs/        Ray's and img2dataset's logs (timestamps)
#   train/ray/                      Ray Train's own run record (ids, times)
#   */progress.json                 the live progress record (a launch id, times)
#   data/images/_amused/records.parquet   the shard records of records/*.json again, in one table
# Compared without their clock readings (`_CLOCK`, at any depth): the stage states, the
# trainings' metrics lines and results, the filter report, img2dataset's stats and the
# download's records. img2dataset's per-shard tables (data/images/NNNNN.parquet) list the
# samples in the order its threads finished them (the tar beside it is rewritten in key
# order): compared sorted by key.
_CLOCK = {"started", "finished", "seconds", "seconds_before", "duration", "start_time", "end_time", "wall_seconds",
          "samples_per_s", "tokens_per_s", "checkpoint_s"}
_SKIPPED = ("logs/", "data/images/logs/", "train/ray/", "data/images/_amused/records.parquet")


def _without_clock(value):
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items() if k not in _CLOCK}
    if isinstance(value, list):
        return [_without_clock(v) for v in value]
    return value


def _content(path: Path, rel: str):
    """What a file holds that two runs must agree on: its sha256, or the parts above."""
    if rel.startswith(_SKIPPED) or path.name == "progress.json":
        return None
    if path.suffix == ".jsonl":
        return [_without_clock(json.loads(line)) for line in path.read_text().splitlines()]
    if path.suffix == ".json":
        return _without_clock(json.loads(path.read_text()))
    if re.fullmatch(r"data/images/\d+\.parquet", rel):
        return pq.read_table(path).sort_by("key").to_pylist()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _outputs(run_dir: Path) -> dict:
    contents = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = str(path.relative_to(run_dir))
        found = _content(path, rel)
        if found is not None:
            contents[rel] = found
    return contents


def test_two_deterministic_runs_write_the_same_bytes(tmp_path):
    cfg = demo_config(tmp_path / "run", port=free_port())
    assert cfg["deterministic"] is True  # the demo's own setting
    outcomes = []
    for _ in range(2):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        states = run(parse_run_config(cfg), log=lambda line: None)
        assert all(s["status"] == "done" for s in states.values())
        outcomes.append(_outputs(tmp_path / "run"))
    first, second = outcomes
    differing = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
    assert differing == [], differing
    # Every stage left outputs that count: image and token shards, both trainings' weights and
    # random states, the VQ-GAN's export, the grid; and the losses step by step.
    names = " ".join(first)
    for part in ("data/images/00000.tar", "data/tokens/00000.parquet", "vqgan/export/diffusion_pytorch_model",
                 "vqgan/checkpoints/step_00000004/rng/rank_00000.json", "train/checkpoints/step_00000006/",
                 "ema.safetensors", "samples/grid.png", "eval/step_00000006.json", "eval/reference.npz"):
        assert part in names, part
    assert all("loss" in r for r in first["train/metrics.jsonl"])
