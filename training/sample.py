"""MaskGIT-style sampling as aMUSEd does it, standing on its own (diffusers marks its
aMUSEd pipelines deprecated).

Each step: logits for [negative, prompt] in one batch, guided = neg + s * (cond - neg);
one token drawn per position from the softmax (known tokens kept); the mask ratio of
the schedule at (i + 1) / N decides how many of the drawn tokens go back under the mask:
the least confident, confidence = log p + temperature_i * Gumbel noise, temperature
annealed linearly. The random draws are made in the same order and shapes as
diffusers' AmusedScheduler, so for the same weights, prompt and seed the tokens are the
same (tests/test_sample.py pins this against diffusers 0.42.1).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import UVit2DModel

from training.config import SampleConfig


def _mask_ratio(schedule: str, progress: torch.Tensor) -> torch.Tensor:
    return torch.cos(progress * math.pi / 2) if schedule == "cosine" else 1 - progress


def _gumbel(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    u = torch.zeros(shape, dtype=like.dtype, device=device).uniform_(0, 1, generator=generator).to(like.device)
    return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))


@torch.no_grad()
def decode_tokens(model: UVit2DModel, hidden: torch.Tensor, pooled: torch.Tensor, neg_hidden: torch.Tensor,
                  neg_pooled: torch.Tensor, size: tuple[int, int], cfg: SampleConfig,
                  generator: torch.Generator | None = None, tokens: torch.Tensor | None = None,
                  starting_mask_ratio: float = 1.0) -> torch.Tensor:
    """Token ids (B, h, w) for text embeddings (B, L, D) / (B, P).

    `tokens` (B, h, w) starts the decoding from partly known ids (mask id where unknown),
    as inpainting and variations do; known ids are never resampled.
    """
    mask_id = model.config.vocab_size - 1
    side = model.config.sample_size
    b = hidden.shape[0]
    device = hidden.device
    latents = tokens.clone() if tokens is not None else torch.full((b, side, side), mask_id, dtype=torch.long,
                                                                    device=device)
    guided = cfg.guidance_scale > 1.0
    width, height = size
    micro = torch.tensor([width, height, cfg.crop_top, cfg.crop_left, cfg.aesthetic_score], device=device,
                         dtype=hidden.dtype).expand(2 * b if guided else b, -1)
    if guided:
        hidden, pooled = torch.cat([neg_hidden, hidden]), torch.cat([neg_pooled, pooled])
    temperatures = torch.linspace(cfg.temperature_start, cfg.temperature_end, cfg.steps, device=device)
    seq = side * side
    for i in range(cfg.steps):
        logits = model(torch.cat([latents] * 2) if guided else latents, micro_conds=micro, pooled_text_emb=pooled,
                       encoder_hidden_states=hidden)
        if guided:
            uncond, cond = logits.chunk(2)
            logits = uncond + cfg.guidance_scale * (cond - uncond)
        flat = latents.reshape(b, seq)
        unknown = flat == mask_id
        probs = logits.reshape(b, logits.shape[1], seq).permute(0, 2, 1).softmax(-1)
        draw_from = probs.to(generator.device) if generator is not None else probs
        drawn = torch.multinomial(draw_from.float().reshape(-1, probs.shape[-1]), 1, generator=generator)
        drawn = torch.where(unknown, drawn.to(device)[:, 0].view(b, seq), flat)
        if i == cfg.steps - 1:
            latents = drawn.view(b, side, side)
            break
        ratio = starting_mask_ratio * _mask_ratio(cfg.schedule, torch.tensor((i + 1) / cfg.steps, device=device))
        mask_len = (seq * ratio).floor().reshape(1, 1)
        mask_len = torch.clamp(torch.minimum(unknown.sum(-1, keepdim=True) - 1, mask_len), min=1)
        chosen = torch.gather(probs, -1, drawn[:, :, None])[:, :, 0]
        chosen = torch.where(unknown, chosen, torch.finfo(chosen.dtype).max)
        confidence = torch.log(chosen.clamp(1e-20)) + temperatures[i] * _gumbel(chosen.shape, chosen, generator)
        cut_off = torch.gather(confidence.sort(-1).values, 1, mask_len.long())
        latents = torch.where(confidence < cut_off, mask_id, drawn).view(b, side, side)
    return latents


def load_trained_model(checkpoint: str | Path, ema: bool = True) -> UVit2DModel:
    """The U-ViT of a training checkpoint folder: the architecture from its config, the
    weights from `ema.safetensors` (default) or DeepSpeed's model states (weights only)."""
    from safetensors.torch import load_file

    from training.checkpoint import module_weights
    from training.config import load_config
    from training.model import build_model

    folder = Path(checkpoint)
    if not (folder / "COMPLETE").exists():
        raise ValueError(f"{folder} is not a complete training checkpoint (no COMPLETE marker)")
    cfg = load_config(str(folder / "config.yaml"))
    model = build_model(cfg.model.preset, cfg.model.pretrained)
    weights = load_file(str(folder / "ema.safetensors")) if ema else module_weights(folder)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def sample_images(model: UVit2DModel, vqgan: str, text_encoder: str, prompts: list[str], cfg: SampleConfig,
                  seed: int, device: str = "cpu") -> tuple[torch.Tensor, np.ndarray]:
    """Token ids and uint8 images for prompts; one generator seeded once, so a seed gives
    the same images every time."""
    from tokenizer import ImageTokenizer, TextEncoder

    text = TextEncoder.from_pretrained(text_encoder, device=device)
    image = ImageTokenizer.from_pretrained(vqgan, device=device)
    cond, neg = text.encode(prompts), text.encode([cfg.negative_prompt] * len(prompts))
    side = model.config.sample_size * image.downsample
    tokens = decode_tokens(model.to(device), cond.hidden_states, cond.pooled, neg.hidden_states, neg.pooled,
                           (side, side), cfg, generator=torch.Generator().manual_seed(seed))
    return tokens, image.decode(tokens)
