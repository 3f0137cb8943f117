"""The token dataset of one style image (StyleDrop): the image tokenized once, each caption
of a template filled from a list of subjects embedded once, one row per caption.

It is an ordinary token dataset (pipeline/shards.py: spec with the models' identities and
the token grid, shard, marker, manifest, the empty prompt), so training's start-up checks
hold as for any other. The rows share the image's tokens and differ in their caption's
text embeddings; nothing is encoded again while training (the public recipe's loop, in
single-image mode, overwrote its own pre-computed embeddings with one caption's).

Feedback rows (StyleDrop's iterative training): token grids of the model's own samples that a
feedback signal accepted, each with the caption it was sampled from, appended after the
image's rows; their digest is part of the shard's source.

The shard counts only once its marker exists. A rerun into the same folder with the same
image (by content), captions and models is a no-op; with anything else it refuses.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq

from amused.pipeline import shards as fmt
from amused.pipeline.images import BadSample, decode_views
from amused.plumbing.fsio import read_bytes
from amused.plumbing.storage import VQGAN_SUBFOLDERS, join, url_to_fs
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.text import TextEncoder

SHARD_SOURCE = "00000"  # the one shard, named as pretokenize names shard 0
MIN_SIDE = 32  # the smallest image pretokenize accepts by default


def fill_template(template: str, subjects: list[str]) -> list[str]:
    """The captions: `template` ("A {} in [V] style") with each subject in place of "{}"."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt template {template!r} must contain '{{}}' exactly once (the subject's place)")
    if not subjects or any(not s.strip() for s in subjects):
        raise ValueError("subjects must be a non-empty list of non-empty strings")
    captions = [template.replace("{}", s.strip()) for s in subjects]
    if len(set(captions)) != len(captions):
        raise ValueError(f"subjects repeat: {sorted(c for c in captions if captions.count(c) > 1)}")
    return captions


def build_style_dataset(image: str, captions: list[str], vqgan: str, text_encoder: str, output: str,
                        resolution: int, device: str = "cpu",
                        feedback: tuple[np.ndarray, list[str]] | None = None) -> fmt.Manifest:
    """Writes (or finds complete) the dataset of `image` (any fsspec URL) under `output`:
    centre-cropped to `resolution`, tokenized by `vqgan`, one row per caption with the
    caption's `text_encoder` outputs (float16, as pretokenize stores them); then one row per
    `feedback` sample (its token grid, its caption)."""
    data = read_bytes(image)
    digest = hashlib.sha256(data).hexdigest()
    feedback_tokens, feedback_captions = feedback if feedback is not None else (None, [])
    tokenizer = ImageTokenizer.from_pretrained(vqgan, device=device)
    text = TextEncoder.from_pretrained(text_encoder, device=device)
    spec = fmt.DatasetSpec(
        resolution=resolution, token_grid=tokenizer.grid(resolution), codebook_size=tokenizer.codebook_size,
        text_seq_len=text.seq_len, text_hidden_size=text.hidden_size, text_pooled_dim=text.pooled_dim,
        image_tokenizer=fmt.ModelIdentity.of(vqgan, VQGAN_SUBFOLDERS),
        text_encoder=fmt.ModelIdentity.of(text_encoder), crop="center", views=1, min_side=MIN_SIDE,
        encoder_device=tokenizer.device.type, encoder_dtype="fp32")
    source = f"{image}#sha256={digest}"
    if feedback_tokens is not None:
        feedback_tokens = np.asarray(feedback_tokens)
        if feedback_tokens.shape[1:] != tuple(spec.token_grid) or len(feedback_tokens) != len(feedback_captions):
            raise ValueError(f"feedback rows: expected one {spec.token_grid} token grid per caption, got "
                             f"{feedback_tokens.shape} for {len(feedback_captions)} captions")
        feedback_tokens = feedback_tokens.astype("<u2")
        source += f"+feedback#sha256={hashlib.sha256(feedback_tokens.tobytes()).hexdigest()}"
    done = fmt.completed_shards(output, spec).get(fmt.shard_name(SHARD_SOURCE))
    if done is None:
        done = _write(data, digest, source, captions, tokenizer, text, spec, output, feedback_tokens,
                      feedback_captions)
    elif done.source != source or _captions(output, done) != captions + feedback_captions:
        raise ValueError(f"{output} holds the style dataset of another image or captions ({done.source}); "
                         "use another output folder")
    manifest = fmt.Manifest(spec, [done])
    fmt.write_manifest(output, manifest)  # again on a rerun: a crash may have come between marker and manifest
    return manifest


def _write(data: bytes, digest: str, source: str, captions: list[str], tokenizer: ImageTokenizer,
           text: TextEncoder, spec: fmt.DatasetSpec, output: str, feedback_tokens: np.ndarray | None,
           feedback_captions: list[str]) -> fmt.ShardRecord:
    try:
        orig, offsets, pixels = decode_views(data, spec.resolution, "center", 1, 0, "style", MIN_SIDE,
                                             spec.max_pixels)
    except BadSample as exc:
        raise ValueError(f"style image {source}: {exc.reason}: {exc.detail}") from None
    tokens, finite = tokenizer.encode_with_mask(pixels)
    n_image, captions = len(captions), captions + feedback_captions
    tokens = np.repeat(tokens, n_image, axis=0)
    if feedback_tokens is not None:
        tokens = np.concatenate([tokens.astype(feedback_tokens.dtype), feedback_tokens])
    emb = text.encode(captions)
    hidden = emb.hidden_states.float().cpu().numpy().astype("<f2")
    pooled = emb.pooled.float().cpu().numpy().astype("<f2")
    if not finite.all() or not (np.isfinite(hidden).all() and np.isfinite(pooled).all()):
        raise ValueError(f"style image {source}: the VQ-GAN or the text encoder gave non-finite values")
    if fmt.read_empty_prompt(output) is None:
        empty = text.encode([""])
        fmt.write_empty_prompt(output, empty.hidden_states[0].float().cpu().numpy(),
                               empty.pooled[0].float().cpu().numpy())
    n, content_id = len(captions), digest[:32]
    (top, left), = offsets
    # A feedback row is its own content: its key and content id say which row and of what.
    ids = [content_id] * n_image + [f"{content_id}-feedback{i}" for i in range(n - n_image)]
    columns = {"key": [f"style/{i}/{cid}" for i, cid in enumerate(ids)], "content_id": ids,
               "caption": list(captions), "view": [0] * n, "orig_width": [orig[0]] * n,
               "orig_height": [orig[1]] * n, "crop_top": [top] * n, "crop_left": [left] * n,
               "aesthetic_score": [None] * n, "image_tokens": tokens,
               "text_hidden_states": hidden, "text_pooled": pooled}
    record = fmt.write_shard(output, SHARD_SOURCE, fmt.build_table(spec, columns))
    record.source = source
    fmt.write_marker(output, record, [], spec)
    return record


def _captions(output: str, record: fmt.ShardRecord) -> list[str]:
    fs, path = url_to_fs(join(output, record.name))
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh, columns=["caption"]).column("caption").to_pylist()
