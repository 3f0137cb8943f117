"""Small random models in the released layout, for tests, the demo and the benchmarks.

They are saved and then loaded through the same `from_pretrained(path)` code as real
weights; their architectures are the `tiny` entries of `tokenizer.presets`. The CLIP
tokenizer is the real one: OpenAI's BPE merges ship inside the open_clip_torch package
(installed without its dependencies), so no hub is needed. It is saved as the complete
folder (slow and fast files, tokenizer.text.save_tokenizer) the released repositories have.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from amused.tokenizer.image import build_vqgan
from amused.tokenizer.presets import CLIP_TEXT_COMMON, CLIP_TEXT_CONFIGS, CLIP_VISION_CONFIGS
from amused.tokenizer.text import build_clip_text, save_tokenizer
from amused.training.uvit.model import build_model


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
        model_max_length=CLIP_TEXT_COMMON["max_position_embeddings"],
    )
    save_tokenizer(tokenizer, out)
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
    out = Path(out)
    torch.manual_seed(seed)
    # The two towers meet in CLIPConfig's one projection, not in each tower's config.
    text = {k: v for k, v in CLIP_TEXT_CONFIGS["tiny"].items() if k != "projection_dim"}
    config = CLIPConfig(text_config={**CLIP_TEXT_COMMON, **text}, vision_config=CLIP_VISION_CONFIGS["tiny"],
                        projection_dim=CLIP_TEXT_CONFIGS["tiny"]["projection_dim"])
    CLIPModel(config).save_pretrained(out)
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
    build_model("tiny").save_pretrained(out / "transformer")
    return out
