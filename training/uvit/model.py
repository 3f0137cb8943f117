"""The U-ViT: presets equal to the released aMUSEd transformers, loading, and the parts
diffusers gets wrong for training (activation checkpointing, weight-decay groups)."""

from __future__ import annotations

import functools

import torch
from diffusers import UVit2DModel
from torch.utils.checkpoint import checkpoint

from amused.plumbing.storage import local_folder, resolve_subfolder
from amused.tokenizer.presets import UVIT_CONFIGS

_AMUSED = dict(
    hidden_size=1024, num_hidden_layers=22, num_attention_heads=16, intermediate_size=2816, in_channels=768,
    block_out_channels=768, num_res_blocks=3, block_num_heads=12, codebook_size=8192, vocab_size=8256,
    encoder_hidden_size=768, cond_embed_dim=768, micro_cond_encode_dim=256, micro_cond_embed_dim=1280,
    use_bias=False, layer_norm_eps=1e-6, ln_elementwise_affine=True, hidden_dropout=0.0, attention_dropout=0.0,
)
PRESETS = {
    "amused-256": dict(_AMUSED, downsample=False, upsample=False, sample_size=16),
    "amused-512": dict(_AMUSED, downsample=True, upsample=True, sample_size=32),
    **{name: dict(cfg) for name, cfg in UVIT_CONFIGS.items()},
}
# Order of the micro-conditioning values, as aMUSEd feeds them.
MICRO_CONDS = ("orig_width", "orig_height", "crop_top", "crop_left", "aesthetic_score")


def build_model(preset: str, pretrained: str | None = None) -> UVit2DModel:
    """Random weights of a preset, or a diffusers UVit2DModel folder (safetensors only)."""
    if pretrained is None:
        return UVit2DModel(**PRESETS[preset])
    folder = local_folder(resolve_subfolder(pretrained, ("transformer",)))
    return UVit2DModel.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)


def token_grid(model: UVit2DModel) -> tuple[int, int]:
    side = model.config.sample_size
    return side, side


def mask_id(model: UVit2DModel) -> int:
    return model.config.vocab_size - 1


def enable_activation_checkpointing(model: UVit2DModel) -> None:
    """Recompute each transformer layer in the backward pass.

    diffusers' own switch wraps the layers in a function that takes positional arguments
    only and calls them with keywords, so it crashes (diffusers #11214). Here each
    layer's `forward` is replaced on the instance by a non-reentrant checkpoint that
    forwards keywords; parameter names and state dicts stay as they were.
    """
    for layer in model.transformer_layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases and embeddings (aMUSEd)."""
    no_decay_types = (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm)
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, no_decay_types) or "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if is_norm or name == "bias" or param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
