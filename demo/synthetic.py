"""Captioned images of simple coloured shapes, written as img2dataset-style webdataset tars.

Used by the demo, the tests and the benchmarks, so they exercise the same reader as
real downloads. Every image is a function of (seed, shard, index).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from amused.pipeline.wds import tar_bytes
from amused.plumbing.fsio import atomic_writer
from amused.plumbing.storage import join, url_to_fs

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
    from scipy import ndimage

    px = np.asarray(img.convert("RGB"), np.float32)
    palette = np.array(list(COLOURS.values()), np.float32)
    names = list(COLOURS)

    def nearest(colour: np.ndarray) -> str:
        return names[int(np.argmin(((palette - colour) ** 2).sum(1)))]

    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg = np.median(border, axis=0)
    distance = np.sqrt(((px - bg) ** 2).sum(-1))

    def largest_region(threshold: float) -> np.ndarray:
        regions, count = ndimage.label(distance > threshold)
        if count == 0:
            return np.zeros_like(distance, dtype=bool)
        return regions == 1 + int(np.argmax(np.bincount(regions.ravel())[1:]))

    mask = largest_region(35)  # half the closest palette pair (yellow, orange)
    if mask.mean() < 0.02:
        return "none", "none", nearest(bg)
    # A blurred edge is where the colour is half-way between shape and background; a
    # fixed threshold would take a wider, rounder outline on high-contrast pairs.
    mask = largest_region(max(35.0, 0.5 * float(np.percentile(distance[mask], 90))))
    shape = max(SHAPES, key=lambda name: _overlap(mask, name))
    inside = ndimage.binary_erosion(mask)
    return nearest(np.median(px[inside if inside.any() else mask], axis=0)), shape, nearest(bg)


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


def sample_members(key: str, image: bytes | None, caption: str | bytes | None, meta: dict | None,
                   ext: str = "jpg") -> list[tuple[str, bytes]]:
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    if caption is not None:
        members.append((f"{key}.txt", caption.encode() if isinstance(caption, str) else caption))
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


def write_shape_shards(output: str, shards: int = 2, per_shard: int = 16, min_size: int = 64,
                       max_size: int = 160, seed: int = 0, fmt: str = "jpg", texture: float = 0.0,
                       first_shard: int = 0) -> list[str]:
    """Writes `shards` tars named 00000.tar, 00001.tar, ... under `output`; returns their URLs."""
    urls = []
    for shard in range(first_shard, first_shard + shards):
        members = []
        for i in range(per_shard):
            rng = np.random.default_rng([seed, shard, i])
            w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
            img, caption = shape_image(rng, w, h, texture)
            key = f"{shard:05d}{i:04d}"
            meta = {"key": key, "caption": caption, "width": w, "height": h, "status": "success",
                    "aesthetic_score": round(float(rng.uniform(4, 7)), 3)}
            members += sample_members(key, encode_image(img, fmt), caption, meta, fmt)
        url = join(output, f"{shard:05d}.tar")
        with atomic_writer(url) as fh:
            fh.write(tar_bytes(members))
        urls.append(url)
    return urls



def write_shape_site(www: str, metadata: str, images: int, base_url: str, min_size: int = 48, max_size: int = 96,
                     seed: int = 0, per_part: int = 500) -> dict:
    """Shape images as files under `www` (local) and LAION-schema metadata Parquet under
    `metadata` whose URLs point at `base_url`. Written in parts of `per_part` images; a
    part counts once its Parquet file exists (written last, atomically), so a rerun
    writes only the missing parts and the same bytes."""
    from pathlib import Path

    fs, root = url_to_fs(metadata)
    fs.makedirs(root, exist_ok=True)
    parts = (images + per_part - 1) // per_part
    written = 0
    for part in range(parts):
        url = join(metadata, f"part-{part:05d}.parquet")
        if fs.exists(url_to_fs(url)[1]):
            continue
        folder = Path(www) / f"{part:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows: dict[str, list] = {k: [] for k in ("SAMPLE_ID", "URL", "TEXT", "WIDTH", "HEIGHT", "similarity",
                                                 "punsafe", "pwatermark", "AESTHETIC_SCORE")}
        for i in range(part * per_part, min(images, (part + 1) * per_part)):
            rng = np.random.default_rng([seed, i])
            w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
            img, caption = shape_image(rng, w, h)
            (folder / f"{i}.jpg").write_bytes(encode_image(img))
            for key, value in (("SAMPLE_ID", i), ("URL", f"{base_url}/{part:05d}/{i}.jpg"), ("TEXT", caption),
                               ("WIDTH", float(w)), ("HEIGHT", float(h)), ("similarity", 0.35), ("punsafe", 0.01),
                               ("pwatermark", 0.05), ("AESTHETIC_SCORE", round(float(rng.uniform(5, 7)), 3))):
                rows[key].append(value)
        with atomic_writer(url) as fh:
            pq.write_table(pa.table(rows), fh, compression="zstd")
        written += 1
    return {"images": images, "parts": parts, "parts_written": written}


class ImageServer:
    """Serves a local folder on 127.0.0.1:`port` from a thread (the demo's internet)."""

    def __init__(self, folder: str, port: int):
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Quiet, directory=folder))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


_WORDS = ("a photo of a red blue green small large old new cat dog house tree car city beach mountain river "
          "painting portrait sunset night street food flower bird boat road sky garden winter summer").split()


