"""A token dataset folder reads in the tools its users already have: pyarrow, pandas, DuckDB,
Ray Data and Hugging Face `datasets`, pointed at the folder (side files and markers
included), in both text modes. The dataset is written with the project's writers; the
reading side below uses no project code: each tensor column's dtype and shape come from
the shards' Parquet key-value metadata only, as they would for a user with only pyarrow."""

from __future__ import annotations

import json

import datasets
import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray

from amused.pipeline import shards as fmt
from amused.plumbing.fsio import TMP_MARK
from tests.samples import make_columns, make_spec

SIZES = (7, 5)
SCALARS = ("caption", "view", "orig_width", "crop_left")


def columns(text: str, n: int, start: int) -> dict:
    cols = make_columns(n, start)
    if text == "ids":
        del cols["text_hidden_states"], cols["text_pooled"]
        cols["text_ids"] = np.random.default_rng(start).integers(0, 49408, (n, 5))
    return cols


def write(url: str, text: str) -> dict[str, dict]:
    """A finished dataset, every side file included; returns what was written, row by key."""
    spec = make_spec(text=text)
    records, rows = [], {}
    for i, n in enumerate(SIZES):
        cols = columns(text, n, start=10 * i)
        record = fmt.write_shard(url, f"/in/{i:05d}.tar", fmt.build_table(spec, cols))
        fmt.write_marker(url, record, [], spec)
        records.append(record)
        for r, key in enumerate(cols["key"]):
            rows[key] = {name: cols[name][r] for name in cols}
    fmt.write_manifest(url, fmt.Manifest(spec, records))
    fmt.write_empty_prompt(url, np.zeros((5, 3)), np.zeros(2))
    return rows


@pytest.fixture(scope="module", params=fmt.TEXT_MODES)
def dataset(request, tmp_path_factory) -> tuple[str, dict[str, dict]]:
    folder = tmp_path_factory.mktemp(f"open-{request.param}") / "tokens"
    rows = write(str(folder), request.param)
    # What a writer killed mid-shard leaves on a local disk: its temporary file, which readers must skip.
    (folder / f".00009.parquet{TMP_MARK}dead0000").write_bytes(b"PAR1 half a shard")
    return str(folder), rows


# ----- the reading side: no project code from here on ----------------------------------------

def header_from_pyarrow(folder: str) -> dict:
    """The dataset's description, from one shard's Parquet key-value metadata."""
    parquet = pq.ParquetDataset(folder)
    first = sorted(parquet.files)[0]
    return json.loads(pq.read_metadata(first, filesystem=parquet.filesystem).metadata[b"amused.dataset"])


def check(header: dict, written: dict[str, dict], got: dict[str, list]) -> None:
    """`got`: the columns a reader returned (tensors as bytes), in any row order."""
    assert header["format"] == "amused-token-dataset" and header["version"] == 3
    tensors = header["columns"]
    text = {"ids": {"text_ids"}, "states": {"text_hidden_states", "text_pooled"}}[header["spec"]["text"]]
    assert set(tensors) == {"image_tokens", *text}
    assert sorted(got["key"]) == sorted(written) and len(got["key"]) == sum(SIZES)
    order = np.argsort(got["key"])
    keys = [got["key"][i] for i in order]
    for name, col in tensors.items():
        values = [bytes(got[name][i]) for i in order]
        array = np.frombuffer(b"".join(values), col["dtype"]).reshape(len(values), *col["shape"])
        expected = np.stack([np.asarray(written[k][name]).astype(col["dtype"]) for k in keys])
        assert array.dtype == np.dtype(col["dtype"]) and array.shape == expected.shape
        np.testing.assert_array_equal(array, expected)
    for name in SCALARS:
        assert [got[name][i] for i in order] == [written[k][name] for k in keys]


def test_pyarrow_reads_the_folder(dataset):
    folder, written = dataset
    table = pq.read_table(folder)
    check(header_from_pyarrow(folder), written, table.to_pydict())
    # The description also rides along on the table read from the folder.
    assert json.loads(table.schema.metadata[b"amused.dataset"]) == header_from_pyarrow(folder)


def test_pandas_reads_the_folder(dataset):
    folder, written = dataset
    df = pd.read_parquet(folder)
    check(header_from_pyarrow(folder), written, {c: df[c].tolist() for c in df.columns})


@pytest.mark.parametrize("source", ["{folder}/*.parquet", "{folder}"])
def test_duckdb_reads_the_folder(dataset, source):
    folder, written = dataset
    source = source.format(folder=folder)
    # DuckDB alone: the description from its own key-value metadata reader.
    kv = duckdb.sql(f"SELECT value FROM parquet_kv_metadata('{folder}/*.parquet') "
                    "WHERE key = 'amused.dataset'").fetchall()
    assert len(kv) == len(SIZES) and len({v for (v,) in kv}) == 1
    rel = duckdb.sql(f"SELECT * FROM read_parquet('{source}')")
    got = dict(zip(rel.columns, map(list, zip(*rel.fetchall()))))
    check(json.loads(kv[0][0]), written, got)


def test_ray_data_reads_the_folder(ray_session, dataset):
    folder, written = dataset
    rows = ray.data.read_parquet(folder).take_all()
    check(header_from_pyarrow(folder), written, {c: [r[c] for r in rows] for c in rows[0]})


def test_hugging_face_datasets_reads_the_folder(dataset, tmp_path):
    folder, written = dataset
    ds = datasets.load_dataset("parquet", data_dir=folder, split="train", cache_dir=str(tmp_path / "hf"))
    check(header_from_pyarrow(folder), written, ds.to_dict())


def test_readers_on_s3(s3_bucket, ray_session, tmp_path):
    """The same folder on object storage: pandas (s3fs), Ray Data (Arrow's S3) and `datasets` (fsspec)."""
    url = f"{s3_bucket}/open-readers/tokens"
    written = write(url, "states")
    header = header_from_pyarrow(url)
    df = pd.read_parquet(url)
    check(header, written, {c: df[c].tolist() for c in df.columns})
    rows = ray.data.read_parquet(url).take_all()
    check(header, written, {c: [r[c] for r in rows] for c in rows[0]})
    # `data_dir` is for local folders; a remote folder is a pattern: everything under it, as for data_dir.
    ds = datasets.load_dataset("parquet", data_files=f"{url}/**", split="train", cache_dir=str(tmp_path / "hf"))
    check(header, written, ds.to_dict())
