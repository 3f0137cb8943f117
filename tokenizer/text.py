"""CLIP text encoder producing aMUSEd's two text conditions.

Cross-attention context: the penultimate layer's hidden states (`hidden_states[-2]`,
before the final layer norm), padded to the tokenizer's max length (77). Global
condition: the projected pooled embedding (`text_embeds`). This is exactly what
diffusers' AmusedPipeline computes for a prompt.

The token ids are a step of their own (`token_ids`, `encode_ids`): a text "ids" token
dataset stores them, made with the tokenizer alone, and the training step runs the
tower on them.
"""

from __future__ import annotations

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
