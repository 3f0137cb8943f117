"""aMUSEd's masked-token objective.

All randomness of an optimizer step (mask ratios, which tokens, rectangles, condition
dropout) is drawn for the whole global batch from a generator seeded by (seed, step),
laid out as (lanes, rows per lane), and each rank takes its lanes' slice. The masks of
a sample therefore do not depend on the number of ranks, the gradient accumulation or
a restart, and nothing about them needs saving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class StepMasks:
    masked: torch.Tensor  # (lanes, rows, H, W) bool
    drop_cond: torch.Tensor  # (lanes, rows) bool
    rectangles: bool

    def micro(self, lanes: range, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of one micro-step: lane-major, as the reader lays out a batch."""
        masked = self.masked[lanes.start:lanes.stop, rows]
        drop = self.drop_cond[lanes.start:lanes.stop, rows]
        return masked.reshape(-1, *masked.shape[2:]), drop.reshape(-1)

    def total_masked(self) -> int:
        return int(self.masked.sum())


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def draw_masks(seed: int, step: int, lanes: int, rows: int, grid: tuple[int, int], rect_prob: float,
               cond_drop_prob: float) -> StepMasks:
    g = step_generator(seed, step)
    h, w = grid
    seq = h * w
    # Cosine schedule: ratio cos(pi/2 * t), t ~ U(0, 1); at least one token per sample.
    t = torch.rand(lanes, rows, generator=g)
    n_masked = (torch.cos(t * math.pi / 2) * seq).round().clamp(min=1, max=seq).long()
    drop_cond = torch.rand(lanes, rows, generator=g) < cond_drop_prob
    rectangles = bool(torch.rand((), generator=g) < rect_prob)
    if rectangles:
        masked = _rectangles(n_masked, h, w, g)
    else:
        rank = torch.rand(lanes, rows, seq, generator=g).argsort(-1).argsort(-1)
        masked = (rank < n_masked[..., None]).reshape(lanes, rows, h, w)
    return StepMasks(masked=masked, drop_cond=drop_cond, rectangles=rectangles)


def _rectangles(n_masked: torch.Tensor, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """One rectangle per sample with about `n` tokens, random aspect and place (helps
    zero-shot inpainting)."""
    flat = n_masked.flatten()
    u = torch.rand(len(flat), 3, generator=g)
    out = torch.zeros(len(flat), h, w, dtype=torch.bool)
    for i, n in enumerate(flat.tolist()):
        lo = max(1, math.ceil(n / w))
        rh = min(h, lo + int(u[i, 0] * (min(h, n) - lo + 1)))
        rw = min(w, max(1, math.ceil(n / rh)))
        top = int(u[i, 1] * (h - rh + 1))
        left = int(u[i, 2] * (w - rw + 1))
        out[i, top:top + rh, left:left + rw] = True
    return out.reshape(*n_masked.shape, h, w)


@dataclass
class LossParts:
    loss: torch.Tensor  # what this rank back-propagates
    ce_sum: torch.Tensor  # summed (smoothed) cross-entropy of this rank's masked tokens, for logging
    correct: torch.Tensor  # argmax hits on them
    count: int


def masked_loss(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, label_smoothing: float,
                scale: float) -> LossParts:
    """Cross-entropy over the codebook on masked positions only.

    `scale` turns this rank's sum into its share of the global-batch mean; the caller
    sets it to (ranks x accumulation) / masked tokens in the global batch, which DeepSpeed's
    averaging over ranks and micro-steps then undoes, so the gradient is that of the mean
    over every masked token of the step however the batch is split.
    """
    picked = logits.permute(0, 2, 3, 1)[masked].float()
    labels = tokens[masked]
    ce = F.cross_entropy(picked, labels, reduction="sum", label_smoothing=label_smoothing)
    with torch.no_grad():
        correct = (picked.argmax(-1) == labels).sum()
    return LossParts(loss=ce * scale, ce_sum=ce.detach(), correct=correct, count=int(labels.numel()))
