"""The sampler against diffusers' AmusedPipeline (pinned: diffusers 0.42.1)."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from tokenizer import TextEncoder
from training.config import SampleConfig
from training.sample import decode_tokens

PROMPTS = ["a red circle on a grey background", "a blue square"]


@pytest.fixture(scope="module")
def pipe(tiny_models):
    torch.manual_seed(3)  # the tiny U-ViT's random weights give peaked enough logits to test with
    transformer = UVit2DModel.from_pretrained(tiny_models / "transformer")
    return AmusedPipeline(
        vqvae=VQModel.from_pretrained(tiny_models / "vqgan"),
        tokenizer=CLIPTokenizer.from_pretrained(tiny_models / "tokenizer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(tiny_models / "text_encoder"),
        transformer=transformer,
        scheduler=AmusedScheduler(mask_token_id=transformer.config.vocab_size - 1),
    )


def ours(pipe, tiny_models, cfg: SampleConfig, seed: int) -> torch.Tensor:
    text = TextEncoder.from_pretrained(str(tiny_models), device="cpu")
    cond, neg = text.encode(PROMPTS), text.encode([cfg.negative_prompt] * len(PROMPTS))
    side = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    return decode_tokens(pipe.transformer, cond.hidden_states, cond.pooled, neg.hidden_states, neg.pooled,
                         (side, side), cfg, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guidance, steps, seed", [(10.0, 12, 0), (1.0, 12, 1), (4.0, 5, 2)])
def test_tokens_equal_amused_pipeline(pipe, tiny_models, guidance, steps, seed):
    assert diffusers.__version__ == "0.42.1"
    want = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images
    got = ours(pipe, tiny_models, SampleConfig(steps=steps, guidance_scale=guidance), seed)
    assert got.shape == want.shape == (2, 8, 8)
    assert (got != pipe.transformer.config.vocab_size - 1).all()  # nothing left masked
    assert torch.equal(got, want)
    again = ours(pipe, tiny_models, SampleConfig(steps=steps, guidance_scale=guidance), seed)
    assert torch.equal(again, got)
    other = ours(pipe, tiny_models, SampleConfig(steps=steps, guidance_scale=guidance), seed + 10)
    assert not torch.equal(other, got)  # the draws matter, so equality above is not vacuous


def test_amused_sample_from_a_training_checkpoint(tmp_path, tiny_models):
    from PIL import Image

    from orchestration.cli import main
    from pipeline.synthetic import write_token_dataset
    from training.config import parse_config
    from training.engine import train
    from training.sample import load_trained_model, sample_images

    write_token_dataset(str(tmp_path / "tokens"), [64])
    result = train(parse_config({
        "run_dir": str(tmp_path / "run"), "steps": 4,
        "data": {"dataset": str(tmp_path / "tokens"), "global_batch_size": 8, "micro_batch_size": 8, "workers": 0},
        "model": {"preset": "tiny"}, "optim": {"lr": 1e-2, "warmup_steps": 1}, "ema": {"decay": 0.5},
        "checkpoint": {"every": 4}, "log": {"every": 4, "progress": False}}))
    png = tmp_path / "grid.png"
    models = ["--vqgan", str(tiny_models / "vqgan"), "--text-encoder", str(tiny_models)]
    assert main(["sample", "--checkpoint", result.checkpoint, "--prompt", "a red circle", "--prompt", "a blue square",
                 "--output", str(png), "--steps", "4", "--seed", "7", *models]) == 0
    grid = Image.open(png)
    assert grid.size == (2 * 128, 128 + 36)  # two 64 px images in 128 px cells, captions below

    cfg = SampleConfig(steps=4)
    ema = load_trained_model(result.checkpoint)
    args = (str(tiny_models / "vqgan"), str(tiny_models), ["a red circle", "a blue square"], cfg)
    tokens, images = sample_images(ema, *args, seed=7)
    again, _ = sample_images(load_trained_model(result.checkpoint), *args, seed=7)
    raw, _ = sample_images(load_trained_model(result.checkpoint, ema=False), *args, seed=7)
    assert torch.equal(tokens, again) and not torch.equal(tokens, raw)
    assert images.shape == (2, 64, 64, 3)
    cells = [grid.crop((i * 128, 0, i * 128 + 128, 128)).resize((64, 64), Image.Resampling.NEAREST) for i in range(2)]
    assert all((np.asarray(c) == images[i]).all() for i, c in enumerate(cells))
    with pytest.raises(ValueError, match="not a complete training checkpoint"):
        load_trained_model(tmp_path / "run")
