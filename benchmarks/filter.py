"""Metadata filtering throughput: bare pyarrow read vs `amused filter` vs the same rules in pandas.

    (a) bare read: pyarrow reads the columns the filter reads, nothing else
    (b) the filter job (Ray, end to end: rules, keys, global de-duplication, seeded
        shuffle, download shards written), Ray start-up excluded
    (c) pandas: the same rules, de-duplication, shuffle and shard writing, as one process

Input: LAION-2B-en-schema Parquet (snappy) from `amused.demo.site.laion_metadata`,
~2% repeated URLs. Rules: the aMUSEd-512 data recipe (sides >= 256, watermark <= 0.5,
aesthetic >= 4.5, NSFW <= 0.45) plus the URL policy and non-empty captions.

    python benchmarks/filter.py --rows 5000000 --files 10
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import ray

from amused.demo.site import write_laion_metadata
from amused.pipeline.filter import SCHEMAS, FilterConfig, filter_metadata
from amused.plumbing.fsio import list_files

RULES = dict(min_width=256, min_height=256, max_watermark=0.5, min_aesthetic=4.5, max_nsfw=0.45)
PRIVATE = r"^https?://(?:[^/?#]*@)?(?:127\.|10\.|192\.168\.|169\.254\.|172\.(?:1[6-9]|2\d|3[01])\.|localhost|\[)"


def bare_read(files: list[str], columns: list[str]) -> int:
    return sum(pq.read_table(f, columns=columns).num_rows for f in files)


def pandas_filter(files: list[str], columns: list[str], out: Path, rows_per_shard: int) -> int:
    """What a careful user writes in pandas for the same rules."""
    df = pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)
    url = df["URL"].str.strip()
    norm = url.str.replace(r"#.*$", "", regex=True)
    head = norm.str.extract(r"^([^:/?#]*:(?://[^/?#]*)?)", expand=False).fillna("")
    rest = pd.Series([u[len(h):] for u, h in zip(norm.fillna(""), head)], index=df.index)
    norm = head.str.lower() + rest
    caption = df["TEXT"].fillna("").str.strip()
    keep = (norm.str.startswith("http://") | norm.str.startswith("https://")) & ~norm.str.contains(PRIVATE)
    keep &= caption.str.len() >= 1
    keep &= (df["WIDTH"] >= RULES["min_width"]) & (df["HEIGHT"] >= RULES["min_height"])
    keep &= df["pwatermark"] <= RULES["max_watermark"]
    keep &= df["AESTHETIC_SCORE"] >= RULES["min_aesthetic"]
    keep &= df["punsafe"] <= RULES["max_nsfw"]
    kept = df[keep].assign(URL=url[keep], TEXT=caption[keep], norm=norm[keep])
    kept = kept.sort_values(["norm", "URL"]).drop_duplicates("norm")
    kept["sample_key"] = pd.util.hash_pandas_object(kept["norm"], index=False).map("{:016x}".format)
    kept = kept.drop(columns="norm").sample(frac=1.0, random_state=0)
    out.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, len(kept), rows_per_shard)):
        kept.iloc[start:start + rows_per_shard].to_parquet(out / f"{i:05d}.parquet", compression="zstd")
    return len(kept)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--files", type=int, default=10)
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-filter-"))
    t = time.perf_counter()
    files = write_laion_metadata(str(work / "meta"), args.files, args.rows // args.files)
    print(f"data: {args.rows:,} rows in {args.files} files written in {time.perf_counter() - t:.1f}s", flush=True)
    columns = sorted(set(SCHEMAS["laion"].values()) & set(pq.read_schema(files[0]).names))

    ray.init(include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    report = filter_metadata(FilterConfig(input=str(work / "meta"), output=str(work / "ours"),
                                          rows_per_shard=args.rows_per_shard, progress=False, **RULES))
    ours = time.perf_counter() - t
    ray.shutdown()
    print(f"(b) amused filter {args.rows / ours:12,.0f} rows/s  {ours:6.1f}s  kept {report.total['rows_out']:,}")

    os.sync()
    t = time.perf_counter()
    n = bare_read(files, columns)
    bare = time.perf_counter() - t
    print(f"(a) bare read     {n / bare:12,.0f} rows/s  {bare:6.1f}s")

    t = time.perf_counter()
    kept = pandas_filter(files, columns, work / "pandas", args.rows_per_shard)
    slow = time.perf_counter() - t
    print(f"(c) pandas        {args.rows / slow:12,.0f} rows/s  {slow:6.1f}s  kept {kept:,}")
    print(f"\n{os.cpu_count()} CPUs; filter/bare read = {ours / bare:.2f}x time (goal <= 1.5); "
          f"pandas/filter = {slow / ours:.2f}x time (goal >= 5); shards {len(list_files(str(work / 'ours'), '.parquet'))}")


if __name__ == "__main__":
    main()