def laion_metadata(rows: int, seed: int = 0, start: int = 0, duplicate_rate: float = 0.02) -> pa.Table:
    """LAION-2B-en-schema metadata with realistic column types, built without a per-row loop.

    About `duplicate_rate` of the URLs repeat earlier ones; a few rows have bad sizes,
    non-http schemes or empty captions, so every rule has something to do.
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + rows)
    dup = rng.random(rows) < duplicate_rate
    ids[dup] = rng.integers(0, start + rows, dup.sum())
    hosts = pa.array(np.char.add("https://img", (ids % 997).astype(str)))
    url = pc.binary_join_element_wise(hosts, ".example.com/photos/", pa.array(ids.astype(str)), ".jpg", "")
    scheme_bad = rng.random(rows) < 0.005
    url = pc.if_else(pa.array(scheme_bad), pc.replace_substring(url, "https://", "ftp://"), url)
    pool = [" ".join(rng.choice(_WORDS, rng.integers(3, 14))) for _ in range(4096)]
    pool[0] = ""
    text = pa.array(pool).take(pa.array(rng.integers(0, len(pool), rows)))
    width = rng.integers(64, 2048, rows).astype(np.float64)
    width[rng.random(rows) < 0.002] = np.nan
    return pa.table({
        "SAMPLE_ID": pa.array(ids, pa.int64()), "URL": url, "TEXT": text,
        "HEIGHT": pa.array(rng.integers(64, 2048, rows).astype(np.float64)), "WIDTH": pa.array(width),
        "LICENSE": pa.array(np.full(rows, "?", dtype=object)), "NSFW": pa.array(np.full(rows, "UNLIKELY", dtype=object)),
        "similarity": pa.array(rng.uniform(0.2, 0.45, rows)), "punsafe": pa.array(rng.beta(1, 20, rows)),
        "pwatermark": pa.array(rng.beta(1, 6, rows)), "AESTHETIC_SCORE": pa.array(rng.normal(5.0, 0.8, rows)),
    })


def write_laion_metadata(out: str, files: int, rows_per_file: int, seed: int = 0) -> list[str]:
    """`files` Parquet files named part-NNNNN.parquet of `laion_metadata` rows."""
    fs, root = url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    urls = []
    for i in range(files):
        url = join(out, f"part-{i:05d}.parquet")
        with fs.open(url_to_fs(url)[1], "wb") as fh:
            pq.write_table(laion_metadata(rows_per_file, seed + i, start=i * rows_per_file), fh,
                           compression="snappy")
        urls.append(url)
    return urls


def write_token_dataset(output: str, shard_rows: list[int], token_grid: tuple[int, int] = (8, 8),
                        codebook_size: int = 64, text_seq_len: int = 8, text_dim: int = 32, classes: int = 8,
                        seed: int = 0, nan_rows: tuple[int, ...] = ()):
    """A token dataset whose image tokens follow from the caption, for training tests.

    Sample i belongs to class i % classes; its text states are the class's fixed random
    embedding and its tokens the class's fixed random grid, so a model that reads the
    caption can predict every masked token, while chance is 1 / codebook_size.
    crop_left holds the global row number, so a test can tell which rows a batch holds;
    `nan_rows` (global row numbers) get NaN text states, to exercise the non-finite policy.
    """
    from amused.pipeline import shards as fmt

    rng = np.random.default_rng(seed)
    grids = rng.integers(0, codebook_size, (classes, *token_grid))
    hidden = rng.standard_normal((classes, text_seq_len, text_dim)).astype(np.float16)
    pooled = rng.standard_normal((classes, text_dim)).astype(np.float16)
    ident = fmt.ModelIdentity(path="synthetic", sha256="0" * 64)
    spec = fmt.DatasetSpec(resolution=token_grid[0] * 8, token_grid=tuple(token_grid), codebook_size=codebook_size,
                           text_seq_len=text_seq_len, text_hidden_size=text_dim, text_pooled_dim=text_dim,
                           image_tokenizer=ident, text_encoder=ident)
    records, start = [], 0
    for shard, n in enumerate(shard_rows):
        rows = np.arange(start, start + n)
        cls = rows % classes
        states = hidden[cls].copy()
        states[np.isin(rows, nan_rows)] = np.nan
        columns = {
            "key": [f"{shard:05d}/{r}/0/c{r}" for r in rows], "content_id": [f"c{r}" for r in rows],
            "caption": [f"class {c}" for c in cls], "view": [0] * n, "image_tokens": grids[cls],
            "text_hidden_states": states, "text_pooled": pooled[cls],
            "orig_width": [256] * n, "orig_height": [256] * n, "crop_top": [0] * n, "crop_left": rows.tolist(),
            "aesthetic_score": [None if r % 3 == 0 else 5.0 + (r % 4) / 2 for r in rows],
        }
        record = fmt.write_shard(output, f"{shard:05d}.tar", fmt.build_table(spec, columns))
        fmt.write_marker(output, record, [], spec)
        records.append(record)
        start += n
    fmt.write_empty_prompt(output, np.zeros((text_seq_len, text_dim)), np.zeros(text_dim))
    manifest = fmt.Manifest(spec, records)
    fmt.write_manifest(output, manifest)
    return manifest
