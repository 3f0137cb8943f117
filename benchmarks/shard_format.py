"""Why tensors are stored as fixed-size binary: write and read speed of one text-embedding
column (77 x 768 float16 per row, CLIP-L/14's shape) in Parquet, ours vs Arrow's
`fixed_size_list<float16>`, the obvious alternative. Same rows, zstd, 512-row groups.

    python benchmarks/shard_format.py [--rows 4096]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from amused.pipeline.shards import ROW_GROUP_ROWS, tensor_view

SHAPE = (77, 768)


def as_binary(x: np.ndarray) -> pa.Array:
    width = x[0].nbytes
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(x), [None, pa.py_buffer(x)])


def as_list(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), int(np.prod(SHAPE)))


def from_binary(col) -> np.ndarray:
    return tensor_view(col, np.float16, SHAPE)


def from_list(col) -> np.ndarray:
    return col.combine_chunks().flatten().to_numpy().reshape(len(col), *SHAPE)


def measure(x: np.ndarray, encode, decode, repeats: int) -> tuple[float, float, int]:
    best_w = best_r = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf = io.BytesIO()
        pq.write_table(pa.table({"t": encode(x)}), buf, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        best_w = min(best_w, time.perf_counter() - start)
        start = time.perf_counter()
        back = decode(pq.read_table(io.BytesIO(buf.getvalue()))["t"])
        best_r = min(best_r, time.perf_counter() - start)
        assert np.array_equal(back, x)
    return len(x) / best_w, len(x) / best_r, buf.tell()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    # Random values compress worse than real embeddings; the sizes printed are an upper bound.
    x = np.random.default_rng(0).standard_normal((args.rows, *SHAPE)).astype(np.float16)
    ours = measure(x, as_binary, from_binary, args.repeats)
    base = measure(x, as_list, from_list, args.repeats)
    for name, (w, r, size) in (("fixed_size_binary (ours)", ours), ("fixed_size_list<float16>", base)):
        print(f"{name:26s} write {w:9.0f} rows/s   read {r:9.0f} rows/s   {size / args.rows:8.0f} bytes/row")
    print(f"ours/baseline: write {ours[0] / base[0]:.2f}x   read {ours[1] / base[1]:.2f}x")


if __name__ == "__main__":
    main()
