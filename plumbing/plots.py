"""Pictures a person would rather look at than numbers: captioned image grids and line
plots of metrics against step."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from amused.plumbing.fsio import atomic_writer


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


def line_plots(series: dict[str, list[tuple[float, float]]], x_label: str = "step", width: int = 560,
               panel_height: int = 170) -> Image.Image:
    """One panel per named series of (x, y) points, stacked, with the y range and x range
    written on the axes (no plotting library needed)."""
    font = ImageFont.load_default()
    pad_l, pad_r, pad_t, pad_b = 64, 14, 22, 22
    img = Image.new("RGB", (width, panel_height * max(1, len(series))), "white")
    draw = ImageDraw.Draw(img)
    for i, (name, points) in enumerate(series.items()):
        top = i * panel_height
        x0, y0, x1, y1 = pad_l, top + pad_t, width - pad_r, top + panel_height - pad_b
        draw.rectangle((x0, y0, x1, y1), outline="#888888")
        draw.text((x0, top + 4), name, fill="black", font=font)
        points = [(x, y) for x, y in points if y is not None and np.isfinite(y)]
        if not points:
            draw.text((x0 + 8, y0 + 8), "no finite values", fill="#aa0000", font=font)
            continue
        xs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
        (xl, xh), (yl, yh) = (xs.min(), xs.max()), (ys.min(), ys.max())
        xh, yh = (xh if xh > xl else xl + 1), (yh if yh > yl else yl + abs(yl) * 0.01 + 1e-12)
        px = x0 + (xs - xl) / (xh - xl) * (x1 - x0)
        py = y1 - (ys - yl) / (yh - yl) * (y1 - y0)
        draw.line(list(zip(px.tolist(), py.tolist())), fill="#1f5fbf", width=2)
        draw.text((4, y0), f"{yh:.4g}", fill="black", font=font)
        draw.text((4, y1 - 10), f"{yl:.4g}", fill="black", font=font)
        draw.text((x0, y1 + 4), f"{x_label} {xl:g}", fill="black", font=font)
        draw.text((x1 - 60, y1 + 4), f"{xh:g}", fill="black", font=font)
    return img


def save_png(image: Image.Image, url: str) -> str:
    """`image` as a PNG at `url` (a local path or any fsspec URL), whole or not at all."""
    with atomic_writer(url) as fh:
        image.save(fh, format="PNG")
    return url
