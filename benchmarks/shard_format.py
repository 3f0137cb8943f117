"""Which Arrow type the token dataset's tensor columns use, decided by measurement: ours,
`fixed_size_binary` (little-endian bytes; dtype and shape in the Parquet key-value
metadata), against Arrow's canonical `fixed_shape_tensor` extension type (stored in Parquet
as a list of values), with Parquet's default dictionary encoding and without it.

Columns shaped like aMUSEd-256's: image_tokens 16x16 uint16, text_hidden_states 77x768
float16, text_pooled 768 float16 (CLIP-L/14). Same rows, zstd, 512-row groups, written the
way `write_shard` writes them. Read = Parquet bytes to (N, *shape) numpy arrays of every
column; write = arrays to Parquet bytes; best of `--repeats`, the formats taking turns.

    python benchmarks/shard_format.py [--rows 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from amused.pipeline.shards import ROW_GROUP_ROWS, tensor_view

COLUMNS = {
    "image_tokens": (np.dtype("<u2"), (16, 16)),
    "text_hidden_states": (np.dtype("<f2"), (77, 768)),
    "text_pooled": (np.dtype("<f2"), (768,)),
}


def as_binary(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(x[0].nbytes), len(x), [None, pa.py_buffer(x)])


def from_binary(col: pa.ChunkedArray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    return tensor_view(col, dtype, shape)


def as_tensor(x: np.ndarray) -> pa.Array:
    tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(x.dtype), x.shape[1:])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), int(np.prod(x.shape[1:])))
    return pa.ExtensionArray.from_storage(tensor_type, storage)


def from_tensor(col: pa.ChunkedArray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    return col.combine_chunks().to_numpy_ndarray()


# name -> (encode, decode, extra write_table options)
FORMATS = {
    "fixed_size_binary (ours)": (as_binary, from_binary, {"use_dictionary": False}),  # as write_shard
    "fixed_shape_tensor": (as_tensor, from_tensor, {"use_dictionary": True}),
    "fixed_shape_tensor, no dict": (as_tensor, from_tensor, {"use_dictionary": False}),
}


def measure_once(data: dict[str, np.ndarray], encode, decode, options: dict) -> tuple[float, float, int]:
    """Write and read seconds, and the file's bytes."""
    start = time.perf_counter()
    table = pa.table({name: encode(x) for name, x in data.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS, **options)
    write = time.perf_counter() - start
    raw = buf.getvalue()
    del table, buf
    start = time.perf_counter()
    back = pq.read_table(io.BytesIO(raw))
    arrays = {name: decode(back[name], *COLUMNS[name]) for name in data}
    read = time.perf_counter() - start
    for name, x in data.items():
        assert arrays[name].shape == x.shape and np.array_equal(arrays[name], x), name
    return write, read, len(raw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    # Random embeddings compress worse than real ones: the sizes printed are an upper bound.
    data = {
        "image_tokens": rng.integers(0, 8192, (args.rows, 16, 16)).astype("<u2"),
        "text_hidden_states": rng.standard_normal((args.rows, 77, 768)).astype("<f2"),
        "text_pooled": rng.standard_normal((args.rows, 768)).astype("<f2"),
    }
    # Formats take turns within each repeat, so that a busy moment on a shared machine hits all of them.
    results = {name: (float("inf"), float("inf"), 0) for name in FORMATS}
    for _ in range(args.repeats):
        for name, (encode, decode, options) in FORMATS.items():
            w, r, size = measure_once(data, encode, decode, options)
            results[name] = (min(results[name][0], w), min(results[name][1], r), size)
    print(f"{args.rows} rows, {sum(x.nbytes for x in data.values()) / args.rows:.0f} raw bytes/row, "
          f"best of {args.repeats}")
    print("| type | write rows/s | read rows/s | file bytes/row | write time / ours | read time / ours |")
    print("|---|---:|---:|---:|---:|---:|")
    ours_w, ours_r, _ = results["fixed_size_binary (ours)"]
    for name, (w, r, size) in results.items():
        print(f"| {name} | {args.rows / w:.0f} | {args.rows / r:.0f} | {size / args.rows:.0f} | "
              f"{w / ours_w:.2f}x | {r / ours_r:.2f}x |")


if __name__ == "__main__":
    main()
