"""Shape images and token datasets on disk, for the tests and the benchmarks.

Shape images are written as img2dataset-style webdataset tars, so they go through the
same reader as real downloads; each image is a function of (seed, shard, index). Token
datasets are written in the pre-tokenizer's format, with tokens that follow from the
caption, so a training test can tell a model that learns from one that does not.
"""

from __future__ import annotations

import json

import numpy as np

from amused.demo.shapes import encode_image, shape_image
from amused.pipeline.shards import (
    DatasetSpec,
    Manifest,
    ModelIdentity,
    build_table,
    write_empty_prompt,
    write_manifest,
    write_marker,
    write_shard,
)
from amused.pipeline.wds import tar_bytes
from amused.plumbing.fsio import atomic_writer
from amused.plumbing.storage import join
from amused.tokenizer.presets import CLIP_TEXT_COMMON


def sample_members(key: str, image: bytes | None, caption: str | bytes | None, meta: dict | None,
                   ext: str = "jpg") -> list[tuple[str, bytes]]:
    """One sample's tar members as img2dataset names them (`key.jpg`, `key.txt`,
    `key.json`); a part given as None is left out, to build broken samples."""
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


def write_token_dataset(output: str, shard_rows: list[int], token_grid: tuple[int, int] = (8, 8),
                        codebook_size: int = 64, text_seq_len: int = 8, text_dim: int = 32, classes: int = 8,
                        seed: int = 0, nan_rows: tuple[int, ...] = (), text_encoder: str | None = None) -> Manifest:
    """A token dataset whose image tokens follow from the caption, for training tests.

    Sample i belongs to class i % classes; its text states are the class's fixed random
    embedding and its tokens the class's fixed random grid, so a model that reads the
    caption can predict every masked token, while chance is 1 / codebook_size.
    crop_left holds the global row number, so a test can tell which rows a batch holds;
    `nan_rows` (global row numbers) get NaN text states, to exercise the non-finite policy.
    With `text_encoder` (a CLIP folder, recorded as the dataset's), a text "ids" dataset
    instead: a class's text is a fixed random draw of `text_seq_len` ids from CLIP's vocabulary.
    """
    rng = np.random.default_rng(seed)
    grids = rng.integers(0, codebook_size, (classes, *token_grid))
    hidden = rng.standard_normal((classes, text_seq_len, text_dim)).astype(np.float16)
    pooled = rng.standard_normal((classes, text_dim)).astype(np.float16)
    ids = rng.integers(0, CLIP_TEXT_COMMON["vocab_size"], (classes, text_seq_len))
    ident = ModelIdentity(path="synthetic", sha256="0" * 64)
    spec = DatasetSpec(resolution=token_grid[0] * 8, token_grid=tuple(token_grid), codebook_size=codebook_size,
                       text_seq_len=text_seq_len, text_hidden_size=text_dim, text_pooled_dim=text_dim,
                       image_tokenizer=ident, text_encoder=ModelIdentity.of(text_encoder) if text_encoder else ident,
                       text="ids" if text_encoder else "states")
    records, start = [], 0
    for shard, n in enumerate(shard_rows):
        rows = np.arange(start, start + n)
        cls = rows % classes
        states = hidden[cls].copy()
        states[np.isin(rows, nan_rows)] = np.nan
        columns = {
            "key": [f"{shard:05d}/{r}/0/c{r}" for r in rows], "content_id": [f"c{r}" for r in rows],
            "caption": [f"class {c}" for c in cls], "view": [0] * n, "image_tokens": grids[cls],
            **({"text_ids": ids[cls]} if spec.text == "ids" else {"text_hidden_states": states,
                                                                   "text_pooled": pooled[cls]}),
            "orig_width": [256] * n, "orig_height": [256] * n, "crop_top": [0] * n, "crop_left": rows.tolist(),
            "aesthetic_score": [None if r % 3 == 0 else 5.0 + (r % 4) / 2 for r in rows],
        }
        record = write_shard(output, f"{shard:05d}.tar", build_table(spec, columns))
        write_marker(output, record, [], spec)
        records.append(record)
        start += n
    if spec.text == "states":
        write_empty_prompt(output, np.zeros((text_seq_len, text_dim)), np.zeros(text_dim))
    manifest = Manifest(spec, records)
    write_manifest(output, manifest)
    return manifest
