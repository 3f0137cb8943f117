"""The U-ViT: building from the presets table (`tokenizer.presets.UVIT_CONFIGS`, whose
aMUSEd entries equal the released transformers), loading, the parts diffusers gets
wrong for training (activation checkpointing, weight-decay groups) and compiling its layers."""

from __future__ import annotations

import functools

import torch
from diffusers import UVit2DModel
from torch.utils.checkpoint import checkpoint

from amused.plumbing.storage import local_folder, resolve_subfolder
from amused.tokenizer.presets import UVIT_CONFIGS, preset

# Order of the micro-conditioning values, as aMUSEd feeds them.
MICRO_CONDS = ("orig_width", "orig_height", "crop_top", "crop_left", "aesthetic_score")


def build_model(name: str, pretrained: str | None = None) -> UVit2DModel:
    """Random weights of a preset, or a diffusers UVit2DModel folder (safetensors only)."""
    if pretrained is None:
        return UVit2DModel(**preset(UVIT_CONFIGS, "U-ViT", name))
    folder = local_folder(resolve_subfolder(pretrained, ("transformer",)))
    if "quantization_config" in UVit2DModel.load_config(folder):
        raise ValueError(f"{pretrained} holds a quantized U-ViT (amused export --quantize), an inference folder: "
                         "train and sample from the float export instead")
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


def compile_transformer_blocks(model: UVit2DModel) -> None:
    """torch.compile each transformer layer in place (`nn.Module.compile`): the module tree,
    parameter names and state dicts stay as they were (no `_orig_mod.` wrapper), so the
    checkpoints, the EMA, exports and resumes never see it. The layers are alike and their
    weights are graph inputs (PyTorch inlines built-in modules), so one compiled graph serves
    all of them: the compile time of one layer, not of the whole model. With activation
    checkpointing the checkpoint is traced inside the compiled layer."""
    for layer in model.transformer_layers:
        layer.compile()


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
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # DeepSpeed's ZeRO drops an empty group (LoRA's adapters are all matrices), which the lr schedule would miss.
    return [group for group in groups if group["params"]]
