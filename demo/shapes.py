"""Captioned images of simple coloured shapes, and the classifier that reads them back.

Every image is a function of the generator it is drawn from; captions name the shape's
colour, the shape and the background colour ("a red circle on a blue background"). The
classifier reads those three from the pixels: it is the demo's prompt-following metric.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")


def shape_image(rng: np.random.Generator, width: int, height: int, texture: float = 0.0,
                size: tuple[float, float] = (0.6, 0.7), spread: float = 0.2) -> tuple[Image.Image, str]:
    """A shape on a plain background, its side a random fraction in `size` of the shorter
    image side, inside the centred square: `spread` 0 centres it, 1 places it anywhere in
    that square. `texture` > 0 adds Gaussian noise of that std-dev, which makes JPEG sizes
    and decode costs like photographs' (plain shapes compress far better).

    The defaults keep shapes near the centre at a similar size: a small U-ViT trained for
    CPU minutes then learns which outline a caption names (with shapes anywhere at any
    size, it learned colours but drew blobs)."""
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    img = Image.new("RGB", (width, height), COLOURS[names[bg]])
    draw = ImageDraw.Draw(img)
    # Inside the centred square, so the caption stays true after a centre crop.
    square = min(width, height)
    side = int(square * rng.uniform(*size))
    room = (square - side) / 2
    x0, y0 = ((extent - square) // 2 + int(round(room + spread * room * rng.uniform(-1, 1)))
              for extent in (width, height))
    box = (x0, y0, x0 + side, y0 + side)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[names[fg]])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[names[fg]])
    else:
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=COLOURS[names[fg]])
    if texture:
        noisy = np.asarray(img, np.float32) + rng.normal(0, texture, (height, width, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return img, f"a {names[fg]} {shape} on a {names[bg]} background"


def classify_shape_image(img: Image.Image) -> tuple[str, str, str]:
    """(shape colour, shape, background colour) of an image like `shape_image`'s, read
    from the pixels: the background is the border's median colour, the shape the largest
    connected region far from it (stray pixels of a decoder do not count); colours are the
    nearest palette entries (the shape's from its interior, away from blended edges) and
    the shape is the one whose ideal outline, drawn into the region's bounding box,
    overlaps it most. "none" when that region covers less than 2% of the image."""
    px = np.asarray(img.convert("RGB"), np.float32)
    palette = np.array(list(COLOURS.values()), np.float32)
    names = list(COLOURS)

    def nearest(colour: np.ndarray) -> str:
        return names[int(np.argmin(((palette - colour) ** 2).sum(1)))]

    mask, bg = shape_region(px)
    if mask is None:
        return "none", "none", nearest(bg)
    shape = max(SHAPES, key=lambda name: _overlap(mask, name))
    inside = ndimage.binary_erosion(mask)
    return nearest(np.median(px[inside if inside.any() else mask], axis=0)), shape, nearest(bg)


def shape_region(px: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(the shape's pixels, the background colour) of an RGB float image: the background is
    the border's median colour, the shape the largest connected region far from it (stray
    pixels of a decoder do not count); None for the region when it covers under 2%."""
    bg = np.median(np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]]), axis=0)
    distance = np.sqrt(((px - bg) ** 2).sum(-1))

    def largest_region(threshold: float) -> np.ndarray:
        regions, count = ndimage.label(distance > threshold)
        if count == 0:
            return np.zeros_like(distance, dtype=bool)
        return regions == 1 + int(np.argmax(np.bincount(regions.ravel())[1:]))

    mask = largest_region(35)  # half the closest palette pair (yellow, orange)
    if mask.mean() < 0.02:
        return None, bg
    # A blurred edge is where the colour is half-way between shape and background; a
    # fixed threshold would take a wider, rounder outline on high-contrast pairs.
    return largest_region(max(35.0, 0.5 * float(np.percentile(distance[mask], 90)))), bg


def _overlap(mask: np.ndarray, shape: str) -> float:
    """Intersection over union of `mask` with `shape` drawn into the mask's bounding box
    (pixel centres; the triangle points up, as `shape_image` draws it)."""
    ys, xs = np.nonzero(mask)
    top, left, h, w = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    v, u = np.mgrid[0:h, 0:w]
    v, u = (v + 0.5) / h, (u + 0.5) / w  # 0..1 inside the box
    if shape == "square":
        ideal = np.ones((h, w), bool)
    elif shape == "circle":
        ideal = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    else:
        ideal = np.abs(u - 0.5) <= v / 2
    box = mask[top:top + h, left:left + w]
    return (box & ideal).sum() / (box | ideal).sum()


def caption_parts(caption: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a caption "a red circle on a grey background"."""
    words = caption.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a shape caption: {caption!r}")
    return words[1], words[2], words[5]


def encode_image(img: Image.Image, fmt: str = "jpg") -> bytes:
    buf = io.BytesIO()
    img.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], **({"quality": 90} if fmt == "jpg" else {}))
    return buf.getvalue()
