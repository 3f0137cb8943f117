"""`amused export`: a checkpoint as an AmusedPipeline folder, and back into training."""

import json

import numpy as np
import pytest
import s3fs
import torch
from diffusers import AmusedPipeline

from amused.demo.datasets import write_token_dataset
from amused.orchestration.cli import main
from amused.training.checkpoint import Checkpoint
from amused.training.config import SampleConfig, parse_config
from amused.training.inference.sample import Sampler, load_trained_model
from amused.training.uvit.model import build_model
from amused.training.uvit.task import train

PROMPTS = ["a red circle on a grey background", "a blue square"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_models, trained_checkpoint):
    out = tmp_path_factory.mktemp("export") / "pipe"
    assert main(["export", "--checkpoint", trained_checkpoint, "--output", str(out),
                 "--vqgan", str(tiny_models / "vqgan"), "--text-encoder", str(tiny_models)]) == 0
    return out


def test_exported_folder_opens_in_amused_pipeline_and_gives_amused_sample_images(exported, tiny_models,
                                                                                  trained_checkpoint):
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md", "amused_export.json", "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer",
        "vqvae"]
    assert json.loads((exported / "model_index.json").read_text())["_class_name"] == "AmusedPipeline"
    assert not list(exported.rglob("*.bin")) and list(exported.rglob("*.safetensors"))  # safetensors only
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no staging left behind

    pipe = AmusedPipeline.from_pretrained(exported)
    theirs = np.stack([np.asarray(im) for im in pipe(PROMPTS, num_inference_steps=6, guidance_scale=8.0,
                                                     generator=torch.Generator().manual_seed(3)).images])
    sampler = Sampler.from_folders(load_trained_model(trained_checkpoint), str(tiny_models / "vqgan"), str(tiny_models))
    ours = sampler.decode(sampler.generate(PROMPTS, SampleConfig(steps=6, guidance_scale=8.0),
                                           torch.Generator().manual_seed(3)))
    assert theirs.shape == ours.shape == (2, 64, 64, 3)
    assert np.array_equal(theirs, ours)
    # the EMA weights went out, not the raw ones
    raw = load_trained_model(trained_checkpoint, ema=False).state_dict()
    assert any(not torch.equal(v, raw[k]) for k, v in pipe.transformer.state_dict().items())

    # our loaders read it as a whole-pipeline folder, as they read the released aMUSEd folders
    again = Sampler.from_folders(load_trained_model(trained_checkpoint), str(exported), str(exported))
    assert np.array_equal(again.decode(again.generate(PROMPTS, SampleConfig(steps=6, guidance_scale=8.0),
                                                      torch.Generator().manual_seed(3))), ours)
    models = ["--vqgan", str(tiny_models / "vqgan"), "--text-encoder", str(tiny_models)]
    before = {p: p.stat().st_mtime_ns for p in exported.rglob("*")}
    assert main(["export", "--checkpoint", trained_checkpoint, "--output", str(exported), *models]) == 0  # a rerun
    assert {p: p.stat().st_mtime_ns for p in exported.rglob("*")} == before  # found done, nothing rewritten
    assert main(["export", "--checkpoint", trained_checkpoint, "--output", str(exported), "--no-ema", *models]) == 1


def test_training_starts_from_an_exported_folder(exported, tmp_path, trained_checkpoint):
    start = build_model("tiny", str(exported))
    ema = Checkpoint.at(trained_checkpoint).state_dict(ema=True)
    assert all(torch.equal(v, ema[k]) for k, v in start.state_dict().items())
    write_token_dataset(str(tmp_path / "tokens"), [16])
    result = train(parse_config({
        "run_dir": str(tmp_path / "run"), "steps": 1,
        "data": {"dataset": str(tmp_path / "tokens"), "global_batch_size": 8, "micro_batch_size": 8, "workers": 0},
        "model": {"preset": "tiny", "pretrained": str(exported)}, "optim": {"lr": 1e-7, "warmup_steps": 0},
        "checkpoint": {"every": 1}, "log": {"every": 1, "progress": False}}))
    after = load_trained_model(result.checkpoint, ema=False).state_dict()
    # one Adam step moves a weight by at most ~lr: training went on from the exported weights
    assert max((v - ema[k]).abs().max().item() for k, v in after.items()) < 1e-5
    fresh = build_model("tiny").state_dict()
    assert max((v - ema[k]).abs().max().item() for k, v in fresh.items()) > 1e-2


def test_export_to_s3(s3_bucket, tiny_models, trained_checkpoint):
    url = f"{s3_bucket}/exports/pipe"
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{url}/transformer/leftover.safetensors", b"an earlier attempt, cut before its model_index.json")
    assert main(["export", "--checkpoint", trained_checkpoint, "--output", url,
                 "--vqgan", str(tiny_models / "vqgan"), "--text-encoder", str(tiny_models)]) == 0
    assert fs.exists(f"{url}/model_index.json") and fs.exists(f"{url}/transformer/config.json")
    assert not fs.exists(f"{url}/transformer/leftover.safetensors")  # the folder replaced whole
    weights = Sampler.from_folders(load_trained_model(trained_checkpoint), url, url)
    assert weights.side == 64
