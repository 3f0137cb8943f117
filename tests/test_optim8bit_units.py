"""optim.name=adamw8bit: bitsandbytes' 8-bit AdamW as built from the config (CPU), and
the resume it refuses."""

import pytest
import torch

from amused.training.config import OptimConfig
from amused.training.optim import build_optimizer, check_resume

pytestmark = pytest.mark.unit


def _step(name: str, params: list[torch.Tensor], groups: list[dict]) -> torch.optim.Optimizer:
    opt = build_optimizer(OptimConfig(name=name, lr=1e-2, weight_decay=0.1), groups)
    sum(p.square().sum() for p in params).backward()
    opt.step()
    return opt


def test_adamw8bit_keeps_uint8_moments_and_the_groups_weight_decay():
    torch.manual_seed(0)
    big, small = torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(64))
    opt = _step("adamw8bit", [big, small], [{"params": [big], "weight_decay": 0.1},
                                            {"params": [small], "weight_decay": 0.0}])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    state = opt.state[big]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    assert state["state1"].shape == big.shape
    # Tensors under 4096 values keep fp32 moments (bitsandbytes' min_8bit_size).
    assert opt.state[small]["state1"].dtype == torch.float32
    # The same update direction as AdamW's (first step: -lr * sign(grad), plus the decay).
    torch.manual_seed(0)
    ref_big, ref_small = torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(64))
    _step("adamw", [ref_big, ref_small], [{"params": [ref_big], "weight_decay": 0.1},
                                          {"params": [ref_small], "weight_decay": 0.0}])
    torch.testing.assert_close(big.detach(), ref_big.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(small.detach(), ref_small.detach(), atol=1e-6, rtol=0)


def test_a_resume_on_another_number_of_ranks_is_refused_for_8bit_states_only():
    with pytest.raises(ValueError, match="optim.name=adamw8bit checkpoints resume only on the number of ranks"):
        check_resume(OptimConfig(name="adamw8bit"), universal=True)
    check_resume(OptimConfig(name="adamw8bit"), universal=False)
    check_resume(OptimConfig(name="adamw"), universal=True)
