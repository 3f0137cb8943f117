"""Training with 2 processes (gloo) under torchrun, as a user launches it.

One module fixture makes the runs the tests compare:
  straight   2 ranks, ZeRO-2, 60 steps                    (the reference)
  killed     the same, SIGKILLed after its step-20 checkpoint, then rerun to 60
  zero0      2 ranks, ZeRO-0
  one_rank   1 rank, 2 lanes, micro-batch doubled (same global batch)
  universal  straight's step-40 checkpoint resumed on 1 rank (DeepSpeed universal conversion)
  ray        2 Ray Train workers
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from amused.demo.datasets import write_token_dataset
from amused.training.checkpoint import MARKER, Checkpoint
from tests.samples import free_port, kill_launch

STEPS = 60
# fp32 on CPU: the runs differ only in the order of floating-point sums (ZeRO's bucketed
# reduce-scatter vs all-reduce, one rank summing what two did), ~1e-7 per step, which
# the optimizer compounds over 60 steps; a wrong sample, mask or scale moves the loss by
# more than 1e-2.
LOSS_RTOL = 1e-4


def write_config(folder: Path, name: str, dataset: str, **over) -> Path:
    cfg = {
        "run_dir": str(folder / name), "steps": STEPS, "seed": 1,
        "data": {"dataset": dataset, "global_batch_size": 16, "micro_batch_size": 8, "workers": 1,
                 "window_rows": 64},
        "model": {"preset": "tiny"},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "schedule": "cosine"},
        "checkpoint": {"every": 20, "keep": 5},
        "log": {"every": 1, "progress": False},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(nproc: int, config: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "amused.orchestration.cli", "train", str(config)]


def run(*cmds: list[str]) -> list[str]:
    """Runs independent launches side by side (most of a launch is start-up, not
    compute) and returns their stdouts; each must succeed."""
    # Files, not pipes: a full pipe would block one launch while another is waited on.
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in cmds]
    procs = [subprocess.Popen(cmd, stdout=out, stderr=err, text=True) for cmd, (out, err) in zip(cmds, logs)]
    stdouts = []
    for proc, (out, err) in zip(procs, logs):
        proc.wait(timeout=600)
        with out, err:
            out.seek(0)
            err.seek(0)
            stdout = out.read()
            assert proc.returncode == 0, stdout[-3000:] + err.read()[-3000:]
        stdouts.append(stdout)
    return stdouts


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in lines}


def weights(run_dir: Path, step: int, ema: bool = False) -> dict[str, torch.Tensor]:
    return Checkpoint.at(run_dir / "checkpoints" / f"step_{step:08d}").state_dict(ema=ema)


def assert_same_ema(a: Path, b: Path) -> None:
    """The step-60 EMAs of two runs that agree up to float sum order. Each rank averages its
    share of the weights and a checkpoint gathers them: a share missing or misplaced would
    be off by the weights' own size (~1e-2 and up), not by rounding."""
    ema_a, ema_b = weights(a, STEPS, ema=True), weights(b, STEPS, ema=True)
    assert list(ema_a) == list(ema_b)
    worst = max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a)
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    dataset = str(folder / "tokens")
    write_token_dataset(dataset, [300, 200, 150])
    out = {"folder": folder, "dataset": dataset}

    run(torchrun(2, write_config(folder, "straight", dataset)))
    out["straight"] = folder / "straight"

    killed = write_config(folder, "killed", dataset)
    proc = subprocess.Popen(torchrun(2, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = folder / "killed" / "checkpoints" / "step_00000020" / MARKER
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    out["killed_while_running"] = proc.poll() is None
    kill_launch(proc)
    out["complete_at_kill"] = sorted(c.step for c in Checkpoint.every(folder / "killed"))

    shutil.copytree(folder / "straight", folder / "universal")
    shutil.rmtree(folder / "universal" / "checkpoints" / "step_00000060")
    out["resume_stdout"], _, _, out["universal_stdout"] = run(
        torchrun(2, killed),
        torchrun(2, write_config(folder, "zero0", dataset, engine={"zero_stage": 0}, checkpoint={"every": STEPS})),
        torchrun(1, write_config(folder, "one_rank", dataset, data__micro_batch_size=16, data__lanes=2,
                                 checkpoint={"every": STEPS})),
        torchrun(1, write_config(folder, "universal", dataset, data__micro_batch_size=16)),
    )
    for name in ("killed", "zero0", "one_rank", "universal"):
        out[name] = folder / name
    return out


def test_kill_after_checkpoint_and_resume_is_exact(runs):
    assert runs["killed_while_running"], "the run finished before it could be killed"
    # Killed part-way, and the rerun started from the newest checkpoint the kill left.
    complete = runs["complete_at_kill"]
    assert 20 in complete and STEPS not in complete, complete
    assert f"resumed from step {complete[-1]}" in runs["resume_stdout"]
    straight, killed = losses(runs["straight"]), losses(runs["killed"])
    assert sorted(killed) == list(range(1, STEPS + 1))
    assert killed == straight  # bit for bit, every step
    a, b = weights(runs["straight"], STEPS), weights(runs["killed"], STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    ema_a = load_file(str(runs["straight"] / "checkpoints" / "step_00000060" / "ema.safetensors"))
    ema_b = load_file(str(runs["killed"] / "checkpoints" / "step_00000060" / "ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_checkpoints_complete_kept_and_resumable_only_when_marked(runs):
    ckpts = runs["straight"] / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000020", "step_00000040", "step_00000060"]
    for p in ckpts.glob("step_*"):
        assert (p / MARKER).exists() and (p / "ema.safetensors").exists()
        assert sorted(f.name for f in (p / "rng").iterdir()) == [
            "rank_00000.json", "rank_00000.safetensors", "rank_00001.json", "rank_00001.safetensors"]
        state = json.loads((p / "trainer.json").read_text())
        assert state["world_size"] == 2 and state["lanes"] == 2
    assert json.loads((ckpts / "latest.json").read_text())["step"] == STEPS
    assert not (ckpts / "latest").exists()  # DeepSpeed's unsynchronised tag file is never written


def test_zero0_and_zero2_agree(runs):
    a, b = losses(runs["straight"]), losses(runs["zero0"])
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL), step
    assert_same_ema(runs["straight"], runs["zero0"])  # ZeRO's partitions vs stage 0's equal shares


def test_one_rank_with_the_same_global_batch_agrees(runs):
    a, b = losses(runs["straight"]), losses(runs["one_rank"])
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL), step
    assert_same_ema(runs["straight"], runs["one_rank"])


def test_resume_on_fewer_ranks_through_universal_checkpoint(runs):
    assert "resumed from step 40" in runs["universal_stdout"]
    assert (runs["universal"] / "checkpoints" / "universal" / "step_00000040" / MARKER).exists()
    a, b = losses(runs["straight"]), losses(runs["universal"])
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(41, STEPS + 1):
        assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL), step
    state = json.loads((runs["universal"] / "checkpoints" / "step_00000060" / "trainer.json").read_text())
    assert state["world_size"] == 1 and state["lanes"] == 2
    assert_same_ema(runs["straight"], runs["universal"])  # two ranks' shares read back by one


def test_ray_train_workers_match_torchrun(runs, ray_session):
    from amused.training.config import load_config
    from amused.training.launch import train_on_ray

    cfg = load_config(str(write_config(runs["folder"], "ray", runs["dataset"], checkpoint={"every": STEPS})))
    result = train_on_ray(cfg, workers=2)
    assert result.step == STEPS and result.checkpoint.endswith(f"step_{STEPS:08d}")
    assert losses(Path(cfg.run_dir)) == losses(runs["straight"])  # the same ranks, so bit for bit
