import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import s3fs

from amused.demo.datasets import sample_members, write_shape_shards
from amused.pipeline import pretokenize as pretokenize_module
from amused.pipeline import shards as fmt
from amused.pipeline.images import decode_views
from amused.pipeline.inspect import verify_dataset
from amused.pipeline.pretokenize import ChunkEncoder, PretokenizeConfig, pretokenize
from amused.pipeline.wds import tar_bytes
from amused.plumbing.fsio import atomic_writer
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.text import TextEncoder
from tests import samples

RES = 64


def config(tiny_models, src, out, **kw) -> PretokenizeConfig:
    base = dict(input=str(src), output=str(out), vqgan=str(tiny_models / "vqgan"), text_encoder=str(tiny_models),
                resolution=RES, batch_size=4, progress=False)
    return PretokenizeConfig(**{**base, **kw})


def write_tar(url: str, members: list[tuple[str, bytes]]) -> None:
    with atomic_writer(url) as fh:
        fh.write(tar_bytes(members))


@pytest.fixture(scope="module")
def awkward_input(tmp_path_factory) -> Path:
    """Shard 00000: every awkward case (+ a sample with no image); shard 00001: plain generated images."""
    root = tmp_path_factory.mktemp("awkward")
    members = []
    for i, (name, (image, caption, _)) in enumerate(samples.awkward_samples().items()):
        ext = "png" if image[:4] == b"\x89PNG" else "jpg"
        meta = {"key": name, "original_width": 4000, "original_height": 3000} if name == "good" else {"key": name}
        if name == "cmyk":
            meta["sample_key"] = "url-hash-cmyk"
        members += sample_members(name, image, caption, meta, ext)
    members += sample_members("txtonly", None, "no image here", {"key": "txtonly"})
    write_tar(str(root / "00000.tar"), members)
    write_shape_shards(str(root / "more"), shards=1, per_shard=6, seed=5)
    os.rename(root / "more" / "00000.tar", root / "00001.tar")
    return root


def expected_skips() -> dict[str, int]:
    counts: dict[str, int] = {"missing_image": 1}
    for _, _, reason in samples.awkward_samples().values():
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def test_awkward_inputs_are_counted_and_good_ones_match_direct_encoding(ray_session, tiny_models, awkward_input,
                                                                        tmp_path):
    out = tmp_path / "tokens"
    report = pretokenize(config(tiny_models, awkward_input, out))
    assert report.ok and report.shards_written == 2
    assert report.skipped == expected_skips()
    assert verify_dataset(str(out)).ok

    ds = fmt.TokenDataset(str(out))
    assert ds.manifest.skipped() == expected_skips()
    marker = json.loads((out / fmt.STATS_DIR / "00000.json").read_text())
    assert {s["key"]: s["reason"] for s in marker["skipped_samples"]}["html"] == "not_an_image"

    rows = next(ds.iter_batches(batch_size=1000, shards=["00000.parquet"]))
    good = [n for n, (_, _, reason) in samples.awkward_samples().items() if reason is None]
    assert [k.split("/")[1] for k in rows["key"]] == good  # tar order, bad ones removed

    tok = ImageTokenizer.from_pretrained(tiny_models / "vqgan", device="cpu")
    text = TextEncoder.from_pretrained(tiny_models, device="cpu")
    awkward = samples.awkward_samples()
    for i, name in enumerate(good):
        orig, offsets, crops = decode_views(awkward[name][0], RES, "center", 1, 0, f"00000/{name}", 32, 64_000_000)
        np.testing.assert_array_equal(rows["image_tokens"][i], tok.encode(crops)[0], err_msg=name)
        caption = awkward[name][1].decode()
        assert rows["caption"][i] == caption
        ref = text.encode([caption]).hidden_states[0].numpy().astype(np.float16)
        np.testing.assert_allclose(rows["text_hidden_states"][i].astype(np.float32), ref.astype(np.float32),
                                   atol=2e-3, rtol=2e-3)
        assert (rows["crop_top"][i], rows["crop_left"][i]) == offsets[0]
    by_name = dict(zip(good, range(len(good))))
    assert (rows["orig_width"][by_name["good"]], rows["orig_height"][by_name["good"]]) == (4000, 3000)
    assert (rows["orig_width"][by_name["exifrot"]], rows["orig_height"][by_name["exifrot"]]) == (120, 160)
    assert rows["content_id"][by_name["cmyk"]] == "url-hash-cmyk"
    assert rows["key"][by_name["cmyk"]] == "00000/cmyk/0/url-hash-cmyk"

    # A rerun finds everything done and rewrites nothing.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = pretokenize(config(tiny_models, awkward_input, out))
    assert again.shards_already_done == 2 and again.shards_written == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before


