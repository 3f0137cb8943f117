"""Decode and crop one image for tokenization.

Every input ends as an sRGB uint8 (R, R, 3) crop: EXIF orientation applied, ICC
profiles (CMYK ones too) converted to sRGB, alpha composited on white, 16-bit and
float modes scaled (not clipped) to 8 bits, the first frame of animations. The pixel
count is checked from the header before anything is decoded (decompression bombs).
Crop coordinates are in the resized image (shorter side = R), as SDXL and aMUSEd's
micro-conditioning use them.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from amused.pipeline.wds import BadSample

_SRGB = ImageCms.createProfile("sRGB")
# The formats read, whatever a member's extension says: the web's image formats, whose
# Pillow decoders parse the file themselves. Others (EPS runs Ghostscript; PSD, WMF,
# MPEG and the rest are rare on the web and less hardened) are "not_an_image".
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF")


def open_image(data: bytes, min_side: int, max_pixels: int, target: int | None = None
               ) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image with orientation and colour fixed, original displayed (w, h)).

    With `target`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    both sides >= target: several times less decoding for large photos. Raises BadSample.
    """
    if not data:
        raise BadSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise BadSample("too_many_pixels", str(exc)) from None
    except UnidentifiedImageError:
        raise BadSample("not_an_image", f"not one of {', '.join(IMAGE_FORMATS)}; starts with {data[:16]!r}") \
            from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadSample("decode_error", str(exc)) from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadSample("too_many_pixels", f"{w}x{h} > {max_pixels} pixels")
    if min(w, h) < min_side:
        raise BadSample("too_small", f"{w}x{h}, shorter side < {min_side}")
    try:
        orig = (h, w) if _exif_orientation(img) in (5, 6, 7, 8) else (w, h)
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if target and img.format == "JPEG":
            img.draft(img.mode, (target, target))
        img.load()
        return to_srgb(_oriented(img)), orig
    except BadSample:
        raise
    except Exception as exc:  # PIL raises many types on corrupt data; none may kill the job
        raise BadSample("decode_error", f"{type(exc).__name__}: {exc}") from None


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:
        return None


def _oriented(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block leaves the pixels usable as stored
        return img


def to_srgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if icc and img.mode in ("RGB", "RGBA", "CMYK", "L"):
        try:
            out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
            img = ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB,
                                            outputMode=out_mode)
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # an unusable profile: fall back to the plain conversion below
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _to_8bit(img: Image.Image) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
    else:  # 16-bit data (I;16 or I holding 16-bit PNG samples)
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
    return img if new == (w, h) else img.resize(new, Image.Resampling.BICUBIC)


def crop_offsets(width: int, height: int, size: int, mode: str, views: int, seed: int, key: str
                 ) -> list[tuple[int, int]]:
    """(top, left) of each view's crop in an image already resized to shorter side `size`."""
    if mode == "center":
        return [((height - size) // 2, (width - size) // 2)]
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, digest])
    return [(int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))) for _ in range(views)]


def decode_views(data: bytes, size: int, mode: str, views: int, seed: int, key: str, min_side: int,
                 max_pixels: int) -> tuple[tuple[int, int], list[tuple[int, int]], np.ndarray]:
    """(orig (w, h), crop offsets, uint8 (views, size, size, 3)) for one image."""
    img, orig = open_image(data, min_side=min_side, max_pixels=max_pixels, target=size)
    resized = resize_shorter_side(img, size)
    offsets = crop_offsets(*resized.size, size, mode, views, seed, key)
    full = np.asarray(resized)
    crops = np.stack([full[t : t + size, l : l + size] for t, l in offsets])
    return orig, offsets, crops
