"""Exponential moving average of the trained weights, averaged from the optimizer's fp32
master copy (training/master.py), each rank its own share of it.

Under bf16 the module's weights are bf16 roundings of the master (8 bits of mantissa: an
update below 1/256 of a weight leaves its bf16 value unchanged, and late in training
nearly every update is that small), so an average of the module's weights would average
the roundings, not the training. Each rank averages its own pieces of the master (its
ZeRO partition, or under stage 0 an equal share): no communication in a step and 1/world
of the memory. A checkpoint's `ema.safetensors` stays one whole fp32 file with the
parameters' names and shapes (what sampling, export and evaluation read): `save` gathers
the pieces into it on rank 0, and `load` gives every rank its pieces back from it, on any
number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from amused.training.master import Piece, master_pieces


class EMA:
    """The average of this rank's master pieces. `shapes`: every trained parameter's name
    and shape (the whole file's); `device`: where `save` gathers (the training device)."""

    def __init__(self, pieces: list[Piece], shapes: dict[str, torch.Size], decay: float, warmup: bool,
                 device: torch.device):
        self.pieces, self.shapes, self.device = pieces, shapes, device
        self.decay, self.warmup = decay, warmup
        self.shadow = [p.values.detach().clone() for p in pieces]
        self.updates = 0

    @classmethod
    def of(cls, engine, decay: float, warmup: bool, device: torch.device) -> "EMA":
        """Every rank, once DeepSpeed has loaded any checkpoint (a load links the parameters
        to their master pieces anew)."""
        shapes = {n: p.shape for n, p in engine.module.named_parameters() if p.requires_grad}
        return cls(master_pieces(engine, dist.get_rank(), dist.get_world_size()), shapes, decay, warmup, device)

    def current_decay(self) -> float:
        # aMUSEd's warm-up: min((1 + s) / (10 + s), decay), s counting updates.
        s = self.updates
        return min((1 + s) / (10 + s), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step (every rank; no communication)."""
        if self.shadow:
            torch._foreach_lerp_(self.shadow, [p.values for p in self.pieces], 1.0 - self.current_decay())
        self.updates += 1

    @torch.no_grad()
    def save(self, path: str) -> None:
        """Every rank (a collective): rank 0 writes the whole average to `path`."""
        rank = dist.get_rank()
        mine = {p.name: (p.start, s) for p, s in zip(self.pieces, self.shadow)}
        whole = {}
        for name, shape in self.shapes.items():
            buffer = torch.zeros(shape.numel(), dtype=torch.float32, device=self.device)
            if name in mine:
                start, values = mine[name]
                buffer[start:start + values.numel()] = values
            # Each value is one rank's and zero on the others: a sum of the bit patterns as
            # integers is that value's bits exactly (a float sum would turn -0.0 into 0.0).
            dist.reduce(buffer.view(torch.int32), dst=0)
            if rank == 0:
                whole[name] = buffer.view(shape).cpu()
        if rank == 0:
            save_file(whole, path, metadata={"updates": str(self.updates)})

    @torch.no_grad()
    def load(self, path: str) -> None:
        """Every rank: its pieces from a whole `ema.safetensors` (written on any number of ranks)."""
        with safe_open(path, framework="pt") as fh:
            shapes = {n: torch.Size(fh.get_slice(n).get_shape()) for n in fh.keys()}
            if shapes != self.shapes:
                wrong = sorted(set(shapes) ^ set(self.shapes)) or \
                    sorted(n for n in shapes if shapes[n] != self.shapes[n])
                raise ValueError(f"{path}: EMA parameters do not match the model's trained ones (e.g. {wrong[:2]})")
            self.updates = int(fh.metadata()["updates"])
            for piece, shadow in zip(self.pieces, self.shadow):
                flat = fh.get_tensor(piece.name).view(-1)
                shadow.copy_(flat[piece.start:piece.start + shadow.numel()])
