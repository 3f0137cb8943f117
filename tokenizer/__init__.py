"""Image and text tokenization for aMUSEd-style models.

`ImageTokenizer` wraps diffusers' VQ-GAN (`VQModel`), `TextEncoder` wraps transformers'
CLIP text tower; both load from a local or fsspec folder through `from_pretrained`.
They are imported on first use: data jobs that only need `tokenizer.storage` should not
pay torch's and diffusers' import time in every worker.
"""

from __future__ import annotations

import importlib

_LAZY = {"ImageTokenizer": "tokenizer.image", "TextEmbeddings": "tokenizer.text", "TextEncoder": "tokenizer.text"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokenizer' has no attribute {name!r}")
