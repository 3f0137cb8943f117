"""Exponential moving average of the weights, kept in fp32 on rank 0."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.updates = 0

    def current_decay(self) -> float:
        # aMUSEd's warm-up: min((1 + s) / (10 + s), decay), s counting updates.
        s = self.updates
        return min((1 + s) / (10 + s), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        weight = 1.0 - self.current_decay()
        shadow = [self.shadow[n] for n in self.names]
        current = [params[n].detach().to(device=shadow[0].device, dtype=torch.float32) for n in self.names]
        torch._foreach_lerp_(shadow, current, weight)
        self.updates += 1

    def save(self, path: str) -> None:
        save_file({n: t.contiguous() for n, t in self.shadow.items()}, path, metadata={"updates": str(self.updates)})

    def load(self, path: str) -> None:
        with safe_open(path, framework="pt") as fh:
            self.updates = int(fh.metadata()["updates"])
        loaded = load_file(path)
        if set(loaded) != set(self.shadow):
            raise ValueError(f"{path}: EMA parameters do not match the model")
        for n, t in loaded.items():
            self.shadow[n].copy_(t)
