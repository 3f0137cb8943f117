"""`amused vqgan train`: config checks, exact resume, export round trip."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import VQModel

from amused.demo.datasets import write_shape_shards
from amused.orchestration.cli import main
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.vq_objective import psnr
from amused.training.evaluation.vqgan import evaluate_vqgan
from amused.training.vqgan.data import held_out_batches
from amused.training.vqgan.task import parse_vqgan_config, train_vqgan, vq_from_checkpoint


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("vq-images")
    write_shape_shards(str(root / "train"), shards=2, per_shard=32, min_size=32, max_size=48, seed=1)
    write_shape_shards(str(root / "held-out"), shards=1, per_shard=16, min_size=32, max_size=48, seed=2)
    return root


def _config(run_dir, images, steps, **over):
    cfg = {"run_dir": str(run_dir), "steps": steps, "seed": 0,
           "data": {"images": str(images / "train"), "resolution": 32, "global_batch_size": 16,
                    "micro_batch_size": 8},
           "model": {"preset": "tiny"}, "optim": {"lr": 2e-3, "warmup_steps": 10, "weight_decay": 0.0},
           "codebook": {"window": 20, "reinit_every": 20},
           "checkpoint": {"every": steps}, "log": {"every": 10, "progress": False}}
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def test_config_errors_name_the_key(tmp_path, images):
    with pytest.raises(ValueError, match="codebook.reinit_every needs engine.zero_stage: 0"):
        parse_vqgan_config(_config(tmp_path, images, 5, engine={"zero_stage": 2}))
    with pytest.raises(ValueError, match="model.preset"):
        parse_vqgan_config(_config(tmp_path, images, 5, model={"preset": "huge"}))


def test_resume_is_exact_and_export_round_trips(tmp_path, images):
    over = {"log": {"every": 1}, "codebook": {"window": 4, "reinit_every": 3}}
    whole = train_vqgan(parse_vqgan_config(_config(tmp_path / "whole", images, 8, **over)))
    part = _config(tmp_path / "part", images, 4, **over)
    train_vqgan(parse_vqgan_config(part))
    resumed = train_vqgan(parse_vqgan_config({**part, "steps": 8, "checkpoint": {"every": 8}}))
    assert resumed.resumed_from == 4

    def losses(run):
        return [(r["step"], r["l1"], r["codebook"]) for r in map(json.loads, (Path(run) / "metrics.jsonl").open())]

    assert losses(tmp_path / "part") == losses(tmp_path / "whole")
    a, b = vq_from_checkpoint(whole.checkpoint).state_dict(), vq_from_checkpoint(resumed.checkpoint).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "exported"
    assert main(["vqgan", "export", "--checkpoint", whole.checkpoint, "--output", str(out)]) == 0
    loaded = VQModel.from_pretrained(out)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ours = ImageTokenizer(vq_from_checkpoint(whole.checkpoint), device="cpu").encode(pixels)
    assert np.array_equal(ImageTokenizer(loaded, device="cpu").encode(pixels), ours)
    assert np.array_equal(ImageTokenizer.from_pretrained(str(out), device="cpu").encode(pixels), ours)


def _mean_colour_psnr(images: str, resolution: int) -> float:
    """PSNR of replacing each held-out image by its own mean colour: what a tokenizer that
    kept nothing but the average colour would score."""
    scores = []
    for batch in held_out_batches(images, resolution, 64):
        x = torch.from_numpy(batch).float().div(255).permute(0, 3, 1, 2)
        scores.append(psnr(x.mean((2, 3), keepdim=True).expand_as(x), x))
    return float(torch.cat(scores).mean())


@pytest.mark.slow
def test_a_few_cpu_minutes_learn_shapes(tmp_path, images):
    """~3 min: the small preset (16x16 tokens of 256 codes at 32 px) trained 450 steps.

    Threshold: the held-out PSNR of each image's own mean colour + 3 dB. Beating the mean
    colour needs the tokens to say where the shape is and what colour it has; +3 dB is
    half the mean squared error of that baseline. Measured: 23.4 dB vs a baseline of
    14.8 dB, 76% of the 256 codes used by the 16 held-out images (176 s)."""
    cfg = _config(tmp_path / "run", images, 450, model={"preset": "small"}, optim={"lr": 3e-4},
                  codebook={"window": 10, "reinit_every": 10}, data={"micro_batch_size": 16},
                  checkpoint={"every": 450}, log={"every": 50, "progress": False})
    result = train_vqgan(parse_vqgan_config(cfg))
    out = tmp_path / "eval"
    assert main(["vqgan", "export", "--checkpoint", result.checkpoint, "--output", str(tmp_path / "vq")]) == 0
    held_out = str(images / "held-out")
    scores = evaluate_vqgan(str(tmp_path / "vq"), held_out, str(out), resolution=32)
    baseline = _mean_colour_psnr(held_out, 32)
    print(f"held-out PSNR {scores['psnr_db']:.2f} dB vs mean-colour {baseline:.2f} dB; "
          f"usage {scores['codebook_usage']:.0%}")
    assert scores["psnr_db"] > baseline + 3.0
    assert scores["codebook_usage"] > 0.5
    assert (out / "reconstructions.png").exists()
