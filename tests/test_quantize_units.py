"""Which quantization `quantize_uvit` picks, and its refusal (no model run)."""

import pytest
import torch
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

from amused.training.inference.quantize import ao_config, quantized_linear

pytestmark = pytest.mark.unit


def test_cpu_dynamic_activations_gpu_weight_only():
    assert isinstance(ao_config("int8", "cpu"), Int8DynamicActivationInt8WeightConfig)
    assert isinstance(ao_config("int8", "cuda"), Int8WeightOnlyConfig)


@pytest.mark.parametrize("mode", ["int4", "fp8", "INT8", ""])
def test_unknown_mode_refused(mode):
    with pytest.raises(ValueError, match=rf"unknown quantization '{mode}'; one of: int8"):
        ao_config(mode, "cpu")


@pytest.mark.parametrize("name, quantized", [
    ("transformer_layers.3.attn1.to_q", True), ("transformer_layers.3.ff.net.0.proj", True),
    ("down_block.res_blocks.0.channelwise_linear_1", True), ("encoder_proj", True),
    ("down_block.attention_blocks.0.kv_mapper", True),
    ("transformer_layers.3.norm1.linear", False), ("transformer_layers.3.norm3.linear", False),
    ("cond_embed.linear_2", False), ("up_block.res_blocks.2.cond_embeds_mapper", False),
])
def test_per_image_linears_stay_float(name, quantized):
    assert quantized_linear(torch.nn.Linear(2, 2), name) is quantized
    assert not quantized_linear(torch.nn.Conv2d(2, 2, 1), name)  # the output head is a 1x1 conv
