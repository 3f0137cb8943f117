"""int8 inference (`training/inference/quantize.py`) on the tiny models: what is quantized,
that it samples, how close its tokens stay to fp32's, and the folder diffusers opens."""

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import AmusedPipeline, UVit2DModel
from torchao.quantization import Int8Tensor, quantize_

from amused.orchestration.cli import main
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.text import TextEncoder
from amused.training.config import SampleConfig
from amused.training.inference.quantize import (
    KEEP_FLOAT,
    ao_config,
    quantize_folder,
    quantize_uvit,
    quantized_linear,
    weight_bytes,
)
from amused.training.inference.sample import Sampler, load_trained_model
from amused.training.uvit.model import build_model

PROMPTS = ["a red circle on a grey background", "a blue square", "a green triangle", "a yellow star"]


@pytest.fixture(scope="module")
def parts(tiny_models):
    return (ImageTokenizer.from_pretrained(str(tiny_models), device="cpu"),
            TextEncoder.from_pretrained(str(tiny_models), device="cpu"))


def test_int8_linears_quantized_the_rest_float(tiny_models):
    fp32 = UVit2DModel.from_pretrained(tiny_models / "transformer")
    model = quantize_uvit(copy.deepcopy(fp32), "int8", "cpu", compile=False)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = {name for name in linears if KEEP_FLOAT.search(name)}
    assert kept and len(kept) < len(linears)
    for name, m in linears.items():
        assert isinstance(m.weight, Int8Tensor) is (name not in kept), name
        assert m.weight.dtype == torch.float32  # a quantized weight still reports its float dtype
    assert type(model.mlm_layer.conv2.weight) is torch.nn.Parameter  # the output head
    assert weight_bytes(model) < 0.6 * weight_bytes(fp32)


def test_int8_sampler_gives_images(tiny_models, parts):
    model = quantize_uvit(UVit2DModel.from_pretrained(tiny_models / "transformer"), "int8", "cpu", compile=False)
    sampler = Sampler(model, *parts)
    tokens = sampler.generate(PROMPTS, SampleConfig(steps=4), torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 8, 8) and (tokens < model.config.vocab_size - 1).all()
    images = sampler.decode(tokens)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 0


def test_int8_tokens_mostly_equal_fp32(trained_checkpoint, parts):
    """8 images, each from its own seed. Measured 87-89% of tokens equal (3 batches of 4,
    this 4-step checkpoint); one token drawn differently early changes the later draws,
    so equality is a share, not all."""
    fp32 = load_trained_model(trained_checkpoint)
    int8 = quantize_uvit(copy.deepcopy(fp32), "int8", "cpu", compile=False)
    prompts = PROMPTS * 2

    def tokens(model):
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return Sampler(model, *parts).generate(prompts, SampleConfig(steps=12), generators)

    equal = (tokens(fp32) == tokens(int8)).float().mean().item()
    print(f"int8 tokens equal to fp32's: {equal:.3f}")
    assert equal > 0.75


def test_quantized_folder_opens_in_diffusers_with_our_outputs(tiny_models, tmp_path):
    fp32 = UVit2DModel.from_pretrained(tiny_models / "transformer")
    fp32.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    quantize_folder(tmp_path / "transformer", "int8", "cpu")
    assert [p.name for p in tmp_path.iterdir()] == ["transformer"]
    loaded = UVit2DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.float32)
    ours = fp32.eval()  # what a saved folder holds: the portable (7-bit activation) range on any CPU
    quantize_(ours, ao_config("int8", "cpu", portable=True), filter_fn=quantized_linear)
    assert isinstance(loaded.transformer_layers[0].attn1.to_q.weight, Int8Tensor)
    assert type(loaded.transformer_layers[0].norm1.linear.weight) is torch.nn.Parameter
    ids = torch.randint(0, 64, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    args = dict(micro_conds=torch.tensor([[64.0, 64, 0, 0, 6]] * 2), pooled_text_emb=torch.randn(2, 32),
                encoder_hidden_states=torch.randn(2, 77, 32))
    with torch.no_grad():
        assert torch.equal(loaded(ids, **args), ours(ids, **args))


@pytest.mark.slow
def test_the_command_line_samples_int8_compiled(trained_checkpoint, tiny_models, tmp_path):
    """`amused sample --quantize int8` on CPU: quantized and compiled (about a minute here)."""
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", trained_checkpoint, "--prompt", PROMPTS[0], "--output", str(grid),
                 "--steps", "2", "--quantize", "int8", "--vqgan", str(tiny_models / "vqgan"),
                 "--text-encoder", str(tiny_models)]) == 0
    assert grid.is_file()


def test_the_command_line_exports_int8(trained_checkpoint, tiny_models, tmp_path):
    """`amused export --quantize int8` writes a pipeline diffusers reopens with an int8 U-ViT
    (torch_dtype=float32 keeps the layers left float in fp32) and a float VQ-GAN."""
    out = tmp_path / "int8-pipe"
    assert main(["export", "--checkpoint", trained_checkpoint, "--output", str(out), "--quantize", "int8",
                 "--vqgan", str(tiny_models / "vqgan"), "--text-encoder", str(tiny_models)]) == 0
    pipe = AmusedPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert isinstance(pipe.transformer.transformer_layers[0].attn1.to_q.weight, Int8Tensor)
    assert not isinstance(pipe.vqvae.decoder.conv_in.weight, Int8Tensor)
    assert json.loads((out / "amused_export.json").read_text())["quantize"] == "int8"
    with pytest.raises(ValueError, match="quantized U-ViT"):  # not a base to train or sample float from
        build_model("small", str(out))
