"""The sampler against diffusers' AmusedPipeline (pinned: diffusers 0.42.1)."""

from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    AmusedImg2ImgPipeline,
    AmusedInpaintPipeline,
    AmusedPipeline,
    AmusedScheduler,
    UVit2DModel,
    VQModel,
)
from PIL import Image
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from amused.orchestration.cli import main
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.text import TextEncoder
from amused.training.config import SampleConfig
from amused.training.inference.sample import Sampler, decode_tokens, load_trained_model, token_mask

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


def _picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 8 px blocks, 64 px


def _sampler(pipe, tiny_models) -> Sampler:
    return Sampler(pipe.transformer, ImageTokenizer(pipe.vqvae, device="cpu"),
                   TextEncoder.from_pretrained(str(tiny_models), device="cpu"))


def _pil(array: np.ndarray):
    return Image.fromarray(array)


@pytest.mark.parametrize("guidance, steps, seed", [(10.0, 12, 0), (1.0, 8, 1)])
def test_inpainting_equals_amused_inpaint_pipeline_and_keeps_unmasked_tokens(pipe, tiny_models, guidance, steps,
                                                                               seed):
    parts = {k: v for k, v in pipe.components.items() if k != "scheduler"}
    inpaint = AmusedInpaintPipeline(**parts, scheduler=AmusedScheduler(mask_token_id=pipe.scheduler.config.mask_token_id))
    image = _picture(seed)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 16:56] = 255  # 4 x 5 of the 8 x 8 tokens
    want = inpaint(PROMPTS, image=[_pil(image)] * 2, mask_image=[_pil(mask)] * 2, num_inference_steps=steps,
                   guidance_scale=guidance, output_type="latent", generator=torch.Generator().manual_seed(seed)).images
    sampler = _sampler(pipe, tiny_models)
    cfg = SampleConfig(steps=steps, guidance_scale=guidance)
    got = sampler.inpaint(PROMPTS, image, mask, cfg, torch.Generator().manual_seed(seed))
    assert torch.equal(got, want)

    known = torch.from_numpy(sampler.image.encode(image[None]).astype(np.int64))[0]
    hole = torch.zeros(8, 8, dtype=torch.bool)
    hole[1:5, 2:7] = True
    assert torch.equal(torch.from_numpy(token_mask(mask, (8, 8))), hole)
    assert (got[:, ~hole] == known[~hole]).all()  # every unmasked token kept
    assert (got[:, hole] != known[hole]).any()  # and the hole regenerated, not copied
    assert (got != pipe.transformer.config.vocab_size - 1).all()


def test_variation_equals_amused_img2img_pipeline(pipe, tiny_models):
    parts = {k: v for k, v in pipe.components.items() if k != "scheduler"}
    img2img = AmusedImg2ImgPipeline(**parts, scheduler=AmusedScheduler(mask_token_id=pipe.scheduler.config.mask_token_id))
    image = _picture(5)
    want = img2img(PROMPTS, image=[_pil(image)] * 2, strength=0.5, num_inference_steps=12, output_type="latent",
                   generator=torch.Generator().manual_seed(4)).images
    sampler = _sampler(pipe, tiny_models)
    got = sampler.vary(PROMPTS, image, 0.5, SampleConfig(), torch.Generator().manual_seed(4))
    assert torch.equal(got, want)
    known = torch.from_numpy(sampler.image.encode(image[None]).astype(np.int64))
    # strength 0.5 re-masks cos(pi/4) = 71% of the tokens: ~29% stay the picture's (1/64 by chance)
    assert (got == known).float().mean() > 0.2
    with pytest.raises(ValueError, match="strength"):
        sampler.vary(PROMPTS, image, 0.05, SampleConfig(), None)


def test_per_image_generators_make_images_independent_of_the_batch(pipe, tiny_models):
    sampler = _sampler(pipe, tiny_models)
    prompts = PROMPTS + ["a green triangle"]
    cfg = SampleConfig(steps=6)
    together = sampler.generate(prompts, cfg, [torch.Generator().manual_seed(100 + i) for i in range(3)])
    alone = [sampler.generate([p], cfg, [torch.Generator().manual_seed(100 + i)]) for i, p in enumerate(prompts)]
    assert torch.equal(together, torch.cat(alone))
    assert not torch.equal(together[0], together[1])


def test_amused_sample_from_a_training_checkpoint(tmp_path, tiny_models, trained_checkpoint):
    png = tmp_path / "grid.png"
    models = ["--vqgan", str(tiny_models / "vqgan"), "--text-encoder", str(tiny_models)]
    assert main(["sample", "--checkpoint", trained_checkpoint, "--prompt", "a red circle", "--prompt", "a blue square",
                 "--output", str(png), "--steps", "4", "--seed", "7", *models]) == 0
    grid = Image.open(png)
    assert grid.size == (2 * 128, 128 + 36)  # two 64 px images in 128 px cells, captions below

    cfg = SampleConfig(steps=4)
    prompts = ["a red circle", "a blue square"]

    def sample(model):
        sampler = Sampler.from_folders(model, str(tiny_models / "vqgan"), str(tiny_models))
        tokens = sampler.generate(prompts, cfg, torch.Generator().manual_seed(7))
        return tokens, sampler.decode(tokens)

    tokens, images = sample(load_trained_model(trained_checkpoint))
    again, _ = sample(load_trained_model(trained_checkpoint))
    raw, _ = sample(load_trained_model(trained_checkpoint, ema=False))
    assert torch.equal(tokens, again) and not torch.equal(tokens, raw)
    assert images.shape == (2, 64, 64, 3)
    cells = [grid.crop((i * 128, 0, i * 128 + 128, 128)).resize((64, 64), Image.Resampling.NEAREST) for i in range(2)]
    assert all((np.asarray(c) == images[i]).all() for i, c in enumerate(cells))
    with pytest.raises(ValueError, match="not a complete training checkpoint"):
        load_trained_model(Path(trained_checkpoint).parent)

    picture, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(_picture(1)).resize((96, 80)).save(picture)  # not square, not 64 px: fitted like the sampler
    hole = np.zeros((80, 96), np.uint8)
    hole[:, 48:] = 255
    Image.fromarray(hole).save(mask)
    for extra in (["--image", str(picture), "--mask", str(mask)], ["--image", str(picture), "--strength", "0.5"]):
        out = tmp_path / f"{extra[-2][2:]}.png"
        assert main(["sample", "--checkpoint", trained_checkpoint, "--prompt", "a red circle", "--output", str(out),
                     "--steps", "4", *models, *extra]) == 0
        assert Image.open(out).size == (128, 128 + 36)
    assert main(["sample", "--checkpoint", trained_checkpoint, "--prompt", "x", "--output", str(out), *models,
                 "--mask", str(mask)]) == 1
