"""Pictures a person would rather look at than numbers: captioned image grids."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def image_grid(images: np.ndarray, captions: list[str] | None = None, columns: int = 8, cell: int = 128
               ) -> Image.Image:
    """uint8 (N, H, W, 3) images in a grid of `cell`-pixel tiles, each with its caption below."""
    n = len(images)
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    text_h = 36 if captions else 0
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, arr in enumerate(images):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        grid.paste(Image.fromarray(arr).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], width=max(8, cell // 6))[:3]
            draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines), fill="black", font=font, spacing=0)
    return grid
