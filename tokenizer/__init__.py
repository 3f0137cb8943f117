"""Image and text tokenization for aMUSEd-style models.

`ImageTokenizer` wraps diffusers' VQ-GAN (`VQModel`), `TextEncoder` wraps transformers'
CLIP text tower; both load from a local or fsspec folder through `from_pretrained`.
"""

from tokenizer.image import ImageTokenizer
from tokenizer.text import TextEmbeddings, TextEncoder

__all__ = ["ImageTokenizer", "TextEmbeddings", "TextEncoder"]
