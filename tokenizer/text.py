"""CLIP text encoder producing aMUSEd's two text conditions.

Cross-attention context: the penultimate layer's hidden states (`hidden_states[-2]`,
before the final layer norm), padded to the tokenizer's max length (77). Global
condition: the projected pooled embedding (`text_embeds`). This is exactly what
diffusers' AmusedPipeline computes for a prompt.

The token ids are a step of their own (`token_ids`, `encode_ids`): a text "ids" token
dataset stores them, made with the tokenizer alone, and the training step runs the
tower on them.

A tokenizer is saved as the complete folder the released CLIP and aMUSEd repositories
ship (`save_tokenizer`): the slow files (vocab.json, merges.txt), which transformers 4.x's
`CLIPTokenizer` needs and which transformers 5 no longer writes, the fast tokenizer.json,
special_tokens_map.json and tokenizer_config.json, with the merges written as strings,
which every tokenizers release reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from amused.plumbing.runtime import resolve_device, resolve_dtype
from amused.plumbing.storage import join, local_folder, resolve_subfolder
from amused.tokenizer.presets import CLIP_TEXT_COMMON, CLIP_TEXT_CONFIGS, preset


@dataclass
class TextEmbeddings:
    hidden_states: torch.Tensor  # (N, seq_len, hidden)
    pooled: torch.Tensor  # (N, projection_dim)


class TextEncoder:
    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        model: CLIPTextModelWithProjection,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "fp32",
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.tokenizer = tokenizer
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.seq_len = int(tokenizer.model_max_length)
        if self.seq_len > model.config.max_position_embeddings:
            raise ValueError(
                f"tokenizer max length {self.seq_len} exceeds the text model's "
                f"{model.config.max_position_embeddings} positions"
            )
        self.hidden_size = int(model.config.hidden_size)
        self.pooled_dim = int(model.config.projection_dim)

    @classmethod
    def from_pretrained(
        cls, url: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "fp32"
    ) -> "TextEncoder":
        """Load from a diffusers pipeline folder (`text_encoder/` + `tokenizer/`) or one CLIP folder."""
        model_url = resolve_subfolder(str(url), ("text_encoder",))
        model = CLIPTextModelWithProjection.from_pretrained(local_folder(model_url))
        return cls(load_tokenizer(url), model, device=device, dtype=dtype)

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        return token_ids(self.tokenizer, captions)

    def encode(self, captions: list[str]) -> TextEmbeddings:
        return self.encode_ids(self.token_ids(captions))

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> TextEmbeddings:
        """The two conditions of (N, seq_len) token ids, on this encoder's device and dtype."""
        if not len(ids):
            empty = torch.zeros(0, device=self.device, dtype=self.dtype)
            return TextEmbeddings(
                empty.reshape(0, self.seq_len, self.hidden_size), empty.reshape(0, self.pooled_dim)
            )
        out = self.model(ids.to(self.device), return_dict=True, output_hidden_states=True)
        return TextEmbeddings(hidden_states=out.hidden_states[-2], pooled=out.text_embeds)


def load_tokenizer(url: str | Path) -> CLIPTokenizer:
    """The tokenizer of a diffusers pipeline folder (`tokenizer/` beside `text_encoder/`) or of one CLIP folder."""
    url = str(url)
    tokenizer_url = join(url, "tokenizer") if resolve_subfolder(url, ("text_encoder",)) != url else url
    return CLIPTokenizer.from_pretrained(local_folder(tokenizer_url))


# The files of a released CLIP tokenizer folder (openai/clip-vit-large-patch14, amused/amused-256's tokenizer/).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")
# merges.txt's first line: transformers 4.x's CLIPTokenizer skips it as GPT-2's writer put it there.
_MERGES_HEADER = "#version: 0.2"
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> Path:
    """FOLDER holding the tokenizer in every file of TOKENIZER_FILES. The slow files are
    derived from the fast tokenizer's BPE model (its vocabulary and merges, whatever
    files it was loaded from), so both classes give the same ids."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)  # tokenizer.json and tokenizer_config.json
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer {tokenizer.name_or_path}: a {model.get('type')} model, not CLIP's BPE")
    vocab = model["vocab"]
    for added in state.get("added_tokens", []):  # the slow class finds special tokens in the vocabulary only
        if vocab.get(added["content"]) != added["id"]:
            raise ValueError(f"tokenizer {tokenizer.name_or_path}: added token {added['content']!r} (id "
                             f"{added['id']}) is not in its BPE vocabulary: no slow tokenizer can hold it")
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    if any(len(m) != 2 or any(" " in part for part in m) for m in merges):
        raise ValueError(f"tokenizer {tokenizer.name_or_path}: a merge is not two space-free symbols; "
                         "merges.txt cannot hold it")
    # Merges as "a b" strings: tokenizers before 0.20 (transformers 4.36's) cannot read the pairs newer ones write.
    model["merges"] = [" ".join(m) for m in merges]
    (folder / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    (folder / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])),
                                                  ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([_MERGES_HEADER, *model["merges"]]) + "\n", encoding="utf-8")
    special = {name: str(getattr(tokenizer, name)) for name in _SPECIAL if getattr(tokenizer, name) is not None}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    # What the slow class's constructor reads; transformers 5's own keys (backend) are ignored by 4.x.
    config.update(special, tokenizer_class="CLIPTokenizer", model_max_length=int(tokenizer.model_max_length),
                  errors="replace")
    config_file.write_text(json.dumps(config, indent=2))
    return folder


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """(N, model_max_length) int64 ids: each caption truncated or padded to the tower's positions."""
    if not captions:  # the tokenizer refuses an empty batch
        return torch.zeros(0, int(tokenizer.model_max_length), dtype=torch.long)
    return tokenizer(
        list(captions),
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=int(tokenizer.model_max_length),
    ).input_ids


def build_clip_text(name: str = "tiny") -> CLIPTextModelWithProjection:
    """Random weights of a CLIP text tower preset (OpenAI's BPE vocabulary and positions)."""
    config = CLIPTextConfig(**CLIP_TEXT_COMMON, **preset(CLIP_TEXT_CONFIGS, "CLIP text", name))
    return CLIPTextModelWithProjection(config)
