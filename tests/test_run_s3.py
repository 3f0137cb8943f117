"""Run folders on object storage (moto's S3 server on 127.0.0.1): `amused run` with its
run and data folders on s3://, `amused status` of it, and `amused sample` / `export` /
`fid-stats` / `evaluate --run --watch` on s3:// run folders, checkpoints and models,
each giving what the same command gives on a local copy."""

import json
from pathlib import Path

import numpy as np
import pytest
import s3fs
from safetensors.numpy import load_file

from amused.demo.datasets import write_shape_shards
from amused.orchestration.cli import main
from amused.orchestration.run import run
from amused.orchestration.run_config import parse_run_config
from amused.tokenizer.inception import write_random_inception
from tests.samples import demo_config

PROMPTS = ["a red circle on a grey background", "a blue square", "a green triangle"]
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


def _sample_and_export_equal_local(fs, checkpoint_url: str, local_checkpoint: str, tmp_path: Path,
                                   models: list[str]) -> None:
    """`amused sample` and `amused export` of an s3:// checkpoint (their outputs on s3:// too)
    give the bytes the same commands give for the local copy."""
    for where, ckpt in (("s3", checkpoint_url), ("local", local_checkpoint)):
        out = f"{checkpoint_url}-out" if where == "s3" else str(tmp_path / "out")
        assert main(["sample", "--checkpoint", ckpt, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "3",
                     "--seed", "5", "--output", f"{out}/grid.png", *models]) == 0
        assert main(["export", "--checkpoint", ckpt, "--output", f"{out}/pipe", *models]) == 0
    local = tmp_path / "out"
    assert fs.cat_file(f"{checkpoint_url}-out/grid.png") == (local / "grid.png").read_bytes()
    fs.get_file(f"{checkpoint_url}-out/pipe/{TRANSFORMER}", str(tmp_path / "s3.safetensors"))
    ours, theirs = load_file(str(tmp_path / "s3.safetensors")), load_file(str(local / "pipe" / TRANSFORMER))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    source = json.loads(fs.cat_file(f"{checkpoint_url}-out/pipe/amused_export.json"))
    assert f"{source['run']}/{source['checkpoint']}" == checkpoint_url  # the run's URL, the checkpoint within it


def test_sample_export_and_evaluate_on_an_s3_run_folder(s3_bucket, tiny_models, trained_checkpoint, ray_session,
                                                        tmp_path, capfd):
    fs = s3fs.S3FileSystem()
    local_run = Path(trained_checkpoint).parent.parent
    run_url, models_url = f"{s3_bucket}/copied-run", f"{s3_bucket}/tiny-models"
    fs.put(str(local_run), run_url, recursive=True)
    fs.put(str(tiny_models), models_url, recursive=True)
    checkpoint = f"{run_url}/checkpoints/{Path(trained_checkpoint).name}"
    models = ["--vqgan", f"{models_url}/vqgan", "--text-encoder", models_url]
    _sample_and_export_equal_local(fs, checkpoint, trained_checkpoint, tmp_path, models)

    # FID reference statistics from images on S3, written to S3; the run evaluated where it lies.
    write_shape_shards(str(tmp_path / "real"), shards=1, per_shard=6, min_size=48, max_size=96)
    write_random_inception(tmp_path / "inception.pth")
    fs.put(str(tmp_path / "real"), f"{s3_bucket}/real", recursive=True)
    fs.put_file(str(tmp_path / "inception.pth"), f"{s3_bucket}/inception.pth")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    fs.put_file(str(tmp_path / "prompts.txt"), f"{s3_bucket}/prompts.txt")
    inception, reference = f"{s3_bucket}/inception.pth", f"{run_url}/eval/reference.npz"
    assert main(["fid-stats", "--images", f"{s3_bucket}/real", "--output", reference, "--inception", inception,
                 "--resolution", "64"]) == 0
    capfd.readouterr()
    # --watch: the run has finished training (its result.json is there), so it evaluates what is left and ends.
    assert main(["evaluate", "--run", run_url, "--watch", "--poll", "0.5", "--timeout", "300",
                 "--prompts", f"{s3_bucket}/prompts.txt", "--reference", reference, "--inception", inception,
                 *models, "--steps", "3", "--grid", "2"]) == 0
    err = capfd.readouterr().err
    assert "generate step_00000004" in err and "3/3" in err  # the generation bar, images of the total
    step = Path(trained_checkpoint).name
    result = json.loads(fs.cat_file(f"{run_url}/eval/{step}.json"))
    assert result["step"] == 4 and result["images"] == 3 and result["checkpoint"] == checkpoint
    assert np.isfinite(result["fid"])
    assert fs.isfile(f"{run_url}/eval/{step}.png") and fs.isfile(f"{run_url}/eval/metrics.png")
    assert not (local_run / "eval").exists()  # nothing written beside the local original


def _s3_run_config(run_dir: str) -> dict:
    """The scaled-down demo, smaller still: the tiny VQ-GAN (no vqgan stage), a 2-step U-ViT,
    evaluation left to the CLI above."""
    cfg = demo_config(run_dir)
    cfg["models"]["vqgan"] = "tiny"
    del cfg["vqgan"], cfg["evaluate"]
    cfg["pretokenize"]["resolution"] = 64
    cfg["train"].update(steps=2, model={"preset": "tiny"})
    cfg["train"]["checkpoint"] = {"every": 2, "keep": 1}
    cfg["train"]["log"] = {"every": 2, "progress": False}
    cfg["sample"]["steps"] = 3
    return cfg


