"""Bytes per sample of a token dataset at aMUSEd-256 shapes, by column, in both text modes
("states": the text encoder's outputs; "ids": the captions' CLIP token ids), from the
Parquet column-chunk sizes of a shard written by our writer (`pipeline.shards.build_table`
+ `write_shard`: zstd, 512-row groups, dictionaries for caption and content_id), and what
LAION-2B (2.3 B samples) would take in each.

Shapes: 16 x 16 image tokens (uint16, codebook 8192), 77 x 768 float16 text states,
768 float16 pooled text embedding, caption, key, content_id, view, original size, crop
offsets, aesthetic score. Contents:

- tokens: uniform over the codebook (13 bits in 16; real VQ codes use the codebook
  unevenly, so they compress somewhat better; the column is under 1% of a row anyway);
- text states and pooled: standard-normal float16, as from random-weight models. zstd
  finds redundancy only in sign and exponent bits: the 10 mantissa bits of every value are
  incompressible, which holds for real CLIP states too, so no float16 embedding can shrink
  below ~ 11/16 of its raw size, and random ones show what zstd gets in practice;
- captions: unique, 3-14 words from a 70-word list (mean ~ 50 bytes), i.e. shorter than many LAION captions;
  a caption of a few hundred bytes still is < 0.5% of a row;
- text ids: the captions through OpenAI's CLIP BPE tokenizer (the real one), padded to 77,
  exactly what `amused pretokenize --text ids` stores; longer captions have fewer padding ids,
  which zstd squeezes, so real LAION captions store somewhat more than these.

    python benchmarks/bytes_per_sample.py [--rows 2048]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from amused.demo.tiny_models import clip_bpe_tokenizer
from amused.pipeline.shards import TEXT_MODES, DatasetSpec, ModelIdentity, build_table, write_shard
from amused.plumbing.storage import join
from amused.tokenizer.text import token_ids

WORDS = ("a photo of the in on with and at by for red blue green black white small large old new vintage "
         "cat dog house tree car city beach mountain river painting portrait sunset night street food flower "
         "bird boat road sky garden winter summer woman man child logo shirt dress table chair kitchen wall "
         "art print poster canvas wooden modern design home style free stock image vector").split()

SPEC = DatasetSpec(resolution=256, token_grid=(16, 16), codebook_size=8192, text_seq_len=77, text_hidden_size=768,
                   text_pooled_dim=768, image_tokenizer=ModelIdentity("vqgan", "0" * 64),
                   text_encoder=ModelIdentity("text_encoder", "0" * 64), crop="random", encoder_device="cuda",
                   encoder_dtype="bf16")


LAION_2B = 2.3e9


def columns(rows: int, tokenizer, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**64, (rows, 2), dtype=np.uint64, endpoint=False)
    content_ids = [f"{a:016x}{b:016x}" for a, b in words]  # 128-bit sample keys, as `pipeline.urls` makes
    captions = [" ".join(rng.choice(WORDS, int(rng.integers(3, 15)))) + f" {i}" for i in range(rows)]
    side = rng.integers(256, 2048, (rows, 2))
    return {
        "key": [f"00042{i:04d}/0/{c}" for i, c in enumerate(content_ids)],
        "content_id": content_ids,
        "caption": captions,
        "view": [0] * rows,
        "image_tokens": rng.integers(0, SPEC.codebook_size, (rows, *SPEC.token_grid)),
        "text_hidden_states": rng.standard_normal((rows, SPEC.text_seq_len, SPEC.text_hidden_size), np.float32),
        "text_pooled": rng.standard_normal((rows, SPEC.text_pooled_dim), np.float32),
        "text_ids": token_ids(tokenizer, captions).numpy(),
        "orig_width": side[:, 0].tolist(), "orig_height": side[:, 1].tolist(),
        "crop_top": rng.integers(0, 200, rows).tolist(), "crop_left": rng.integers(0, 200, rows).tolist(),
        "aesthetic_score": rng.uniform(4.5, 8, rows).astype(np.float32).tolist(),
    }


def column_sizes(path: str) -> tuple[dict[str, list[int]], int]:
    """(column -> [stored, uncompressed] bytes over all row groups, row groups)."""
    meta = pq.ParquetFile(path).metadata
    sizes: dict[str, list[int]] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(g).column(c)
            stored, raw = sizes.setdefault(chunk.path_in_schema, [0, 0])
            sizes[chunk.path_in_schema] = [stored + chunk.total_compressed_size, raw + chunk.total_uncompressed_size]
    return sizes, meta.num_row_groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    args = p.parse_args()
    n, per_sample = args.rows, {}
    with tempfile.TemporaryDirectory() as out:
        data = columns(n, clip_bpe_tokenizer(Path(out) / "tokenizer"))
        for mode in TEXT_MODES:
            record = write_shard(join(out, mode), "00042.tar", build_table(dataclasses.replace(SPEC, text=mode), data))
            sizes, groups = column_sizes(join(out, mode, record.name))
            per_sample[mode] = record.bytes / n
            print(f"\ntext {mode}: {n} rows, {groups} row groups, file {record.bytes:,} bytes = "
                  f"{record.bytes / n:,.0f} bytes/sample\n")
            print("| column | bytes/sample stored | uncompressed | stored/uncompressed | share of file |")
            print("| --- | ---: | ---: | ---: | ---: |")
            for name, (stored, raw) in sorted(sizes.items(), key=lambda kv: -kv[1][0]):
                print(f"| {name} | {stored / n:,.1f} | {raw / n:,.1f} | {stored / raw:.3f} | "
                      f"{stored / record.bytes:.2%} |")
            rest = record.bytes - sum(s for s, _ in sizes.values())
            print(f"| (footer, headers) | {rest / n:,.1f} | | | {rest / record.bytes:.2%} |")
    print("\n| text mode | bytes/sample | LAION-2B (2.3 B samples) |")
    print("| --- | ---: | ---: |")
    for mode, size in per_sample.items():
        print(f"| {mode} | {size:,.0f} | {size * LAION_2B / 1e12:,.2f} TB |")
    print(f"\nstates / ids = {per_sample['states'] / per_sample['ids']:.0f}x")


if __name__ == "__main__":
    main()
