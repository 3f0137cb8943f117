"""8-bit inference of the U-ViT with torchao: `amused sample --quantize int8`.

`int8` is dynamic int8 activations with int8 weights (per row, symmetric) on CPU, and
int8 weights alone on a GPU (where the matmuls of one image are memory-bound). Only the
U-ViT's `nn.Linear` layers are quantized, all but those that see one row per image (the
adaLN modulations `*.norm*.linear`, the conditioning embedding `cond_embed.linear_*`,
the res blocks' `cond_embeds_mapper`): they cost nothing per token, and their error
would reach every token. The output head (`mlm_layer.conv2`, a 1x1 conv), the VQ-GAN
and the text encoder stay float.

torchao's int8 x int8 matmul on CPU is written for Inductor: eager it falls back to an
int32 matmul (16x slower than fp32 on an AVX2 CPU); `torch.compile` with Inductor's
freezing lowers it to oneDNN's int8 GEMM. So on CPU `quantize_uvit` compiles the model
by default. On a CPU without VNNI the activations take the reduced 7-bit range that
torchao asks for there (`should_reduce_range`: the u8s8 products would overflow), and
the compiled int8 model is slower than fp32 (2.6x on this project's AVX2 CPU): there it
buys weight memory (0.46x of fp32's bytes for aMUSEd-256), not speed.

Export: diffusers 0.42.1 quantizes a `UVit2DModel` at load time
(`from_pretrained(folder, quantization_config=diffusers_config(...))`, the same modules
and weights as `quantize_uvit`, outputs equal), and its `save_pretrained` writes that
model as safetensors (torchao >= 0.16 flattens `Int8Tensor`) with the config in
config.json, which `UVit2DModel.from_pretrained(folder, torch_dtype=torch.float32)`
opens again quantized: `quantize_folder` rewrites a float transformer folder that way.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import TorchAoConfig, UVit2DModel
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8Tensor, Int8WeightOnlyConfig, quantize_
from torchao.utils import should_reduce_range

MODES = ("int8",)
# The linears that run on one row per image stay float (module docstring).
KEEP_FLOAT = re.compile(r"(^|\.)(norm\d*\.linear|cond_embed\.linear_\d+|cond_embeds_mapper)$")


def ao_config(mode: str, device: str | torch.device, portable: bool = False):
    """The torchao config of `mode` on `device`. `portable` (a saved folder): the reduced
    7-bit range whatever this CPU has, since the folder may run on a CPU without VNNI,
    where the full range overflows, and the same export must give the same bytes anywhere."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; one of: {', '.join(MODES)}")
    device = torch.device(device)
    if device.type == "cpu":
        return Int8DynamicActivationInt8WeightConfig(reduce_range=portable or should_reduce_range(device))
    return Int8WeightOnlyConfig()


def quantized_linear(module: torch.nn.Module, fqn: str) -> bool:
    """Whether the U-ViT's module named `fqn` is quantized."""
    return isinstance(module, torch.nn.Linear) and not KEEP_FLOAT.search(fqn)


def quantize_uvit(model: UVit2DModel, mode: str, device: str | torch.device, compile: bool | None = None
                  ) -> torch.nn.Module:
    """The U-ViT moved to `device`, its linears quantized in place (module docstring).

    `compile` (default: on CPU, where torchao's int8 matmul needs it) wraps it in
    `torch.compile` with Inductor's freezing: the first call of each batch size compiles
    (seconds for the demo's model, minutes for aMUSEd-256 on 2 cores)."""
    config = ao_config(mode, device)
    model = model.to(device).eval()
    quantize_(model, config, filter_fn=quantized_linear)
    if compile is None:
        compile = torch.device(device).type == "cpu"
    if compile:
        # Freezing folds the int8 weights in as constants, the form oneDNN's int8 GEMM takes.
        return torch.compile(model, options={"freezing": True})
    return model


def float_linears(model: UVit2DModel) -> list[str]:
    """The names of the linears `quantize_uvit` keeps float."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not quantized_linear(module, name)]


def diffusers_config(mode: str, device: str | torch.device, folder: str | Path, portable: bool = False
                     ) -> TorchAoConfig:
    """diffusers' load-time `quantization_config` doing what `quantize_uvit` does to the
    U-ViT saved in `folder`."""
    with torch.device("meta"):
        skeleton = UVit2DModel.from_config(UVit2DModel.load_config(folder))
    return TorchAoConfig(ao_config(mode, device, portable), modules_to_not_convert=float_linears(skeleton))


def quantize_folder(folder: str | Path, mode: str, device: str | torch.device = "cpu") -> Path:
    """Rewrites the float U-ViT folder (config.json + safetensors) as its `mode`
    quantization for `device`, which `UVit2DModel.from_pretrained(folder,
    torch_dtype=torch.float32)` opens quantized. Written beside it, then swapped in."""
    folder = Path(folder)
    # fp32 for the layers kept float: diffusers would load them in bf16 otherwise.
    model = UVit2DModel.from_pretrained(folder, quantization_config=diffusers_config(mode, device, folder,
                                                                                     portable=True),
                                        torch_dtype=torch.float32)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters as stored (int8 data + scales for quantized ones)."""
    total = 0
    for p in model.parameters():
        if isinstance(p, Int8Tensor):
            total += p.qdata.numel() * p.qdata.element_size() + p.scale.numel() * p.scale.element_size()
        else:
            total += p.numel() * p.element_size()
    return total
