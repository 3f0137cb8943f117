"""The token dataset format: round trip and tensor views, schema and shard names, atomic
writes, and what verify and inspect catch."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
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
    (tmp_path / "ds" / ".00002.parquet.tmp-1234").write_bytes(b"junk")
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
    path = tmp_path / "ds" / fmt.MANIFEST
    obj = json.loads(path.read_text())
    obj["version"] = 99
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="version 99"):
        fmt.TokenDataset(url)


def ids_columns(n: int, start: int = 0) -> dict:
    """`make_columns` for the compact text mode: CLIP token ids instead of the encoder's outputs."""
    cols = make_columns(n, start)
    del cols["text_hidden_states"], cols["text_pooled"]
    cols["text_ids"] = np.random.default_rng(start).integers(0, 49408, (n, 5))
    return cols


@pytest.mark.parametrize("text", fmt.TEXT_MODES)
def test_every_shard_carries_the_spec_and_tensor_shapes_in_its_key_value_metadata(tmp_path, text):
    url = str(tmp_path / "ds")
    spec = make_spec(text=text)
    cols = make_columns(3) if text == "states" else ids_columns(3)
    fmt.write_shard(url, "/in/00000.tar", fmt.build_table(spec, cols))
    kv = pq.read_metadata(tmp_path / "ds" / "00000.parquet").metadata
    header = json.loads(kv[b"amused.dataset"])
    assert (header["format"], header["version"]) == ("amused-token-dataset", 3)
    assert fmt.DatasetSpec.from_json(header["spec"]) == spec and header["spec"]["text"] == text
    expected = {"image_tokens": {"dtype": "<u2", "shape": [4, 4]}}
    if text == "ids":
        expected["text_ids"] = {"dtype": "<u2", "shape": [5]}
    else:
        expected |= {"text_hidden_states": {"dtype": "<f2", "shape": [5, 3]},
                     "text_pooled": {"dtype": "<f2", "shape": [2]}}
    assert header["columns"] == expected
    table = pq.read_table(tmp_path / "ds" / "00000.parquet")
    for name, col in expected.items():
        got = np.frombuffer(b"".join(table[name].to_pylist()), col["dtype"]).reshape(-1, *col["shape"])
        np.testing.assert_array_equal(got, np.asarray(cols[name]).astype(col["dtype"]))


def test_verify_and_inspect_handle_the_compact_text_mode(tmp_path):
    url = str(tmp_path / "ds")
    spec = make_spec(text="ids")
    records = [fmt.write_shard(url, f"/in/{i:05d}.tar", fmt.build_table(spec, ids_columns(4, start=i * 10)))
               for i in range(2)]
    fmt.write_manifest(url, fmt.Manifest(spec, records))
    report = verify_dataset(url)
    assert report.ok and report.rows == 8, report.summary()
    info = inspect_dataset(url)
    assert info["rows"] == 8 and info["bytes_per_sample"]["text_ids"] > 0
    assert "text_hidden_states" not in info["bytes_per_sample"]


def test_verify_catches_a_shard_whose_key_value_spec_is_not_the_manifests(tmp_path):
    url = str(tmp_path / "ds")
    spec = make_spec()
    records = [fmt.write_shard(url, "/in/00000.tar", fmt.build_table(spec, make_columns(3))),
               fmt.write_shard(url, "/in/00001.tar", fmt.build_table(make_spec(seed=9), make_columns(3, start=1)))]
    fmt.write_manifest(url, fmt.Manifest(spec, records))
    errors = verify_dataset(url).errors
    assert errors == ["00001.parquet: key-value metadata spec differs from the manifest's (shard -> manifest): "
                      "seed: 9 -> 0"]


def test_verify_catches_non_finite_text_states(tmp_path):
    url = str(tmp_path / "ds")
    spec = make_spec()
    cols = make_columns(3)
    cols["text_pooled"][1, 0] = np.inf
    fmt.write_manifest(url, fmt.Manifest(spec, [fmt.write_shard(url, "/in/00000.tar", fmt.build_table(spec, cols))]))
    assert any("non-finite values in text_pooled" in e for e in verify_dataset(url).errors)


def make_version_2(url: str) -> None:
    """Rewrites a fresh dataset's side files as version 2 wrote them: names at the top level, no
    version in the markers, no spec in the shards (the bytes do not matter to what is tested)."""
    root = Path(url)
    manifest = json.loads((root / fmt.MANIFEST).read_text())
    manifest["version"] = 2
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / fmt.EMPTY_PROMPT).rename(root / "empty_prompt.safetensors")
    (root / "_stats").mkdir()
    for marker in (root / fmt.STATS_DIR).glob("*.json"):
        obj = json.loads(marker.read_text())
        del obj["version"]
        (root / "_stats" / marker.name).write_text(json.dumps(obj))
    shutil.rmtree(root / fmt.META_DIR)


def test_version_2_datasets_read_and_a_rerun_refuses_to_mix_versions(tmp_path):
    url = str(tmp_path / "ds")
    manifest = write_dataset(url)
    fmt.write_empty_prompt(url, np.ones((5, 3)), np.ones(2))
    make_version_2(url)
    ds = fmt.TokenDataset(url)
    assert ds.manifest.version == 2 and ds.num_rows == 12 and ds.spec == manifest.spec
    assert fmt.read_empty_prompt(url)["pooled"].tolist() == [1.0, 1.0]
    assert verify_dataset(url).ok  # a version 2 shard need not carry the spec
    with pytest.raises(ValueError, match=r"shard 00000.parquet was made with other settings .*format version: 2 -> 3.*"
                                         r"delete 00000.parquet and its marker _stats/00000.json"):
        fmt.completed_shards(url, manifest.spec)


def test_a_marker_of_another_format_version_is_refused(tmp_path):
    url = str(tmp_path / "ds")
    manifest = write_dataset(url)
    assert set(fmt.completed_shards(url, manifest.spec)) == {"00000.parquet", "00001.parquet"}
    path = tmp_path / "ds" / fmt.STATS_DIR / "00001.json"
    obj = json.loads(path.read_text())
    obj["version"] = 4
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"shard 00001.parquet .*: format version: 4 -> 3\. Refusing to mix"):
        fmt.completed_shards(url, manifest.spec)
    assert any("format version: 4 -> 3" in e for e in verify_dataset(url).errors)
