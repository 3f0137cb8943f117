"""Shared test material, built in memory or in a test's folder: awkward real-world image
files with what the pre-tokenizer must do with each, plain JPEGs, and small token
datasets in the pre-tokenizer's format, and the demo's run config scaled down for tests."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

from amused.pipeline import shards as fmt

ROOT = Path(__file__).resolve().parents[1]


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(n: int, size=(120, 90)) -> bytes:
    """A JPEG of random pixels, a function of `n`."""
    rng = np.random.default_rng(n)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
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


def make_spec(**kw) -> fmt.DatasetSpec:
    """A token dataset spec small enough to write in a test: 4x4 tokens of 16 codes."""
    ident = fmt.ModelIdentity(path="/m", sha256="0" * 64)
    base = dict(resolution=64, token_grid=(4, 4), codebook_size=16, text_seq_len=5, text_hidden_size=3,
                text_pooled_dim=2, image_tokenizer=ident, text_encoder=ident)
    return fmt.DatasetSpec(**{**base, **kw})


def make_columns(n: int, start: int = 0, tokens=None) -> dict:
    """`n` rows of `make_spec`'s columns, random but a function of `start`."""
    rng = np.random.default_rng(start)
    return {
        "key": [f"{start:05d}/{i}/0/c{i}" for i in range(n)],
        "content_id": [f"c{start + i}" for i in range(n)],
        "caption": ["x" * (i + 1) for i in range(n)],
        "view": [0] * n,
        "image_tokens": tokens if tokens is not None else rng.integers(0, 16, (n, 4, 4)),
        "text_hidden_states": rng.standard_normal((n, 5, 3)),
        "text_pooled": rng.standard_normal((n, 2)),
        "orig_width": [100] * n, "orig_height": [80] * n, "crop_top": [0] * n, "crop_left": [i for i in range(n)],
        "aesthetic_score": [None if i % 2 else 5.5 for i in range(n)],
    }


def write_dataset(url: str, sizes=(7, 5)) -> fmt.Manifest:
    """A finished token dataset under `url`: one shard (with its marker) per entry of `sizes`."""
    spec = make_spec()
    records = []
    for i, n in enumerate(sizes):
        record = fmt.write_shard(url, f"/in/{i:05d}.tar", fmt.build_table(spec, make_columns(n, start=i)))
        fmt.write_marker(url, record, [], spec)
        records.append(record)
    manifest = fmt.Manifest(spec, records)
    fmt.write_manifest(url, manifest)
    return manifest


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILLs a launch started with `start_new_session=True` and every process under it.
    Its process group alone is not enough: torchrun starts each rank in a session of its own,
    and a rank left alive trains on and holds the run folder's lock."""
    below = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in below:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(below, timeout=30)
    proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (servers and launchers the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo_config(run_dir, port: int | None = None) -> dict:
    """configs/demo.yaml scaled down to a minute or two of CPU."""
    cfg = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    cfg["run_dir"] = str(run_dir)
    cfg["source"]["synthetic"].update(images=96, port=port or free_port())
    cfg["filter"]["rows_per_shard"] = 48
    cfg["download"].update(samples_per_shard=48, processes=1, threads=4)
    cfg["vqgan"].update(steps=4)
    cfg["vqgan"]["checkpoint"] = {"every": 2, "keep": 1}
    cfg["vqgan"]["log"] = {"every": 2, "progress": False}
    cfg["train"].update(steps=6)
    # The evaluation watcher's actor needs one of the session's 2 CPUs while training runs.
    cfg["ray"]["cpus_per_worker"] = 1
    cfg["train"]["data"].update(global_batch_size=8, micro_batch_size=8, workers=0)
    cfg["train"]["checkpoint"] = {"every": 3, "keep": 2}
    cfg["train"]["log"] = {"every": 3, "progress": False}
    cfg["evaluate"].update(prompts=str(ROOT / "configs/demo-prompts.txt"), max_prompts=4, batch_size=4, grid=4)
    cfg["sample"]["steps"] = 4
    cfg["prompts"] = cfg["prompts"][:2]
    return cfg
