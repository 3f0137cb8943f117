"""LoRA adapters (peft) on the U-ViT, through diffusers' own adapter API, so the names
and scaling are the ones `AmusedPipeline.load_lora_weights` reads and writes."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig

from amused.training.config import LoraConfig

ADAPTER = "default"


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Adds the adapters to `model` (in place) and freezes every other weight."""
    model.requires_grad_(False)
    model.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                     target_modules=list(cfg.target_modules), init_lora_weights="gaussian"),
                      adapter_name=ADAPTER)
    return model
