"""The token dataset format: round trip and tensor views, schema and shard names, atomic
writes, and what verify and inspect catch."""

import json

import numpy as np
import pytest

from amused.pipeline import shards as fmt
from amused.pipeline.inspect import format_inspect, inspect_dataset, verify_dataset
from amused.plumbing.fsio import atomic_writer
from tests.samples import make_columns, make_spec, write_dataset

pytestmark = pytest.mark.unit


def test_round_trip_types_and_zero_copy(tmp_path):
    url = str(tmp_path / "ds")
    write_dataset(url)
    ds = fmt.TokenDataset(url)
    assert ds.num_rows == 12 and [s.name for s in ds.shards] == ["00000.parquet", "00001.parquet"]
    batch = next(ds.iter_batches(batch_size=100))
    expected = make_columns(7, start=0)
    assert batch["image_tokens"].dtype == np.dtype("<u2") and batch["image_tokens"].shape == (7, 4, 4)
    np.testing.assert_array_equal(batch["image_tokens"], expected["image_tokens"])
    assert batch["text_hidden_states"].dtype == np.float16 and batch["text_hidden_states"].shape == (7, 5, 3)
    np.testing.assert_array_equal(batch["text_hidden_states"], expected["text_hidden_states"].astype(np.float16))
    assert batch["caption"] == expected["caption"]
    assert np.isnan(batch["aesthetic_score"][1]) and batch["aesthetic_score"][0] == 5.5
    # Tensor views share the Arrow buffer instead of copying it.
    table = ds.read_shard("00000.parquet", columns=["text_hidden_states"])
    view = fmt.tensor_view(table.column(0), np.dtype("<f2"), (5, 3))
    assert not view.flags.owndata and view.base is not None


def test_tensor_view_respects_slice_offsets():
    spec = make_spec()
    cols = make_columns(6)
    table = fmt.build_table(spec, cols).slice(2, 3)
    view = fmt.tensor_view(table.column("image_tokens"), np.dtype("<u2"), (4, 4))
    np.testing.assert_array_equal(view, np.asarray(cols["image_tokens"][2:5], np.uint16))


def test_schema_rejects_wrong_shapes():
    cols = make_columns(3)
    cols["image_tokens"] = np.zeros((3, 5, 5))
    with pytest.raises(ValueError, match="image_tokens"):
        fmt.build_table(make_spec(), cols)


def test_shard_names_are_integers():
    assert fmt.shard_name("s3://b/x/00042.tar") == "00042.parquet"
    with pytest.raises(ValueError, match="zero-padded integers"):
        fmt.shard_name("/x/part-a.tar")


def test_atomic_writer_leaves_nothing_under_the_final_name_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_writer(str(target)) as fh:
            fh.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_verify_passes_then_catches_each_kind_of_damage(tmp_path):
    url = str(tmp_path / "ds")
    write_dataset(url)
    assert verify_dataset(url).ok
    (tmp_path / "ds" / "00002.parquet.tmp-1234").write_bytes(b"junk")
    report = verify_dataset(url)
    assert report.ok and any("temporary" in w for w in report.warnings)

    shard = tmp_path / "ds" / "00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("sha256" in e for e in verify_dataset(url).errors)

    shard.unlink()
    assert any("missing" in e for e in verify_dataset(url).errors)


def test_verify_catches_row_count_and_duplicate_keys(tmp_path):
    url = str(tmp_path / "ds")
    manifest = write_dataset(url)
    manifest.shards[1].rows += 1
    fmt.write_manifest(url, manifest)
    assert any("rows, manifest says" in e for e in verify_dataset(url).errors)

    url2 = str(tmp_path / "dup")
    spec = make_spec()
    records = [fmt.write_shard(url2, f"/in/{i:05d}.tar", fmt.build_table(spec, make_columns(3, start=0)))
               for i in range(2)]
    fmt.write_manifest(url2, fmt.Manifest(spec, records))
    assert any("shared with earlier shards" in e for e in verify_dataset(url2).errors)


def test_verify_catches_out_of_range_tokens(tmp_path):
    url = str(tmp_path / "ds")
    spec = make_spec()
    tokens = np.full((2, 4, 4), 3)
    tokens[1, 2, 2] = 16  # == codebook size
    record = fmt.write_shard(url, "/in/00000.tar", fmt.build_table(spec, make_columns(2, tokens=tokens)))
    fmt.write_manifest(url, fmt.Manifest(spec, [record]))
    assert any("codebook size" in e for e in verify_dataset(url).errors)


def test_inspect_counts_codebook_usage_and_captions(tmp_path):
    url = str(tmp_path / "ds")
    spec = make_spec()
    tokens = np.zeros((4, 4, 4), int)
    tokens[0] = 1
    tokens[1, 0, 0] = 7  # codes used: 0, 1, 7
    record = fmt.write_shard(url, "/in/00000.tar", fmt.build_table(spec, make_columns(4, tokens=tokens)))
    fmt.write_manifest(url, fmt.Manifest(spec, [record]))
    info = inspect_dataset(url)
    assert info["rows"] == 4 and info["codebook"]["used"] == 3 and info["codebook"]["size"] == 16
    counts = np.array([47, 16, 1])
    p = counts / counts.sum()
    assert info["codebook"]["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert info["caption_chars"]["max"] == 4 and info["caption_chars"]["min"] == 1
    assert info["bytes_per_sample"]["text_hidden_states"] > 0
    assert "3/16 codes used" in format_inspect(info)


def test_manifest_rejects_other_formats(tmp_path):
    url = str(tmp_path / "ds")
    write_dataset(url)
    path = tmp_path / "ds" / "_manifest.json"
    obj = json.loads(path.read_text())
    obj["version"] = 99
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="version 99"):
        fmt.TokenDataset(url)
