"""The optimizer a training run steps with, built from `optim:` (training/config.py)."""

from __future__ import annotations

import torch

from amused.training.config import OptimConfig


def build_optimizer(optim: OptimConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    if optim.name != "adamw":
        raise ValueError(f"optim.name={optim.name!r} is not available yet")
    # A torch AdamW: DeepSpeed's own needs a C++ build and behaves the same.
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
