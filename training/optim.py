"""The optimizer a training run steps with, built from `optim:` (training/config.py).

`adamw8bit` is bitsandbytes' block-wise 8-bit AdamW, on CUDA and on CPU alike (one code
path; bitsandbytes 0.50 runs its 8-bit blockwise update on CPU too): both moments are
kept as uint8 codes with one fp32 scale per block of 256 values, so the states take about
a quarter of AdamW's 8 bytes per trained value. Tensors under 4096 values keep fp32 states
(bitsandbytes' `min_8bit_size`); under ZeRO 1/2 DeepSpeed hands the optimizer one flat
fp32 partition per parameter group, so nearly everything is 8-bit there.

Its checkpoints hold the codes and scales (`state1`, `absmax1`, ...) instead of AdamW's
`exp_avg`/`exp_avg_sq`: an exact resume on the same number of ranks works as for AdamW;
DeepSpeed's universal conversion (a resume on another number of ranks) knows only the
fp32 moments, so `check_resume` refuses that before any work.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from amused.training.config import OptimConfig


def build_optimizer(optim: OptimConfig, param_groups: list[dict], device: torch.device | str = "cpu"
                    ) -> torch.optim.Optimizer:
    """The optimizer over `param_groups` (each group may carry its own `weight_decay`) for
    parameters that train on `device` (they may still be on the CPU: DeepSpeed moves them)."""
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.name == "adamw8bit":
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    # torch's AdamW: DeepSpeed's FusedAdam needs a CUDA build of its own (nvcc at start-up).
    # On CUDA its fused kernel updates every tensor of a group in a few launches instead of a
    # dozen elementwise kernels over all of them; the CPU keeps the default (foreach) one,
    # which the CPU figures and tests were made with.
    return torch.optim.AdamW(param_groups, **kwargs, fused=torch.device(device).type == "cuda" or None)


def check_resume(optim: OptimConfig, universal: bool) -> None:
    """Refuses, before any work, a resume its optimizer states cannot survive."""
    if universal and optim.name == "adamw8bit":
        raise ValueError("optim.name=adamw8bit checkpoints resume only on the number of ranks that wrote them "
                         "(their trainer.json world_size): DeepSpeed's universal conversion for another number "
                         "of ranks reads AdamW's fp32 moments only, not 8-bit states")
