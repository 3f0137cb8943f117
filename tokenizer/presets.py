"""The model presets table: every architecture this project builds from scratch, by name.

Plain dicts of constructor arguments, so configs can check a preset name against the
keys without importing torch. Each model's module builds from its table:
`tokenizer.image.build_vqgan` (diffusers VQModel), `tokenizer.text.build_clip_text`
(transformers CLIPTextModelWithProjection), `training.uvit.model.build_model`
(diffusers UVit2DModel). The tiny random models for tests and the demo are written by
`amused.demo.tiny_models` from these same entries.
"""

from __future__ import annotations

# Diffusers VQModel arguments; the down-sampling factor follows from block_out_channels
# (`downsample_of` below).
VQGAN_CONFIGS = {
    # aMUSEd's VQ-GAN: 16x, 256 px -> 16x16 tokens, 512 px -> 32x32.
    "amused": dict(
        block_out_channels=[128, 256, 256, 512, 768],
        layers_per_block=2,
        latent_channels=64,
        num_vq_embeddings=8192,
        norm_num_groups=32,
    ),
    # For fast tests of the plumbing: narrow, and 8x (not 16x) so that 64 px test images
    # still give an 8x8 token grid.
    "tiny": dict(
        block_out_channels=[16, 32, 32, 64],
        layers_per_block=1,
        latent_channels=16,
        num_vq_embeddings=64,
        norm_num_groups=8,
    ),
    # The one to *train* on a CPU (the demo's): one 2x down-sampling, 32 px -> 16x16
    # tokens of 256 codes. With 4x (8x8 tokens) small shapes came back as rounded blobs:
    # 50% of round trips read right, against 81-99.7% with 2x (README, "VQ-GAN training").
    "small": dict(
        block_out_channels=[32, 64],
        layers_per_block=1,
        latent_channels=16,
        num_vq_embeddings=256,
        norm_num_groups=8,
    ),
}

# What every CLIP text tower here shares: OpenAI's BPE vocabulary (its last two ids are
# start and end of text), 77 positions and quick-GELU, as in CLIP ViT-L/14.
CLIP_TEXT_COMMON = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                        eos_token_id=49407, pad_token_id=1)
CLIP_TEXT_CONFIGS = {
    # CLIP ViT-L/14 text tower.
    "amused": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32),
}
# The image tower of the tiny two-tower CLIP that the demo's CLIP score reads.
CLIP_VISION_CONFIGS = {
    "tiny": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, hidden_act="quick_gelu"),
}

# A U-ViT takes `sample_size` x `sample_size` tokens of `codebook_size` codes; its ids
# above the codebook are special, the last (vocab_size - 1) the mask. Its text inputs
# are a CLIP tower's hidden states (`encoder_hidden_size`) and projected pooled
# embedding (`cond_embed_dim`).
_AMUSED = dict(
    hidden_size=1024, num_hidden_layers=22, num_attention_heads=16, intermediate_size=2816, in_channels=768,
    block_out_channels=768, num_res_blocks=3, block_num_heads=12, codebook_size=8192, vocab_size=8256,
    encoder_hidden_size=768, cond_embed_dim=768, micro_cond_encode_dim=256, micro_cond_embed_dim=1280,
    use_bias=False, layer_norm_eps=1e-6, ln_elementwise_affine=True, hidden_dropout=0.0, attention_dropout=0.0,
)
UVIT_CONFIGS = {
    # The released aMUSEd transformers, on the aMUSEd VQ-GAN and CLIP ViT-L/14.
    "amused-256": dict(_AMUSED, downsample=False, upsample=False, sample_size=16),
    "amused-512": dict(_AMUSED, downsample=True, upsample=True, sample_size=32),
    # For the tiny VQ-GAN at 64 px (8x8 tokens) and the tiny CLIP text tower.
    "tiny": dict(
        hidden_size=32, cond_embed_dim=32, micro_cond_encode_dim=8, micro_cond_embed_dim=40,
        encoder_hidden_size=32, vocab_size=65, codebook_size=64, in_channels=16, block_out_channels=32,
        num_res_blocks=1, block_num_heads=2, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, sample_size=8,
    ),
    # For the `small` VQ-GAN's 16x16 tokens and the tiny CLIP text tower; the transformer
    # runs on 8x8 after a 2x down-sampling, as aMUSEd-512 does. The U-ViT has no position
    # embedding: a token knows where it is only from the zero padding of the 3x3
    # convolutions, so it takes aMUSEd's 3 conv blocks (a 7x7 view: every place of the 8x8
    # grid sees a border) to draw a shape where the caption's outline is; with 1 block it
    # drew colour blobs whatever the shape word. 64 conv channels (32 before) draw the
    # outlines cleanly: masked-token loss 1.49 vs 1.67 after the demo's 1600 steps, for
    # 27% more time per model step; a wider transformer (hidden 128) learned slower in
    # those steps.
    "small": dict(
        hidden_size=96, cond_embed_dim=32, micro_cond_encode_dim=8, micro_cond_embed_dim=40,
        encoder_hidden_size=32, vocab_size=257, codebook_size=256, in_channels=32, block_out_channels=64,
        num_res_blocks=3, block_num_heads=2, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=384, sample_size=16, downsample=True, upsample=True,
    ),
    # benchmarks/train.py's default: small enough for 2 CPU cores, big enough that a step
    # is real work (10.3M parameters); 1024 codes and 256-d text of a synthetic token dataset.
    "bench-train": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, in_channels=256,
        block_out_channels=256, num_res_blocks=1, block_num_heads=4, codebook_size=1024, vocab_size=1088,
        encoder_hidden_size=256, cond_embed_dim=256, micro_cond_encode_dim=64, micro_cond_embed_dim=320,
        sample_size=16, use_bias=False,
    ),
    # benchmarks/sample.py's default: real work on 2 CPU cores, sized to the tiny VQ-GAN
    # (64 codes; 16x16 tokens = 128 px) and the tiny CLIP text tower.
    "bench-sample": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, in_channels=256,
        block_out_channels=256, num_res_blocks=1, block_num_heads=4, codebook_size=64, vocab_size=65,
        encoder_hidden_size=32, cond_embed_dim=32, micro_cond_encode_dim=64, micro_cond_embed_dim=320,
        sample_size=16, use_bias=False,
    ),
}


def preset(table: dict[str, dict], kind: str, name: str) -> dict:
    """The entry `name` of a table above; an unknown name is one line naming the choices."""
    if name not in table:
        raise ValueError(f"unknown {kind} preset {name!r}; one of: {', '.join(table)}")
    return table[name]


def downsample_of(block_out_channels) -> int:
    """Pixels per token side of a diffusers VQModel: each block after the first halves."""
    return 2 ** (len(block_out_channels) - 1)
