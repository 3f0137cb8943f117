"""`make demo`'s U-ViT stage: training time against prompt following, per candidate config.

Each candidate is the `train:` section of a run config (default configs/demo.yaml) with
dotted overrides, trained in this process (one rank, as under Ray Train with one worker)
on an existing demo run's token dataset, then scored as the demo scores a checkpoint:
the first 32 prompts of configs/demo-prompts.txt (evaluate.max_prompts) x 4 seeded samples each with the config's
`sample:` settings (demo/showcase.py `seeded_samples` + `prompt_following`). One training
is one draw: a candidate near the bar needs a second `--seed`.

Printed per candidate: wall time of the training, its median seconds per step and
samples/s (metrics.jsonl, first interval left out), the 32x4 score, the load average
before and after. `--baseline-steps N` first times the unchanged config for N steps, so
each candidate's time is also given as a ratio of the baseline's estimated stage time
(its step time x its steps) measured on the same machine in the same run.

    python benchmarks/demo_speed.py --run demo-out/run --out /tmp/demo-speed --baseline-steps 40 \\
        --candidate "b16x800: steps=800 data.global_batch_size=16 data.micro_batch_size=16"
    python benchmarks/demo_speed.py --run demo-out/run --out /tmp/demo-speed --score-only \\
        demo-out/run/train/checkpoints/step_00001600        # the 32x4 score of a trained checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import yaml

from amused.demo.showcase import prompt_following, seeded_samples
from amused.plumbing.config import from_mapping
from amused.training.checkpoint import Checkpoint
from amused.training.config import SampleConfig, parse_config
from amused.training.inference.sample import Sampler, checkpoint_models, load_trained_model
from amused.training.uvit.task import train


def override(section: dict, assignments: list[str]) -> dict:
    """`a.b=value` assignments (values parsed as YAML) applied to a copy of a nested mapping."""
    out = json.loads(json.dumps(section))
    for item in assignments:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    return out


def candidate_config(base: dict, run: Path, run_dir: Path, assignments: list[str]):
    """The demo's `train:` section on `run`'s tokens and models, with the overrides."""
    section = override(base, assignments)
    section["run_dir"] = str(run_dir)
    section.setdefault("data", {})["dataset"] = str(run / "data" / "tokens")
    section.setdefault("model", {}).update(vqgan=str(run / "vqgan" / "export"), text_encoder=str(run / "models"))
    section.setdefault("log", {})["progress"] = False
    return parse_config(section)


def step_times(run_dir: Path, batch: int) -> tuple[float, float]:
    """Median seconds per step and samples/s of the metrics lines after the first."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [line["samples_per_s"] for line in lines[1:]] or [line["samples_per_s"] for line in lines]
    rate = statistics.median(rates)
    return batch / rate, rate


def score(checkpoint: str, prompts: list[str], sample: SampleConfig, per_prompt: int) -> dict:
    sampler = Sampler.from_folders(load_trained_model(checkpoint), *checkpoint_models(checkpoint))
    images, expanded = seeded_samples(sampler, prompts, sample, per_prompt)
    return prompt_following(images, expanded)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_candidate(name: str, base: dict, args, assignments: list[str], prompts: list[str],
                  sample: SampleConfig, scored: bool = True) -> dict:
    run_dir = args.out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh training, never a resume
    cfg = candidate_config(base, args.run, run_dir, assignments)
    before = load()
    started = time.monotonic()
    train(cfg)
    wall = time.monotonic() - started
    seconds_per_step, rate = step_times(run_dir, cfg.data.global_batch_size)
    row = {"name": name, "overrides": " ".join(assignments), "steps": cfg.steps,
           "batch": cfg.data.global_batch_size, "train_s": round(wall, 1), "s_per_step": round(seconds_per_step, 4),
           "samples_per_s": round(rate, 1), "load_before": before, "load_after": load()}
    if scored:
        started = time.monotonic()
        row.update(score(str(Checkpoint.latest(str(run_dir)).folder), prompts, sample, args.per_prompt))
        row["score_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="run config whose train: and sample: are the base")
    p.add_argument("--run", type=Path, required=True,
                   help="a demo run folder with data/tokens, models/ and vqgan/export (read only)")
    p.add_argument("--out", type=Path, required=True, help="folder for the candidates' training runs")
    p.add_argument("--prompts", default="configs/demo-prompts.txt")
    p.add_argument("--max-prompts", type=int, default=None,
                   help="score the first N prompts (default: the config's evaluate.max_prompts, as the demo does)")
    p.add_argument("--per-prompt", type=int, default=4, help="seeded samples per prompt")
    p.add_argument("--candidate", action="append", default=[],
                   help='"NAME: key=value key=value" (dotted keys of the train: section)')
    p.add_argument("--sample", action="append", default=[], help="key=value overrides of the sample: section")
    p.add_argument("--baseline-steps", type=int, default=0,
                   help="time the unchanged config for this many steps first (0 = no baseline)")
    p.add_argument("--score-only", nargs="*", default=[], metavar="CHECKPOINT",
                   help="score these trained checkpoints and train nothing")
    args = p.parse_args()

    run_cfg = yaml.safe_load(Path(args.config).read_text())
    base = run_cfg["train"]
    sample = from_mapping(SampleConfig, override(run_cfg.get("sample") or {}, args.sample))
    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    max_prompts = args.max_prompts if args.max_prompts is not None else (run_cfg.get("evaluate") or {}).get("max_prompts")
    prompts = prompts[:max_prompts or None]
    args.out.mkdir(parents=True, exist_ok=True)
    for checkpoint in args.score_only:
        started = time.monotonic()
        row = {"checkpoint": checkpoint, **score(checkpoint, prompts, sample, args.per_prompt),
               "score_s": round(time.monotonic() - started, 1), "load": load()}
        print(json.dumps(row), flush=True)
    baseline = None
    if args.baseline_steps:
        row = run_candidate("baseline", base, args, [f"steps={args.baseline_steps}", "checkpoint.every=1000000"],
                            prompts, sample, scored=False)
        baseline = row["s_per_step"] * base["steps"]
        print(f"baseline: {row['s_per_step']:.3f} s/step x {base['steps']} steps = {baseline:.0f} s estimated", flush=True)
    for spec in args.candidate:
        name, _, rest = spec.partition(":")
        row = run_candidate(name.strip(), base, args, rest.split(), prompts, sample)
        if baseline:
            print(f"{row['name']}: {row['s_per_step'] * row['steps']:.0f} s of steps = "
                  f"{row['s_per_step'] * row['steps'] / baseline:.2f} x the baseline's; score {row['score']:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
