"""The presets table states true facts: each VQ-GAN's down-sampling and token grid, each
U-ViT's vocabulary and heads, and that every U-ViT takes the tokens and text of the
VQ-GAN and CLIP tower it is meant for. Plain arithmetic on the table: no model is built."""

import pytest

from amused.tokenizer.presets import (
    CLIP_TEXT_COMMON,
    CLIP_TEXT_CONFIGS,
    CLIP_VISION_CONFIGS,
    UVIT_CONFIGS,
    VQGAN_CONFIGS,
    downsample_of,
    preset,
)

pytestmark = pytest.mark.unit

# What the table's comments say: pixels per token side, and the grid at one resolution.
VQGAN_FACTS = {"amused": (16, 256, 16), "tiny": (8, 64, 8), "small": (2, 32, 16)}
# U-ViT -> (VQ-GAN, CLIP text tower, resolution) it is meant for; bench-train reads a
# synthetic token dataset sized to it, so it has no partner.
UVIT_PARTNERS = {
    "amused-256": ("amused", "amused", 256),
    "amused-512": ("amused", "amused", 512),
    "tiny": ("tiny", "tiny", 64),
    "small": ("small", "tiny", 32),
    "bench-sample": ("tiny", "tiny", 128),
}


def test_every_preset_is_described():
    assert set(VQGAN_FACTS) == set(VQGAN_CONFIGS)
    assert set(UVIT_PARTNERS) | {"bench-train"} == set(UVIT_CONFIGS)


@pytest.mark.parametrize("name", list(VQGAN_CONFIGS))
def test_vqgan_downsampling_and_grid(name):
    cfg = VQGAN_CONFIGS[name]
    factor, resolution, grid = VQGAN_FACTS[name]
    assert downsample_of(cfg["block_out_channels"]) == factor
    assert resolution // factor == grid
    assert all(c % cfg["norm_num_groups"] == 0 for c in cfg["block_out_channels"])
    assert cfg["num_vq_embeddings"] <= 2**16  # token ids are stored as uint16


@pytest.mark.parametrize("name", list(UVIT_CONFIGS))
def test_uvit_vocabulary_and_heads(name):
    cfg = UVIT_CONFIGS[name]
    # Ids above the codebook are special; the last one is the mask.
    assert cfg["vocab_size"] > cfg["codebook_size"]
    assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0
    assert cfg["block_out_channels"] % cfg["block_num_heads"] == 0
    assert cfg.get("downsample", False) == cfg.get("upsample", False)
    assert cfg["sample_size"] % (2 if cfg.get("downsample") else 1) == 0


@pytest.mark.parametrize("name", list(UVIT_PARTNERS))
def test_uvit_takes_its_partners_tokens_and_text(name):
    cfg = UVIT_CONFIGS[name]
    vq_name, text_name, resolution = UVIT_PARTNERS[name]
    vq, text = VQGAN_CONFIGS[vq_name], CLIP_TEXT_CONFIGS[text_name]
    assert resolution // downsample_of(vq["block_out_channels"]) == cfg["sample_size"]
    assert cfg["codebook_size"] == vq["num_vq_embeddings"]
    assert cfg["encoder_hidden_size"] == text["hidden_size"]
    assert cfg["cond_embed_dim"] == text["projection_dim"]


def test_released_amused_sizes():
    for name, side in (("amused-256", 16), ("amused-512", 32)):
        cfg = UVIT_CONFIGS[name]
        assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["codebook_size"]) == \
            (1024, 22, 8256, 8192)
        assert cfg["sample_size"] == side
    assert UVIT_CONFIGS["amused-512"]["downsample"] and not UVIT_CONFIGS["amused-256"]["downsample"]


@pytest.mark.parametrize("name", list(CLIP_TEXT_CONFIGS))
def test_clip_text_heads_and_special_tokens(name):
    cfg = CLIP_TEXT_CONFIGS[name]
    assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0
    # Start and end of text are the BPE vocabulary's last two ids.
    vocab = CLIP_TEXT_COMMON["vocab_size"]
    assert (CLIP_TEXT_COMMON["bos_token_id"], CLIP_TEXT_COMMON["eos_token_id"]) == (vocab - 2, vocab - 1)


def test_tiny_clip_vision_patches_and_heads():
    vision = CLIP_VISION_CONFIGS["tiny"]
    assert vision["image_size"] % vision["patch_size"] == 0
    assert vision["hidden_size"] % vision["num_attention_heads"] == 0


def test_unknown_preset_names_the_choices():
    assert preset(UVIT_CONFIGS, "U-ViT", "tiny") is UVIT_CONFIGS["tiny"]
    with pytest.raises(ValueError, match=r"unknown U-ViT preset 'huge'; one of: amused-256, amused-512, tiny"):
        preset(UVIT_CONFIGS, "U-ViT", "huge")
