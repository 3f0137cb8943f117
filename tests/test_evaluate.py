"""The distributed `amused evaluate` (Ray actors, watcher) and `amused fid-stats`; the
measurements alone are in test_metrics_units.py."""

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from amused.demo.datasets import write_shape_shards
from amused.demo.tiny_models import write_tiny_clip
from amused.orchestration.cli import main
from amused.tokenizer.inception import write_random_inception
from amused.training.evaluation.metrics import RESIZE_PROTOCOL, FeatureStats

PROMPTS = ["a red circle on a grey background", "a blue square", "a green triangle", "a yellow star",
           "a purple circle on a white background", "a black square"]


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, tiny_models, trained_checkpoint, ray_session):
    root = tmp_path_factory.mktemp("eval")
    inception = write_random_inception(root / "inception.pth")
    clip = write_tiny_clip(root / "clip")
    write_shape_shards(str(root / "real"), shards=1, per_shard=10, min_size=48, max_size=96)
    (root / "real" / "00001.tar").write_bytes(b"not a tar")  # a bad shard among real images: refused loudly
    assert main(["fid-stats", "--images", str(root / "real"), "--output", str(root / "ref.npz"),
                 "--inception", str(inception), "--resolution", "64"]) == 1
    (root / "real" / "00001.tar").unlink()
    assert main(["fid-stats", "--images", str(root / "real"), "--output", str(root / "ref.npz"),
                 "--inception", str(inception), "--resolution", "64"]) == 0
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:3]) + "\n\n" + "\n".join(PROMPTS[3:]) + "\n")
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(trained_checkpoint, run / "checkpoints" / "step_00000004")
    args = ["--prompts", str(root / "prompts.txt"), "--reference", str(root / "ref.npz"), "--inception",
            str(inception), "--clip", str(clip), "--vqgan", str(tiny_models / "vqgan"), "--text-encoder",
            str(tiny_models), "--steps", "4", "--grid", "4"]
    return root, run, args


def test_reference_statistics_record_protocol_and_count(eval_setup):
    root, _, _ = eval_setup
    ref = FeatureStats.load(root / "ref.npz")
    assert ref.count == 10 and ref.protocol == RESIZE_PROTOCOL and len(ref.weights_sha256) == 64
    assert ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048) and np.isfinite(ref.sigma).all()


def test_two_actors_equal_one_and_batch_size_does_not_matter(eval_setup):
    root, run, args = eval_setup
    ckpt = str(run / "checkpoints" / "step_00000004")
    results = {}
    for name, extra in {"one": ["--actors", "1", "--batch-size", "6"], "two": ["--actors", "2", "--batch-size", "2"],
                        "batch1": ["--actors", "1", "--batch-size", "1"]}.items():
        out = root / f"out-{name}"
        assert main(["evaluate", "--checkpoint", ckpt, "--output", str(out), *args, *extra]) == 0
        results[name] = json.loads((out / "step_00000004.json").read_text())
        assert (out / "step_00000004.png").exists() and (out / "metrics.png").exists()
    one = results["one"]
    assert set(one) == {"step", "checkpoint", "weights", "fid", "clip_score", "clip_score_unfloored", "images",
                        "fid_protocol", "fid_features", "fid_reference", "fid_reference_images", "inception_sha256",
                        "clip_score_scale", "clip", "prompts", "prompts_sha256", "seed", "sample", "actors",
                        "seconds"}  # the fields of every result since the first release (the file sorts them)
    assert one["step"] == 4 and one["checkpoint"] == ckpt
    assert one["images"] == 6 and one["fid_reference_images"] == 10 and one["weights"] == "ema"
    assert one["fid"] > 1e-3 and np.isfinite(one["clip_score"])  # generated vs real: not the same distribution
    assert "clean-fid" in one["fid_protocol"] and "100 x cosine" in one["clip_score_scale"]
    for other in ("two", "batch1"):
        # the same images (tests/test_sample.py pins the tokens); features differ only by float rounding
        # of batched convolutions (measured: 6e-6 relative at batch 1)
        assert results[other]["actors"] == (2 if other == "two" else 1)
        assert results[other]["fid"] == pytest.approx(one["fid"], rel=1e-4)
        assert results[other]["clip_score_unfloored"] == pytest.approx(one["clip_score_unfloored"], rel=1e-4)
        assert results[other]["clip_score"] == pytest.approx(one["clip_score"], rel=1e-4, abs=1e-9)


def test_watcher_evaluates_checkpoints_as_they_appear_and_a_rerun_does_nothing(eval_setup, tmp_path, capsys):
    _, done_run, args = eval_setup
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    source = done_run / "checkpoints" / "step_00000004"

    def training():  # writes checkpoints the way training does: complete folder, then the run's result
        for step in (2, 4):
            time.sleep(1.0)
            # Copy under a temporary name, then rename: a checkpoint appears whole, its marker
            # never before its weights, as training publishes it.
            staging = run / "checkpoints" / f".staging_{step:08d}"
            shutil.copytree(source, staging)
            staging.rename(run / "checkpoints" / f"step_{step:08d}")
        time.sleep(1.0)
        (run / "result.json").write_text("{}")

    writer = threading.Thread(target=training)
    writer.start()
    try:
        assert main(["evaluate", "--run", str(run), "--watch", "--poll", "0.3", "--timeout", "300", *args]) == 0
    finally:
        writer.join()
    results = sorted(p.name for p in (run / "eval").glob("step_*.json"))
    assert results == ["step_00000002.json", "step_00000004.json"]
    two, four = (json.loads((run / "eval" / r).read_text()) for r in results)
    assert two["fid"] == pytest.approx(four["fid"], rel=1e-9)  # the same weights under two names
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), *args]) == 0
    assert "nothing to evaluate" in capsys.readouterr().out
    assert Path(run / "eval" / "metrics.png").exists()