def test_malformed_shard_fails_alone_with_a_clear_error(ray_session, tiny_models, tmp_path):
    src = tmp_path / "src"
    write_shape_shards(str(src), shards=2, per_shard=3)
    image = samples.save(samples.photo(), "JPEG")
    write_tar(str(src / "00002.tar"), [("a.jpg", image), ("b.jpg", image), ("a.txt", b"split sample")])
    report = pretokenize(config(tiny_models, src, tmp_path / "out"))
    assert not report.ok and report.shards_written == 2
    assert "00002.tar: members of key 'a' are not adjacent" in report.failed_shards["00002.parquet"]
    assert [s.name for s in fmt.TokenDataset(str(tmp_path / "out")).shards] == ["00000.parquet", "00001.parquet"]


def test_random_views_store_distinct_crops(ray_session, tiny_models, tmp_path):
    src = tmp_path / "src"
    write_shape_shards(str(src), shards=1, per_shard=4, min_size=96, max_size=200, seed=2)
    report = pretokenize(config(tiny_models, src, tmp_path / "out", crop="random", views=3, seed=7))
    assert report.ok
    rows = next(fmt.TokenDataset(str(tmp_path / "out")).iter_batches(batch_size=100))
    assert len(rows["key"]) == 12 and list(rows["view"]) == [0, 1, 2] * 4
    boxes = list(zip(rows["crop_top"], rows["crop_left"]))
    assert len(set(boxes[:3])) > 1 or len(set(boxes[3:6])) > 1
    with pytest.raises(ValueError, match="other settings"):
        pretokenize(config(tiny_models, src, tmp_path / "out", crop="random", views=3, seed=8))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sigkill_then_rerun_is_byte_identical(ray_session, tiny_models, tmp_path):
    src = tmp_path / "src"
    n_shards = 8
    write_shape_shards(str(src), shards=n_shards, per_shard=12, seed=3)
    reference = tmp_path / "reference"
    assert pretokenize(config(tiny_models, src, reference)).ok

    # The last input shard becomes a named pipe with no writer: reading it blocks, so that shard
    # cannot finish and the kill lands part-way however fast the others are encoded (on a fast
    # machine all 8 markers once appeared between two polls). Its bytes come back for the rerun.
    held = sorted(src.glob("*.tar"))[-1]
    held.rename(tmp_path / "held.tar")
    os.mkfifo(held)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "amused.orchestration.cli", "pretokenize", "--input", str(src), "--output", str(out),
           "--vqgan", str(tiny_models / "vqgan"), "--text-encoder", str(tiny_models), "--resolution", str(RES),
           "--batch-size", "4", "--no-progress"]
    # Its own session, so SIGKILL takes the whole process group: driver, raylet, workers.
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 240
    stats = out / fmt.STATS_DIR
    while not (stats.exists() and any(stats.glob("*.json"))):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(stats.glob("*.json")))
    assert 0 < done_at_kill < n_shards, "the kill must land part-way for this test to mean anything"
    assert not (out / fmt.MANIFEST).exists() or len(fmt.read_manifest(str(out)).shards) < n_shards
    held.unlink()
    (tmp_path / "held.tar").rename(held)

    report = pretokenize(config(tiny_models, src, out))
    assert report.ok and report.shards_already_done >= done_at_kill
    assert report.shards_written == n_shards - report.shards_already_done
    assert verify_dataset(str(out)).ok
    # The CLI also keeps Ray's messages in the output's logs/ray.log: not part of the dataset.
    got = {name: data for name, data in _files(out).items() if not name.startswith("logs/")}
    want = _files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"


