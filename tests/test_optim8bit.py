"""optim.name=adamw8bit (bitsandbytes' 8-bit AdamW) in the real DeepSpeed engine, in
process on CPU: it trains, its checkpointed optimizer states are 8-bit (bytes against
AdamW's), a resume gives the same losses and weights as the straight run, and DeepSpeed's
universal conversion (a resume on another number of ranks) cannot read its states, which
is why `check_resume` refuses that resume."""

import math
import subprocess
from pathlib import Path

import pytest
import torch

from amused.demo.datasets import write_token_dataset
from amused.training import checkpoint as ckpt
from amused.training.checkpoint import Checkpoint
from amused.training.config import parse_config
from amused.training.uvit.task import train
from tests.test_train import config, metrics
from tests.test_train_dist import run as dist_run
from tests.test_train_dist import torchrun, write_config


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("optim8bit") / "tokens")
    write_token_dataset(url, [300, 200, 150])
    return url


def run(run_dir: Path, tokens: str, steps: int, name: str = "adamw8bit", zero_stage: int = 2, **over):
    return train(parse_config(config(run_dir, tokens, steps=steps, checkpoint={"every": 3},
                                     optim={"name": name, "lr": 3e-3, "warmup_steps": 2},
                                     engine={"zero_stage": zero_stage}, **over)))


def state_bytes(folder: Path) -> tuple[int, set[torch.dtype], set[str]]:
    """The optimizer's own state in a checkpoint (its moments, without DeepSpeed's fp32
    master copy of the weights): bytes, the dtypes of its tensors over 4096 values, and
    the names of its state entries."""
    files = sorted(folder.glob("*_optim_states.pt"))
    if files:  # ZeRO 1/2: one file per rank
        states = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
                  ["base_optimizer_state"]["state"] for f in files]
    else:  # ZeRO 0: inside the model states
        states = [torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu",
                             weights_only=False)["optimizer"]["state"]]
    tensors, names = [], set()

    def collect(value):
        if torch.is_tensor(value):
            tensors.append(value)
        elif isinstance(value, dict):
            names.update(k for k in value if isinstance(k, str))
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    collect(states)
    return (sum(t.numel() * t.element_size() for t in tensors if t.ndim),
            {t.dtype for t in tensors if t.numel() > 4096}, names)


def straight_and_resumed(tmp_path: Path, tokens: str, zero_stage: int):
    straight = run(tmp_path / "straight", tokens, 6, zero_stage=zero_stage)
    run(tmp_path / "resumed", tokens, 3, zero_stage=zero_stage)
    resumed = run(tmp_path / "resumed", tokens, 6, zero_stage=zero_stage)
    assert resumed.resumed_from == 3 and straight.step == resumed.step == 6
    losses = [r["loss"] for r in metrics(tmp_path / "straight")]
    assert losses == [r["loss"] for r in metrics(tmp_path / "resumed")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.05, losses
    a = Checkpoint.at(straight.checkpoint).state_dict(ema=False)
    b = Checkpoint.at(resumed.checkpoint).state_dict(ema=False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight


def test_adamw8bit_trains_resumes_exactly_and_keeps_a_quarter_of_adamws_state(tmp_path, tokens):
    straight_and_resumed(tmp_path, tokens, zero_stage=2)
    adamw = run(tmp_path / "adamw", tokens, 3, name="adamw")
    at3 = Checkpoint.at(ckpt.step_folder(str(tmp_path / "straight"), 3))
    bytes8, dtypes8, _ = state_bytes(Path(at3.folder))
    bytes32, dtypes32, _ = state_bytes(Path(adamw.checkpoint))
    assert dtypes8 == {torch.uint8} and dtypes32 == {torch.float32}
    # 2 bytes + one fp32 scale per 256 values for each 8-bit moment, against 8; the
    # tiny model's norms and biases (one flat group of 2,064 values) stay fp32.
    assert 0.25 < bytes8 / bytes32 < 0.3, (bytes8, bytes32)
    # An 8-bit run is not AdamW's: its weights differ after the same steps.
    a, b = at3.state_dict(ema=False), Checkpoint.at(adamw.checkpoint).state_dict(ema=False)
    assert any(not torch.equal(a[k], b[k]) for k in a)

    # DeepSpeed's universal conversion reads AdamW's exp_avg/exp_avg_sq only: it fails on
    # the 8-bit states (hence `check_resume`); should a DeepSpeed release read them, this
    # fails and the refusal can go.
    with pytest.raises(RuntimeError, match="universal conversion .* failed(.|\n)*KeyError: 'exp_avg'"):
        ckpt.to_universal(str(tmp_path / "straight"), 6)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_adamw8bit_resumes_exactly_under_zero_0_and_1(tmp_path, tokens, zero_stage):
    straight = straight_and_resumed(tmp_path, tokens, zero_stage)
    _, dtypes, names = state_bytes(Path(straight.checkpoint))
    assert {"state1", "state2"} <= names and "exp_avg" not in names  # bitsandbytes' state
    # ZeRO 0 steps the model's own tensors, and the tiny model has none over 4096 values:
    # bitsandbytes keeps those moments in fp32 (aMUSEd-256's are 8-bit: benchmarks/finetune_memory.py).
    assert dtypes == ({torch.uint8} if zero_stage else set())


@pytest.mark.gpu
def test_adamw8bit_on_a_gpu_in_bf16(tmp_path, tokens):
    straight = straight_and_resumed(tmp_path, tokens, zero_stage=2)
    state = Checkpoint.at(straight.checkpoint).state_dict(ema=False)
    assert next(iter(state.values())).dtype == torch.bfloat16  # precision "auto" = bf16 on a GPU
    assert state_bytes(Path(straight.checkpoint))[1] == {torch.uint8}


@pytest.mark.slow
def test_adamw8bit_refuses_a_resume_on_another_number_of_ranks(tmp_path):
    """Two ranks write an 8-bit checkpoint; one rank refuses to resume it, before any
    universal conversion is attempted."""
    dataset = str(tmp_path / "tokens")
    write_token_dataset(dataset, [300, 200, 150])
    optim = {"name": "adamw8bit", "lr": 3e-3, "warmup_steps": 2}
    every = {"every": 3, "keep": 5}
    dist_run(torchrun(2, write_config(tmp_path, "run", dataset, steps=3, optim=optim, checkpoint=every)))
    proc = subprocess.run(torchrun(1, write_config(tmp_path, "run", dataset, steps=6, optim=optim, checkpoint=every,
                                                   data__micro_batch_size=16)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "optim.name=adamw8bit checkpoints resume only on the number of ranks" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoints" / "universal").exists()
