"""The fp32 master weights (training/master.py) under bf16 on CPU (DeepSpeed runs bf16
there too), with ZeRO 2 and stage 0 through the engine's own DeepSpeed config: the EMA
averages them (training/ema.py), each rank its share, its file written whole and read
back; rows written through them outlive the next step (the VQ-GAN's dead codes)."""

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from amused.training.config import parse_config
from amused.training.distributed import Layout, in_process_group
from amused.training.ema import EMA
from amused.training.engine import _deepspeed_engine
from amused.training.master import split, write_rows_through

N = 1000
LR = 1e-4


@pytest.mark.unit
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_the_ranks_split_the_values_so_each_is_one_ranks(world):
    whole = [("a", torch.arange(5.0)), ("b", torch.arange(5.0, 6.0)), ("c", torch.arange(6.0, 17.0))]
    seen = []
    for rank in range(world):
        for piece in split(whole, rank, world):
            flat = dict(whole)[piece.name]
            assert piece.values.data_ptr() == flat[piece.start:].data_ptr()  # a view: the optimizer updates it
            seen += piece.values.tolist()
    assert sorted(seen) == list(range(17))


class _Ones(torch.nn.Module):
    """One weight vector of ones; loss = sum(w * x) with x = 1 gives a gradient of exactly 1."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(N))

    def forward(self, x):
        return (self.w * x).sum()


def _steps(zero_stage: int, steps: int, folder) -> dict:
    cfg = parse_config({"run_dir": str(folder), "steps": steps,
                        "data": {"dataset": "unused", "global_batch_size": 1, "micro_batch_size": 1},
                        "optim": {"lr": LR, "warmup_steps": 0, "weight_decay": 0.0},
                        "engine": {"zero_stage": zero_stage, "precision": "bf16"}})
    model = _Ones()
    task = SimpleNamespace(model=model, layout=Layout.plan(1, 1, 1, 1),
                           param_groups=lambda wd: [{"params": [model.w], "weight_decay": wd}])
    engine = _deepspeed_engine(cfg, task, bf16=True, universal=False, device=torch.device("cpu"))
    ema = EMA.of(engine, decay=0.5, warmup=False, device=torch.device("cpu"))
    masters = []
    for _ in range(steps):
        engine.backward(engine(torch.ones(N, dtype=torch.bfloat16)))
        engine.step()
        ema.update()
        # What the torch optimizer itself updates (ZeRO: this rank's flat partition, padded).
        held = torch.cat([p.detach().view(-1) for g in engine.basic_optimizer.param_groups for p in g["params"]])
        masters.append(held[:N].clone())
    ema.save(str(folder / "ema.safetensors"))
    again = EMA.of(engine, decay=0.5, warmup=False, device=torch.device("cpu"))
    again.load(str(folder / "ema.safetensors"))
    return {"weights": engine.module.w.detach().clone(), "pieces": [p.values.clone() for p in ema.pieces],
            "masters": masters, "optimizer": type(engine.optimizer).__name__, "ema": ema.shadow,
            "reloaded": again.shadow, "updates": again.updates}


@pytest.mark.parametrize("zero_stage, optimizer", [(2, "DeepSpeedZeroOptimizer"), (0, "FP16_UnfusedOptimizer")])
def test_under_bf16_the_ema_follows_the_fp32_master_not_the_rounded_weights(tmp_path, zero_stage, optimizer):
    steps = 5
    out = in_process_group(_steps, zero_stage, steps, tmp_path)
    assert out["optimizer"] == optimizer  # the DeepSpeed wrapper whose master copy is read
    (piece,) = out["pieces"]
    assert piece.dtype == torch.float32 and torch.equal(piece, out["masters"][-1])
    # Adam on a constant gradient moves each weight by about lr a step: 1 - 5e-4 or so in
    # fp32, which bf16 (spacing 2^-8 below 1) still rounds to 1.
    assert out["weights"].dtype == torch.bfloat16 and bool((out["weights"] == 1).all())
    assert 1 - 6 * LR < float(piece.max()) < 1 - 3 * LR
    expected = torch.ones(N)
    for master in out["masters"]:
        expected = 0.5 * expected + 0.5 * master
    (ema,) = out["ema"]
    assert torch.allclose(ema, expected, rtol=0, atol=1e-7)
    assert float(ema.max()) < 1 - 2 * LR  # an average of the bf16 weights would have stayed at 1
    (reloaded,) = out["reloaded"]
    assert torch.equal(reloaded, ema) and out["updates"] == steps
    with safe_open(str(tmp_path / "ema.safetensors"), framework="pt") as fh:
        assert list(fh.keys()) == ["w"] and fh.get_tensor("w").dtype == torch.float32


def _write_through(through: bool) -> torch.Tensor:
    cfg = parse_config({"run_dir": "unused", "steps": 1,
                        "data": {"dataset": "unused", "global_batch_size": 1, "micro_batch_size": 1},
                        "optim": {"lr": LR, "warmup_steps": 0, "weight_decay": 0.0},
                        "engine": {"zero_stage": 0, "precision": "bf16"}})
    model = _Ones()
    task = SimpleNamespace(model=model, layout=Layout.plan(1, 1, 1, 1),
                           param_groups=lambda wd: [{"params": [model.w], "weight_decay": wd}])
    engine = _deepspeed_engine(cfg, task, bf16=True, universal=False, device=torch.device("cpu"))
    rows = torch.arange(10)
    with torch.no_grad():
        engine.module.w[rows] = 4.0  # as the VQ-GAN's dead codes are moved, after a step
    if through:
        write_rows_through(engine, "w", rows)
    engine.backward(engine(torch.ones(N, dtype=torch.bfloat16)))
    engine.step()
    return engine.module.w.detach().float()


def test_rows_written_through_the_master_outlive_the_next_step():
    kept, lost = in_process_group(_write_through, True), in_process_group(_write_through, False)
    assert bool((kept[:10] == 4.0).all()) and bool((kept[10:] == 1.0).all())  # 4 - 1e-4 rounds to 4 in bf16
    assert bool((lost == 1.0).all())  # without: the master's old values came back
