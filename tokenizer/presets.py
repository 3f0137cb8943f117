"""Small random models in the released layout, for tests, demos and benchmarks.

They are saved and then loaded through the same `from_pretrained(path)` code as real
weights. The CLIP tokenizer is the real one: OpenAI's BPE merges ship inside the
open_clip_torch package (installed without its dependencies), so no hub is needed.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import torch
from diffusers import UVit2DModel, VQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

# aMUSEd's architectures and tiny ones of the same shape. The tiny VQ-GAN
# downsamples 8x (not 16x) so that 64 px test images still give an 8x8 token grid. The
# small one downsamples 4x and is the one to *train* on a CPU: at 32 px (8x8 tokens) it
# reconstructs shape images better than their mean colour within ~500 steps, where the
# deeper tiny one still has not after 800 (measured: README, "VQ-GAN training").
VQGAN_CONFIGS = {
    "amused": dict(
        block_out_channels=[128, 256, 256, 512, 768],
        layers_per_block=2,
        latent_channels=64,
        num_vq_embeddings=8192,
        norm_num_groups=32,
    ),
    "tiny": dict(
        block_out_channels=[16, 32, 32, 64],
        layers_per_block=1,
        latent_channels=16,
        num_vq_embeddings=64,
        norm_num_groups=8,
    ),
    # One 2x down-sampling: 32 px -> 16x16 tokens. On a CPU this learns shapes in
    # minutes; 4x (8x8 tokens) blurred small shapes past recognition.
    "small": dict(
        block_out_channels=[32, 64],
        layers_per_block=1,
        latent_channels=16,
        num_vq_embeddings=256,
        norm_num_groups=8,
    ),
}
CLIP_TEXT_CONFIGS = {
    # CLIP ViT-L/14 text tower.
    "amused": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32),
}
UVIT_CONFIGS = {
    "tiny": dict(
        hidden_size=32, cond_embed_dim=32, micro_cond_encode_dim=8, micro_cond_embed_dim=40,
        encoder_hidden_size=32, vocab_size=65, codebook_size=64, in_channels=16, block_out_channels=32,
        num_res_blocks=1, block_num_heads=2, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, sample_size=8,
    ),
    # For the `small` VQ-GAN's 16x16 tokens; the transformer runs on 8x8 after a 2x
    # down-sampling, as aMUSEd-512 does. The U-ViT has no position embedding: a token
    # knows where it is only from the zero padding of the 3x3 convolutions, so it takes
    # aMUSEd's 3 conv blocks (a 7x7 view: every place of the 8x8 grid sees a border) to
    # draw a shape where the caption's outline is; with 1 block it drew colour blobs
    # whatever the shape word. 64 conv channels (32 before) draw the outlines cleanly:
    # masked-token loss 1.49 vs 1.67 after the demo's 1600 steps, for 27% more time per
    # model step; a wider transformer (hidden 128) learned slower in those steps.
    "small": dict(
        hidden_size=96, cond_embed_dim=32, micro_cond_encode_dim=8, micro_cond_embed_dim=40,
        encoder_hidden_size=32, vocab_size=257, codebook_size=256, in_channels=32, block_out_channels=64,
        num_res_blocks=3, block_num_heads=2, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=384, sample_size=16, downsample=True, upsample=True,
    ),
}


def build_vqgan(preset: str = "tiny") -> VQModel:
    cfg = VQGAN_CONFIGS[preset]
    n = len(cfg["block_out_channels"])
    return VQModel(
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        force_upcast=True,
        **cfg,
    )


def build_clip_text(preset: str = "tiny", vocab_size: int = 49408) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **CLIP_TEXT_CONFIGS[preset],
    )
    return CLIPTextModelWithProjection(config)


def clip_bpe_tokenizer(out: Path) -> CLIPTokenizer:
    """OpenAI's CLIP BPE tokenizer, rebuilt from the merges file open_clip ships."""
    # Located, not imported: open_clip's own imports need torchvision, which is not installed.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "open_clip_torch is needed for its CLIP BPE vocabulary: "
            "pip install --no-deps -r requirements/img2dataset.txt"
        )
    bpe_path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        merges=[tuple(m.split()) for m in merges],
        model_max_length=77,
    )
    tokenizer.save_pretrained(out)
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-to-printable-character table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_clip(out: str | Path, seed: int = 0) -> Path:
    """A small random two-tower CLIP (CLIPModel + tokenizer in one folder), the layout the
    CLIP score reads (a released CLIP folder such as ViT-L/14 has the same)."""
    from transformers import CLIPConfig, CLIPModel

    out = Path(out)
    torch.manual_seed(seed)
    text = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                eos_token_id=49407, pad_token_id=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, hidden_act="quick_gelu")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(out)
    clip_bpe_tokenizer(out)
    return out


def write_tiny_text_encoder(out: Path) -> None:
    """`tokenizer/` (the real CLIP BPE) and a small random `text_encoder/` under `out`."""
    clip_bpe_tokenizer(out / "tokenizer")
    build_clip_text("tiny").save_pretrained(out / "text_encoder")


def write_tiny_models(out: str | Path, seed: int = 0) -> Path:
    """Write `vqgan/`, `text_encoder/`, `tokenizer/` and `transformer/` under `out`."""
    out = Path(out)
    torch.manual_seed(seed)
    build_vqgan("tiny").save_pretrained(out / "vqgan")
    write_tiny_text_encoder(out)
    UVit2DModel(**UVIT_CONFIGS["tiny"]).save_pretrained(out / "transformer")
    return out
