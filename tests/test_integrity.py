"""Nothing lost or mixed silently: damaged tars, settings recorded and enforced (manifest
and every shard's marker), bad metadata values, every web image format, config checks."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import s3fs

from amused.demo.datasets import sample_members
from amused.pipeline import shards as fmt
from amused.pipeline.inspect import verify_dataset
from amused.pipeline.pretokenize import PretokenizeConfig, decode_chunk, pretokenize, read_chunks
from amused.pipeline.wds import ShardFormatError, iter_samples, tar_bytes
from amused.plumbing.config import from_mapping
from tests import samples
from tests.samples import make_columns, make_spec

RES = 64


def config(tiny_models, src, out, **kw) -> PretokenizeConfig:
    base = dict(input=str(src), output=str(out), vqgan=str(tiny_models / "vqgan"), text_encoder=str(tiny_models),
                resolution=RES, batch_size=4, progress=False)
    return PretokenizeConfig(**{**base, **kw})


def three_samples() -> bytes:
    image = samples.save(samples.photo(), "JPEG")
    return tar_bytes([m for k in ("a", "b", "c") for m in sample_members(k, image, f"caption {k}", {"key": k})])


def member_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar.getmembers()]


def read_all(data: bytes) -> list[str]:
    return [s.key for s in iter_samples(io.BytesIO(data), "x/00000.tar")]


# ----- damaged tars ---------------------------------------------------------------------------

def test_intact_tar_reads_all_samples():
    assert read_all(three_samples()) == ["a", "b", "c"]


def test_damaged_header_in_the_middle_is_refused():
    data = bytearray(three_samples())
    at = member_offsets(bytes(data))[3]  # b.jpg's header
    data[at + 1] ^= 0x20  # one bit of the name: the header checksum no longer holds
    with pytest.raises(ShardFormatError, match=rf"x/00000.tar: .*damaged member header at byte {at}"):
        read_all(bytes(data))


def test_tar_cut_at_a_member_boundary_is_refused():
    data = three_samples()
    at = member_offsets(data)[6]  # c.jpg's header: a and b are whole
    with pytest.raises(ShardFormatError, match=rf"no end-of-archive marker: the file ends at byte {at}"):
        read_all(data[:at])


def test_zeroed_block_in_the_middle_is_refused():
    data = bytearray(three_samples())
    at = member_offsets(bytes(data))[3]
    data[at : at + 512] = bytes(512)  # reads as an end-of-archive marker, with members after it
    with pytest.raises(ShardFormatError, match="data after the end-of-archive marker"):
        read_all(bytes(data))


def test_sample_count_must_match_img2dataset_stats(tmp_path):
    (tmp_path / "00000.tar").write_bytes(three_samples())
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 5, "successes": 4}))
    rows = list(read_chunks({"shard": 0, "source": str(tmp_path / "00000.tar")}, batch_size=2))
    assert "holds 3 samples, but img2dataset's stats file records 4 successes" in rows[-1]["error"]
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 5, "successes": 3}))
    rows = list(read_chunks({"shard": 0, "source": str(tmp_path / "00000.tar")}, batch_size=2))
    assert [r["error"] for r in rows] == ["", ""]


def test_cut_tar_on_s3_is_refused(s3_bucket):
    data = three_samples()
    fs = s3fs.S3FileSystem()
    fs.pipe(f"{s3_bucket}/cut/00000.tar".removeprefix("s3://"), data[: member_offsets(data)[6]])
    rows = list(read_chunks({"shard": 0, "source": f"{s3_bucket}/cut/00000.tar"}, batch_size=8))
    assert rows[-1]["last"] and "no end-of-archive marker" in rows[-1]["error"]


# ----- bad metadata values, image formats --------------------------------------------------------

def decode_tar(tmp_path: Path, members: list[tuple[str, bytes]]) -> tuple[list[dict], list[dict]]:
    (tmp_path / "00000.tar").write_bytes(tar_bytes(members))
    items, skipped = [], []
    for row in read_chunks({"shard": 0, "source": str(tmp_path / "00000.tar")}, batch_size=64):
        assert not row["error"]
        out = decode_chunk(row, RES, "center", 1, 0, 32, 64_000_000)
        items += json.loads(out["items"])
        skipped += json.loads(out["skipped"])
    return items, skipped


BAD_META = {
    "bool": {"original_width": True, "original_height": 100},
    "huge": {"original_width": 3_000_000_000, "original_height": 100},
    "nan": {"original_width": 100, "original_height": float("nan")},
    "text": {"original_width": "4000", "original_height": 3000},
    "negative": {"original_width": -5, "original_height": 100},
    "zero": {"original_width": 0, "original_height": 0},
    "aesthetic_text": {"aesthetic_score": "high"},
    "aesthetic_inf": {"AESTHETIC_SCORE": float("inf")},
    "aesthetic_overflow": {"aesthetic": 1e39},
}


def test_bad_metadata_values_skip_their_sample_naming_the_key(tmp_path):
    image = samples.save(samples.photo(), "JPEG")
    members = sample_members("good", image, "fine", {"original_width": 4000.0, "original_height": 3000,
                                                     "aesthetic_score": 6})
    for name, meta in BAD_META.items():
        members += sample_members(name, image, "bad", meta)
    # img2dataset writes a missing score as NaN (through pandas): that is "not recorded".
    members += sample_members("unscored", image, "fine", {"aesthetic_score": float("nan"), "aesthetic": 5})
    members += [("notjson.jpg", image), ("notjson.txt", b"x"), ("notjson.json", b"{not json")]
    items, skipped = decode_tar(tmp_path, members)
    assert [(i["key"].split("/")[1], i["orig_width"], i["aesthetic_score"]) for i in items] == [
        ("good", 4000, 6.0), ("unscored", 160, 5.0)]  # no recorded size: the decoded one
    reasons = {s["key"]: (s["reason"], s["detail"]) for s in skipped}
    assert set(reasons) == set(BAD_META) | {"notjson"}
    assert all(reason == "bad_metadata" for reason, _ in reasons.values())
    for name, meta in BAD_META.items():
        assert reasons[name][1].split(":")[0] in meta, reasons[name]
    assert reasons["bool"][1].startswith("original_width: True")
    assert reasons["huge"][1].startswith("original_width: 3000000000")
    assert reasons["nan"][1].startswith("original_height: nan")


def test_every_web_image_format_is_read_and_a_missing_image_names_its_members(tmp_path):
    photo = samples.photo()
    members = sample_members("gif", samples.animated_gif(), "first frame green", {}, "gif")
    for ext, fmt_name in (("bmp", "BMP"), ("tiff", "TIFF"), ("tif", "TIFF"), ("webp", "WEBP"), ("avif", "AVIF")):
        members += sample_members(ext, samples.save(photo, fmt_name), f"a {ext}", {}, ext)
    members += sample_members("other", b"\0" * 64, "unknown kind", {}, "xyz")
    items, skipped = decode_tar(tmp_path, members)
    assert [i["key"].split("/")[1] for i in items] == ["gif", "bmp", "tiff", "tif", "webp", "avif"]
    assert [(s["key"], s["reason"]) for s in skipped] == [("other", "missing_image")]
    assert "members seen: other.json, other.txt, other.xyz" in skipped[0]["detail"]


# ----- settings in the dataset's identity and in every marker ---------------------------------

def test_pretokenize_fails_damaged_shards_by_name_and_writes_the_rest(ray_session, tiny_models, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image = samples.save(samples.photo(), "JPEG")
    good = three_samples()
    (src / "00000.tar").write_bytes(good)
    (src / "00001.tar").write_bytes(good[: member_offsets(good)[6]])
    damaged = bytearray(good)
    damaged[member_offsets(good)[3] + 1] ^= 0x20
    (src / "00002.tar").write_bytes(bytes(damaged))
    gif = sample_members("anim", samples.animated_gif(), "a gif", {"original_width": True}) + \
        sample_members("ok", image, "fine", {}) + sample_members("anim2", samples.animated_gif(), "a gif", {}, "gif")
    (src / "00003.tar").write_bytes(tar_bytes(gif))
    report = pretokenize(config(tiny_models, src, tmp_path / "out"))
    assert not report.ok and report.shards_written == 2
    assert sorted(report.failed_shards) == ["00001.parquet", "00002.parquet"]
    assert "no end-of-archive marker" in report.failed_shards["00001.parquet"]
    assert "damaged member header" in report.failed_shards["00002.parquet"]
    assert report.skipped == {"bad_metadata": 1}
    ds = fmt.TokenDataset(str(tmp_path / "out"))
    assert [s.name for s in ds.shards] == ["00000.parquet", "00003.parquet"]
    assert [k.split("/")[1] for k in ds.read_shard("00003.parquet", columns=["key"]).column(0).to_pylist()] == \
        ["ok", "anim2"]


def test_settings_are_recorded_resolved_and_a_mismatch_is_refused(ray_session, tiny_models, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "00000.tar").write_bytes(three_samples())
    assert pretokenize(config(tiny_models, src, out)).ok  # dtype auto: fp32 on CPU
    spec = fmt.read_manifest(str(out)).spec
    assert (spec.encoder_device, spec.encoder_dtype) == ("cpu", "fp32")
    marker = json.loads((out / fmt.STATS_DIR / "00000.json").read_text())
    assert fmt.DatasetSpec.from_json(marker["spec"]) == spec

    with pytest.raises(ValueError, match="encoder_dtype: 'fp32' -> 'bf16'"):
        pretokenize(config(tiny_models, src, out, dtype="bf16"))

    # Without the manifest, the marker still says how the shard was made.
    (out / fmt.MANIFEST).unlink()
    with pytest.raises(ValueError, match="shard 00000.parquet was made with other settings") as err:
        pretokenize(config(tiny_models, src, out, crop="random", seed=9))
    assert "crop: 'center' -> 'random'" in str(err.value) and "seed: 0 -> 9" in str(err.value)
    assert not (out / fmt.MANIFEST).exists()
    assert pretokenize(config(tiny_models, src, out)).shards_already_done == 1


def test_verify_checks_each_marker_against_the_manifest(tmp_path):
    url = str(tmp_path / "ds")
    spec = make_spec()
    records = []
    for i in range(2):
        record = fmt.write_shard(url, f"/in/{i:05d}.tar", fmt.build_table(spec, make_columns(3, start=i)))
        fmt.write_marker(url, record, [], spec)
        records.append(record)
    fmt.write_manifest(url, fmt.Manifest(spec, records))
    assert verify_dataset(url).ok and not verify_dataset(url).warnings
    path = tmp_path / "ds" / fmt.STATS_DIR / "00001.json"
    marker = json.loads(path.read_text())
    marker["spec"]["crop"], marker["spec"]["seed"] = "random", 9
    path.write_text(json.dumps(marker))
    errors = verify_dataset(url).errors
    assert len(errors) == 1 and errors[0].startswith(f"00001.parquet (marker {fmt.STATS_DIR}/00001.json): made with other")
    assert "crop: 'random' -> 'center'; seed: 9 -> 0" in errors[0]


# ----- config checks at construction ------------------------------------------------------------

@pytest.mark.parametrize("key, value, allowed", [
    ("resolution", 30, "positive multiple of 8"),
    ("batch_size", 0, ">= 1"),
    ("crop", "diagonal", "is not one of 'center', 'random'"),  # choices: checked by from_mapping
    ("views", 2, "needs crop 'random'"),
    ("dtype", "fp16", "is not one of 'auto', 'fp32', 'bf16'"),
    ("device", "tpu", "is not one of 'auto', 'cpu', 'cuda'"),
    ("seed", -1, ">= 0"),
    ("decode_cpus", 0.0, "> 0"),
])
def test_pretokenize_config_is_checked_when_parsed(key, value, allowed):
    section = {"input": "in", "output": "out", "vqgan": "v", "text_encoder": "t", key: value}
    with pytest.raises(ValueError, match=rf"^pretokenize(: |\.){key}: .*{allowed}"):
        from_mapping(PretokenizeConfig, section, "pretokenize")
