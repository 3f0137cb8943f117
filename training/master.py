"""Where the fp32 master copy of a DeepSpeed engine's trained weights is.

Under bf16 the module's weights are bf16 roundings of the optimizer's fp32 master weights,
which the optimizer updates and copies (rounded) into the module after each step. So the
master is what to read for anything averaged over steps (the EMA), and what to write when
a weight is changed outside the optimizer (the VQ-GAN's dead codes): a write to the
module's weight alone is overwritten at the next step.
- ZeRO 1/2: each rank's optimizer holds one fp32 partition of every parameter group, and
  DeepSpeed links each parameter to its piece of this rank's partition (`_hp_mapping`;
  None where the partition holds none of it), in fp32 as in bf16.
- Stage 0 under bf16: DeepSpeed's bf16 wrapper keeps a whole fp32 copy of every parameter
  on every rank (`FP16_UnfusedOptimizer`, around a torch optimizer as ours: one tensor
  per parameter; `FP16_Optimizer`, around DeepSpeed's FusedAdam: one flat tensor per
  group); stage 0 in fp32: the module's parameters are the master themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer


@dataclass(frozen=True)
class Piece:
    """Values [start, start + numel) of a parameter's flattened fp32 master, as a 1-D view
    that the optimizer updates in place."""

    name: str
    start: int
    values: torch.Tensor


def _trained(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def whole_masters(engine) -> dict[str, torch.Tensor] | None:
    """Stage 0: every trained parameter's whole fp32 master (flat views, updated in place by
    the optimizer); None under ZeRO 1/2, where a rank holds pieces only (`master_pieces`)."""
    trained = _trained(engine)
    if any(hasattr(p, "_hp_mapping") for _, p in trained):
        return None
    names, whole = {id(p): n for n, p in trained}, {}
    if isinstance(engine.optimizer, FP16_UnfusedOptimizer):  # what our torch optimizers get
        for params, masters in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups):
            whole.update((names[id(p)], m.view(-1)) for p, m in zip(params, masters))
        return {n: whole[n] for n, _ in trained}
    if isinstance(engine.optimizer, FP16_Optimizer):  # DeepSpeed's own FusedAdam gets this one
        for params, flat in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups_flat):
            offset = 0  # a group's parameters end to end, in order
            for p in params:
                whole[names[id(p)]] = flat.narrow(0, offset, p.numel())
                offset += p.numel()
        return {n: whole[n] for n, _ in trained}
    if any(p.dtype != torch.float32 for _, p in trained):
        raise TypeError(f"no fp32 master copy found for the {trained[0][1].dtype} weights of a "
                        f"{type(engine.optimizer).__name__}")
    return {n: p.detach().view(-1) for n, p in trained}


def master_pieces(engine, rank: int, world: int) -> list[Piece]:
    """This rank's share of the fp32 master of every trained parameter: under ZeRO 1/2 its
    partition's pieces; under stage 0, where every rank holds it whole, the r-th of `world`
    equal runs of the parameters' values laid end to end, as ZeRO would split them."""
    whole = whole_masters(engine)
    if whole is None:
        return [Piece(n, p._hp_mapping.lp_fragment_address.start, p._hp_mapping.hp_fragment)
                for n, p in _trained(engine) if p._hp_mapping is not None]
    return split(list(whole.items()), rank, world)


def split(whole: list[tuple[str, torch.Tensor]], rank: int, world: int) -> list[Piece]:
    """Rank `rank`'s share of flat tensors laid end to end: the r-th of `world` equal runs."""
    total = sum(t.numel() for _, t in whole)
    per_rank = -(-total // world)
    lo, hi = rank * per_rank, min(total, (rank + 1) * per_rank)
    pieces, offset = [], 0
    for name, flat in whole:
        a, b = max(lo, offset), min(hi, offset + flat.numel())
        if a < b:
            pieces.append(Piece(name, a - offset, flat.narrow(0, a - offset, b - a)))
        offset += flat.numel()
    return pieces


@torch.no_grad()
def write_rows_through(engine, name: str, rows: torch.Tensor) -> None:
    """After rows `rows` of the stage-0 parameter `name` were written in the module, the same
    values into its fp32 master, so the next step updates them instead of overwriting them."""
    param = dict(engine.module.named_parameters())[name]
    master = whole_masters(engine)
    if master is None:
        raise ValueError(f"{name}: under ZeRO 1/2 the master is partitioned across ranks; writing through "
                         "it needs engine.zero_stage: 0")
    target = master[name].view(param.shape)
    if target.data_ptr() != param.data_ptr():  # fp32 stage 0: the module's weight is the master
        target[rows] = param[rows].float()
