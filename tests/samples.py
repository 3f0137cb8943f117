"""Awkward real-world image files, built in memory, with what the pre-tokenizer must do with each."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int = 160, h: int = 120, seed: int = 0) -> Image.Image:
    """A smooth gradient with a block: JPEG-friendly, and orientation is visible."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    arr = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, int(rng.integers(0, 255)))], -1).astype(np.uint8)
    arr[: h // 4, : w // 4] = (255, 0, 0)  # red block top-left
    return Image.fromarray(arr)


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h but carries almost no data (a decompression-bomb probe)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    img = photo(160, 120)
    exif = img.getexif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise: portrait
    return save(img, "JPEG", quality=95, exif=exif.tobytes())


def palette_png_with_transparency() -> bytes:
    img = Image.new("P", (96, 96), 0)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 48, 96))  # left half opaque red, right half transparent
    return save(img, "PNG", transparency=0)


def png16() -> bytes:
    ramp = (np.linspace(0, 65535, 96 * 80).reshape(80, 96)).astype(np.uint16)
    return save(Image.fromarray(ramp), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (72, 72), c) for c in ((0, 200, 0), (200, 0, 0))]
    return save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


# name -> (image bytes, caption bytes or None, expected skip reason or None for a good sample)
def awkward_samples() -> dict[str, tuple[bytes | None, bytes | None, str | None]]:
    good_jpeg = save(photo(), "JPEG", quality=90)
    return {
        "good": (good_jpeg, b"a gradient photo", None),
        "truncated": (good_jpeg[: len(good_jpeg) // 2], b"cut in half", "decode_error"),
        "zerobytes": (b"", b"empty file", "empty_image"),
        "html": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", b"an error page", "not_an_image"),
        "onepixel": (save(Image.new("RGB", (1, 1), "white"), "PNG"), b"a dot", "too_small"),
        "png16": (png16(), b"a sixteen bit ramp", None),
        "cmyk": (save(photo().convert("CMYK"), "JPEG", quality=95), b"a cmyk photo", None),
        "palette": (palette_png_with_transparency(), b"half red half clear", None),
        "exifrot": (exif_rotated_jpeg(), b"a rotated photo", None),
        "animated": (animated_gif(), b"a blinking square", None),
        "bomb": (png_header_only(50000, 50000), b"a huge header", "too_many_pixels"),
        "nocaption": (good_jpeg, None, "missing_caption"),
        "badutf8": (good_jpeg, "caf\xe9 cr\xe8me".encode("latin-1"), "caption_not_utf8"),
    }