def test_s3_input_and_output(ray_session, tiny_models, s3_bucket, tmp_path):
    local_src = tmp_path / "src"
    write_shape_shards(str(local_src), shards=2, per_shard=5, seed=9)
    fs = s3fs.S3FileSystem()
    fs.put(str(local_src) + "/", f"{s3_bucket}/wds/".removeprefix("s3://"), recursive=True)
    out = f"{s3_bucket}/tokens"
    report = pretokenize(config(tiny_models, f"{s3_bucket}/wds", out))
    assert report.ok and report.rows_written == 10
    assert verify_dataset(out).ok
    local = tmp_path / "local"
    pretokenize(config(tiny_models, local_src, local))
    for name in ("00000.parquet", "00001.parquet"):
        assert fs.cat_file(f"{out}/{name}".removeprefix("s3://")) == (local / name).read_bytes()


def test_driver_receives_records_not_samples(ray_session, tiny_models, tmp_path):
    src = tmp_path / "src"
    write_shape_shards(str(src), shards=3, per_shard=32, seed=4)
    # Chunks of 32 samples (~5 KB each here): blocks over Ray's 100 KB, which it would otherwise
    # hand to their owner, the driver, inline; real blocks (64 x 118 KB) are far over it.
    report = pretokenize(config(tiny_models, src, tmp_path / "out", batch_size=32))
    assert report.ok and report.rows_written == 96
    spec = fmt.read_manifest(str(tmp_path / "out")).spec
    encoded = sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape in spec.tensor_columns().values())
    per_sample = report.driver_bytes / report.rows_written
    # Had the samples come through the driver, it would have received at least their tensors.
    assert encoded * 32 > 100 << 10 and 0 < per_sample < 1024, (per_sample, encoded)
    assert report.driver_cpu_seconds > 0 and "bytes/sample" in report.summary()
    node = ray.get_runtime_context().get_node_id()  # the session's one node
    assert report.writer_nodes == {f"0000{i}.parquet": node for i in range(3)}



class _CountingEncoder(ChunkEncoder):
    """The job's encoder, noting the most calls it saw running at once in the file `overlap`
    beside its models' folder (an actor sees nothing of the test but its arguments). Until two
    calls have overlapped, a call waits for a second one (up to OVERLAP_WAIT seconds) rather
    than for a fixed time: a loaded machine slow to hand over the next chunk does not fail it."""

    OVERLAP_WAIT = 60

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.note, self.running, self.most = Path(kwargs["text_encoder"]).parent / "overlap", 0, 0
        self.counted = threading.Condition()

    def __call__(self, batch):
        with self.counted:
            self.running += 1
            self.most = max(self.most, self.running)
            self.note.write_text(str(self.most))
            self.counted.notify_all()
            self.counted.wait_for(lambda: self.most >= 2, timeout=self.OVERLAP_WAIT)
        try:
            return super().__call__(batch)
        finally:
            with self.counted:
                self.running -= 1


def test_two_calls_at_once_per_encoder_actor_write_the_same_bytes(ray_session, tiny_models, tmp_path, monkeypatch):
    """What a GPU actor does (GPU_CALLS chunks at once, the models one at a time), here on the CPU."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    src = tmp_path / "src"
    write_shape_shards(str(src), shards=3, per_shard=10, seed=6)
    assert pretokenize(config(models, src, tmp_path / "reference")).ok
    plan = pretokenize_module._encoder_plan
    monkeypatch.setattr(pretokenize_module, "_encoder_plan",
                        lambda cfg: dataclasses.replace(plan(cfg), calls=pretokenize_module.GPU_CALLS))
    report = pretokenize_module._pretokenize(config(models, src, tmp_path / "two"), _CountingEncoder)
    assert report.ok and report.rows_written == 30
    assert int((tmp_path / "overlap").read_text()) == 2  # the actor did run two calls at once
    got, want = _files(tmp_path / "two"), _files(tmp_path / "reference")
    assert sorted(got) == sorted(want) and all(got[name] == want[name] for name in want)
