"""Every preset of the table builds, and the built models have the shapes the table says:
run on torch's meta device (shapes only, no weights or arithmetic)."""

import pytest
import torch

from amused.tokenizer.image import build_vqgan
from amused.tokenizer.presets import CLIP_TEXT_COMMON, CLIP_TEXT_CONFIGS, UVIT_CONFIGS, VQGAN_CONFIGS, downsample_of
from amused.tokenizer.text import build_clip_text
from amused.training.uvit.model import build_model, mask_id


@pytest.mark.parametrize("name", list(VQGAN_CONFIGS))
def test_vqgan_token_grid(name):
    factor = downsample_of(VQGAN_CONFIGS[name]["block_out_channels"])
    with torch.device("meta"):
        latents = build_vqgan(name).encode(torch.zeros(1, 3, 4 * factor, 4 * factor)).latents
    assert tuple(latents.shape[-2:]) == (4, 4)


@pytest.mark.parametrize("name", list(UVIT_CONFIGS))
def test_uvit_predicts_a_code_per_token(name):
    cfg = UVIT_CONFIGS[name]
    side = cfg["sample_size"]
    with torch.device("meta"):
        model = build_model(name)
        logits = model(torch.zeros(1, side, side, dtype=torch.long), torch.zeros(1, 77, cfg["encoder_hidden_size"]),
                       torch.zeros(1, cfg["cond_embed_dim"]), torch.zeros(1, 5))
    assert tuple(logits.shape) == (1, cfg["codebook_size"], side, side)
    assert mask_id(model) >= cfg["codebook_size"]


@pytest.mark.parametrize("name", list(CLIP_TEXT_CONFIGS))
def test_clip_text_outputs(name):
    cfg = CLIP_TEXT_CONFIGS[name]
    seq = CLIP_TEXT_COMMON["max_position_embeddings"]
    with torch.device("meta"):
        out = build_clip_text(name)(torch.zeros(1, seq, dtype=torch.long), output_hidden_states=True)
    assert tuple(out.hidden_states[-2].shape) == (1, seq, cfg["hidden_size"])
    assert tuple(out.text_embeds.shape) == (1, cfg["projection_dim"])


def test_unknown_presets_name_the_choices():
    with pytest.raises(ValueError, match="unknown VQ-GAN preset 'huge'; one of: amused, tiny, small"):
        build_vqgan("huge")
    with pytest.raises(ValueError, match="unknown CLIP text preset 'huge'; one of: amused, tiny"):
        build_clip_text("huge")
    with pytest.raises(ValueError, match="unknown U-ViT preset 'huge'; one of: amused-256"):
        build_model("huge")
