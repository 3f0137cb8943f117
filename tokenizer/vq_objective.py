"""What training a VQ-GAN needs beyond diffusers' `VQModel`: a forward pass that keeps
the terms apart, codebook health, the patch discriminator and PSNR.

diffusers' quantizer returns one mixed loss and, for models that look codes up from the
codebook (aMUSEd's), `decode` expects ids; training needs the codebook and commitment
terms separately (own weights), a straight-through estimator, and the ids to watch
codebook usage, so the pass is assembled here from the model's own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import VQModel
from torch import nn

from amused.tokenizer.image import nearest_codes


@dataclass
class VQForward:
    reconstruction: torch.Tensor  # (N, 3, H, W), the decoder's output for the quantised latents
    latents: torch.Tensor  # (N, C, h, w) encoder output after quant_conv
    quantized: torch.Tensor  # (N, C, h, w) codebook rows
    ids: torch.Tensor  # (N, h, w)


def vq_forward(model: VQModel, pixels: torch.Tensor) -> VQForward:
    """Encode, quantise to the nearest code, decode through a straight-through estimator
    (the decoder's gradient reaches the encoder as if quantisation were the identity)."""
    z = model.quant_conv(model.encoder(pixels))
    n, c, h, w = z.shape
    codebook = model.quantize.embedding.weight
    ids = nearest_codes(z.detach().permute(0, 2, 3, 1).reshape(-1, c).float(), codebook.detach().float())
    # An embedding lookup, not `codebook[ids]`: indexing's backward adds the rows of codes
    # chosen many times with atomic adds on every CPU thread (unless torch is in its
    # deterministic mode), so their gradient summed in whatever order the threads ran and
    # two runs drifted apart; the embedding's backward sums in a fixed order.
    z_q = F.embedding(ids, codebook).view(n, h, w, c).permute(0, 3, 1, 2)
    straight = z + (z_q - z).detach()
    quant2 = model.post_quant_conv(straight)
    out = model.decoder(quant2, straight if model.config.norm_type == "spatial" else None)
    return VQForward(out, z, z_q, ids.view(n, h, w))


def codebook_loss(fwd: VQForward) -> torch.Tensor:
    """Moves the chosen codes towards the encoder outputs (gradient to the codebook only)."""
    return F.mse_loss(fwd.quantized, fwd.latents.detach())


def commitment_loss(fwd: VQForward) -> torch.Tensor:
    """Keeps the encoder close to its codes (gradient to the encoder only)."""
    return F.mse_loss(fwd.latents, fwd.quantized.detach())


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]."""
    mse = (a.float().clamp(0, 1) - b.float().clamp(0, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def usage_and_perplexity(counts: torch.Tensor) -> tuple[float, float]:
    """Fraction of codes used, and exp(entropy) of the usage distribution (0 when empty)."""
    counts = counts.double()
    if counts.sum() == 0:
        return 0.0, 0.0
    p = counts[counts > 0] / counts.sum()
    return float((counts > 0).double().mean()), float(torch.exp(-(p * p.log()).sum()))


class CodebookHealth:
    """Code counts over the last `window` batches: usage (fraction of codes seen),
    perplexity (exp of the usage distribution's entropy; = codebook size when uniform)
    and the dead codes (unseen in the window)."""

    def __init__(self, size: int, window: int):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.size, self.window = size, window
        self.history: list[torch.Tensor] = []

    def update(self, ids: torch.Tensor) -> None:
        self.history.append(torch.bincount(ids.flatten().cpu(), minlength=self.size))
        del self.history[:-self.window]

    def counts(self) -> torch.Tensor:
        return torch.stack(self.history).sum(0) if self.history else torch.zeros(self.size, dtype=torch.long)

    def usage(self) -> float:
        return usage_and_perplexity(self.counts())[0]

    def perplexity(self) -> float:
        return usage_and_perplexity(self.counts())[1]

    def dead(self) -> torch.Tensor:
        return torch.nonzero(self.counts() == 0).flatten()

    def state_dict(self) -> dict:
        return {"size": self.size, "window": self.window, "history": [h.tolist() for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if (state["size"], state["window"]) != (self.size, self.window):
            raise ValueError(f"codebook health of size/window {state['size']}/{state['window']} "
                             f"does not match {self.size}/{self.window}")
        self.history = [torch.tensor(h, dtype=torch.long) for h in state["history"]]


@torch.no_grad()
def reinit_dead_codes(codebook: nn.Embedding, dead: torch.Tensor, latents: torch.Tensor | None,
                      generator: torch.Generator, share: Callable[[torch.Tensor], None] | None = None) -> int:
    """Moves each dead code onto a randomly chosen recent encoder output (N, C), so that
    it is some latent's nearest code again. Returns how many were moved.

    Over several ranks every codebook must stay the same: every rank calls this with the
    same `dead`, rank 0 draws the new rows from its `latents` (the others pass None), and
    `share(rows)` copies rank 0's rows into every rank's, in place (a broadcast)."""
    if latents is None and share is None:
        raise ValueError("reinit_dead_codes needs latents to draw from, or share() to receive rank 0's rows")
    if len(dead) == 0 or (latents is not None and len(latents) == 0):
        return 0  # nothing dead, or no latents seen yet: the codes wait for the next call
    weight = codebook.weight
    rows = torch.empty(len(dead), weight.shape[1], device=weight.device, dtype=weight.dtype)
    if latents is not None:
        rows.copy_(latents[torch.randint(len(latents), (len(dead),), generator=generator)])
    if share is not None:
        share(rows)
    weight[dead.to(weight.device)] = rows
    return len(dead)


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convolutions, one real/fake logit per receptive-field patch.
    GroupNorm instead of BatchNorm so that a rank's statistics never depend on the
    others' batches (and a micro-batch of 1 works)."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers + 1):
            out = width * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2)]
            ch = out
        blocks.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)  # [0, 1] pixels, as the aMUSEd VQ-GAN reads them


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


@dataclass
class VQLossWeights:
    """Weights of the VQ-GAN training terms. Default: L1 pixels + codebook + 0.25 x
    commitment, adversarial term 0.1 from `adversarial_start` (0 = never)."""

    l1: float = 1.0
    l2: float = 0.0
    codebook: float = 1.0
    commitment: float = 0.25
    adversarial: float = 0.1
    adversarial_start: int = 0

    def __post_init__(self):
        for name in ("l1", "l2", "codebook", "commitment", "adversarial"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        if self.l1 == 0 and self.l2 == 0:
            raise ValueError("at least one pixel reconstruction term (l1 or l2) must have a weight > 0")
        if self.adversarial_start < 0:
            raise ValueError(f"adversarial_start must be >= 0, got {self.adversarial_start}")

    def adversarial_on(self, step: int) -> bool:
        return self.adversarial > 0 and self.adversarial_start > 0 and step >= self.adversarial_start


def vqgan_losses(vq: VQModel, discriminator: PatchDiscriminator | None, pixels: torch.Tensor,
                 weights: VQLossWeights, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], VQForward]:
    """One loss whose single backward trains both players: the generator's adversarial
    term runs the discriminator with detached parameters (its gradient reaches the VQ-GAN
    only), the discriminator's hinge term sees detached reconstructions (its gradient
    reaches the discriminator only). So one optimizer (one DeepSpeed engine) steps both."""
    fwd = vq_forward(vq, pixels)
    terms = {"codebook": codebook_loss(fwd), "commitment": commitment_loss(fwd)}
    if weights.l1:
        terms["l1"] = F.l1_loss(fwd.reconstruction, pixels)
    if weights.l2:
        terms["l2"] = F.mse_loss(fwd.reconstruction, pixels)
    if discriminator is not None and weights.adversarial_on(step):
        frozen = {k: v.detach() for k, v in discriminator.named_parameters()}
        fake_for_g = torch.func.functional_call(discriminator, frozen, (fwd.reconstruction,))
        terms["adversarial"] = generator_adversarial_loss(fake_for_g)
        terms["discriminator"] = discriminator_hinge_loss(discriminator(pixels),
                                                          discriminator(fwd.reconstruction.detach()))
    total = sum(getattr(weights, k) * v for k, v in terms.items() if k != "discriminator")
    if "discriminator" in terms:
        total = total + terms["discriminator"]
    return total, terms, fwd
