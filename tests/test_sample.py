"""The sampler against diffusers' AmusedPipeline (pinned: diffusers 0.42.1)."""

import diffusers
import pytest
import torch
from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from tokenizer import TextEncoder
from training.sample import SampleConfig, decode_tokens

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