DATA_STAGES = ["source", "models", "filter", "download"]


def test_amused_run_on_s3_data_stages_status_and_rerun(s3_bucket, ray_session, capsys):
    """The default suite's share of the run graph on S3 (the whole graph: below, slow): the
    stage states, the tiny models (uploaded), the demo's site served from S3 and the image
    shards written there; `amused status` of the s3:// folder; a rerun skips it all."""
    fs = s3fs.S3FileSystem()
    run_url = f"{s3_bucket}/data-run"
    cfg = _s3_run_config(run_url)
    states = run(parse_run_config(cfg), only=DATA_STAGES, log=print)
    assert sorted(states) == sorted(DATA_STAGES) and all(s["status"] == "done" for s in states.values())
    assert states["download"]["counts"]["downloaded"] == 96
    for name in ("config.yaml", "stages/download.json", "models/vqgan/config.json", "models/inception.pth",
                 "models/tokenizer/tokenizer_config.json", "models/clip/config.json", "data/source/www/00000/0.jpg",
                 "data/images/00000.tar"):
        assert fs.isfile(f"{run_url}/{name}"), name
    assert not Path("s3:").exists() and not Path("amused-test").exists()  # no path-mangled URL on the local disk
    capsys.readouterr()
    assert main(["status", run_url]) == 0
    shown = capsys.readouterr().out
    assert "download" in shown and "2 shards" in shown and "pending" in shown  # train: not yet run
    # A copy of the run agrees with it; one changed image shard is found in its stage.
    copy = f"{s3_bucket}/data-run-copy"
    fs.copy(run_url, copy, recursive=True)
    assert main(["compare", run_url, copy]) == 0
    assert "the two runs agree" in capsys.readouterr().out
    fs.pipe_file(f"{copy}/data/images/00001.tar", fs.cat_file(f"{copy}/data/images/00001.tar")[:-1])
    assert main(["compare", run_url, copy]) == 1
    assert "first stage that differs: download" in capsys.readouterr().out
    log: list[str] = []
    run(parse_run_config(cfg), only=DATA_STAGES, log=log.append)
    assert sum("skipped" in line for line in log) == len(DATA_STAGES)


@pytest.mark.slow
def test_amused_run_on_s3_reaches_the_samples_and_status_reads_it(s3_bucket, ray_session, tmp_path, capsys):
    fs = s3fs.S3FileSystem()
    run_url = f"{s3_bucket}/run"
    cfg = _s3_run_config(run_url)
    states = run(parse_run_config(cfg), log=print)
    assert all(s["status"] == "done" for s in states.values()) and "samples" in states
    assert states["pretokenize"]["counts"]["tokenized"] == 96
    for name in ("stages/train.json", "train/checkpoints/step_00000002/COMPLETE", "samples/grid.png"):
        assert fs.isfile(f"{run_url}/{name}"), name
    assert json.loads(fs.cat_file(f"{run_url}/samples/result.json"))["prompt_following"]["samples"] == 8
    capsys.readouterr()
    assert main(["status", run_url]) == 0
    shown = capsys.readouterr().out
    assert "samples" in shown and "step 2/2" in shown and "pending" not in shown
    log: list[str] = []
    run(parse_run_config(cfg), log=log.append)
    assert sum("skipped" in line for line in log) == len(states), log

    checkpoint = states["train"]["counts"]["checkpoint"]
    assert checkpoint.startswith(f"{run_url}/train/checkpoints/")
    local = tmp_path / "copy" / Path(checkpoint).name
    local.parent.mkdir()
    fs.get(checkpoint, str(local), recursive=True)
    # The local copy's config names the models on S3, as the original does.
    models = ["--vqgan", f"{run_url}/models/vqgan", "--text-encoder", f"{run_url}/models"]
    _sample_and_export_equal_local(fs, checkpoint, str(local), tmp_path, models)


@pytest.mark.slow
def test_the_whole_demo_graph_on_s3(s3_bucket, ray_session):
    """Every stage on S3: the VQ-GAN trained and exported there, the evaluation watcher
    and the evaluate stage writing the run's results (and FID reference) there."""
    fs = s3fs.S3FileSystem()
    run_url = f"{s3_bucket}/whole-demo"
    cfg = demo_config(run_url)
    cfg["evaluate"]["watch"] = True
    states = run(parse_run_config(cfg), log=print)
    assert all(s["status"] == "done" for s in states.values()) and len(states) == 9
    assert fs.isfile(f"{run_url}/vqgan/export/config.json")
    assert fs.isfile(f"{run_url}/eval/reference.npz") and fs.isfile(f"{run_url}/eval/metrics.png")
    assert sorted(p.rpartition("/")[2] for p in fs.glob(f"{run_url}/eval/step_*.json")) == [
        "step_00000003.json", "step_00000006.json"]
    assert states["evaluate"]["counts"]["evaluated"] == 2
