"""LoRA on the inference side: adapters exported in diffusers' layout, sampled on a base
(`amused sample --pretrained BASE --lora DIR`), token-equal to diffusers with the same
adapters loaded, merged into a whole pipeline, and the refusals (pinned: diffusers 0.42.1)."""

import json
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
from diffusers import AmusedPipeline, AmusedScheduler, VQModel
from diffusers.loaders import AmusedLoraLoaderMixin
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from amused.demo.datasets import write_token_dataset
from amused.orchestration.cli import main
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.text import TextEncoder
from amused.training.config import LoraConfig, SampleConfig, parse_config
from amused.training.inference.export import merge_adapters, write_adapters
from amused.training.inference.sample import (
    Sampler,
    load_exported_adapters,
    load_pretrained_model,
    load_trained_model,
)
from amused.training.lora import adapter_state_dict, apply_lora, has_adapters
from amused.training.uvit.model import build_model
from amused.training.uvit.task import train

PROMPTS = ["a red circle on a grey background", "a blue square"]
CFG = SampleConfig(steps=4, guidance_scale=8.0)
RANK, ALPHA = 4, 12.0  # alpha != rank: a reader that dropped alpha would scale by 1, not 3


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_models) -> Path:
    """The tiny models as an aMUSEd pipeline folder: what --pretrained and AmusedPipeline open."""
    folder = tmp_path_factory.mktemp("base") / "pipe"
    transformer = build_model("tiny", str(tiny_models))
    AmusedPipeline(vqvae=VQModel.from_pretrained(tiny_models / "vqgan"),
                   tokenizer=CLIPTokenizer.from_pretrained(tiny_models / "tokenizer"),
                   text_encoder=CLIPTextModelWithProjection.from_pretrained(tiny_models / "text_encoder"),
                   transformer=transformer,
                   scheduler=AmusedScheduler(mask_token_id=transformer.config.vocab_size - 1)
                   ).save_pretrained(folder, safe_serialization=True)
    return folder


def with_adapters(model, seed: int = 0):
    """`model` with random adapters strong enough to change its tokens (trained ones start at B = 0)."""
    apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, base) -> Path:
    folder = tmp_path_factory.mktemp("lora") / "adapters"
    folder.mkdir()
    write_adapters(with_adapters(load_pretrained_model(str(base))), folder)
    return folder


@pytest.fixture(scope="module")
def encoders(base) -> tuple[ImageTokenizer, TextEncoder]:
    """The base folder's VQ-GAN and CLIP, loaded once for the module's samplers."""
    return ImageTokenizer.from_pretrained(str(base), device="cpu"), TextEncoder.from_pretrained(str(base), device="cpu")


def tokens(model, encoders, scale: float = 1.0, seed: int = 5) -> torch.Tensor:
    sampler = Sampler(model, *encoders, lora_scale=scale)
    return sampler.generate(PROMPTS, CFG, torch.Generator().manual_seed(seed))


def diffusers_with_lora(base, lora_dir) -> AmusedPipeline:
    """The base pipeline with the adapters loaded the way diffusers' aMUSEd LoRA loader does
    (its train_amused.py): AmusedPipeline 0.42.1 has no load_lora_weights of its own, and the
    mixin's load_lora_weights looks for a `unet`."""
    assert not hasattr(AmusedPipeline, "load_lora_weights")
    pipe = AmusedPipeline.from_pretrained(base)
    state, alphas, metadata = AmusedLoraLoaderMixin.lora_state_dict(str(lora_dir), return_lora_metadata=True)
    AmusedLoraLoaderMixin.load_lora_into_transformer(state, alphas, pipe.transformer, metadata=metadata)
    return pipe


def logits(model) -> torch.Tensor:
    """One forward of `model` on fixed inputs: a cheap fingerprint of what it computes."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randint(0, 65, (2, 8, 8), generator=gen), torch.randn(2, 77, 32, generator=gen),
                     torch.randn(2, 32, generator=gen), torch.tensor([[64.0, 64, 0, 0, 6]] * 2))


@pytest.fixture(scope="module")
def plain(base, encoders) -> torch.Tensor:
    """The base's own tokens for PROMPTS at the tests' seed."""
    return tokens(load_pretrained_model(str(base)), encoders)


def grid_cells(png: Path, n: int) -> list[np.ndarray]:
    grid = Image.open(png)
    return [np.asarray(grid.crop((i * 128, 0, i * 128 + 128, 128)).resize((64, 64), Image.Resampling.NEAREST))
            for i in range(n)]


def test_exported_adapters_are_in_diffusers_layout_with_alpha(lora_dir):
    assert sorted(p.name for p in lora_dir.iterdir()) == ["pytorch_lora_weights.safetensors"]
    with safe_open(lora_dir / "pytorch_lora_weights.safetensors", "pt") as fh:
        keys, header = list(fh.keys()), fh.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k)
                        for k in keys)
    assert "transformer.transformer_layers.0.attn1.to_q.lora_A.weight" in keys
    meta = json.loads(header["lora_adapter_metadata"])
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (RANK, ALPHA)
    assert sorted(meta["transformer.target_modules"]) == sorted(LoraConfig().target_modules)


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_diffusers_with_the_exported_lora_gives_amused_sample_tokens(tmp_path, base, lora_dir, encoders, plain,
                                                                    scale):
    pipe = diffusers_with_lora(base, lora_dir)
    layer = pipe.transformer.transformer_layers[0].attn1.to_q
    assert layer.scaling[next(iter(pipe.transformer.peft_config))] == ALPHA / RANK  # alpha kept
    want = pipe(PROMPTS, num_inference_steps=CFG.steps, guidance_scale=CFG.guidance_scale, output_type="latent",
                generator=torch.Generator().manual_seed(5), cross_attention_kwargs={"scale": scale}).images

    got = tokens(load_exported_adapters(load_pretrained_model(str(base)), str(lora_dir)), encoders, scale)
    assert torch.equal(got, want)
    assert (got != plain).float().mean() > 0.2  # the adapters matter, so the equality is not the base's
    if scale == 1.0:
        return
    png = tmp_path / "grid.png"
    assert main(["sample", "--pretrained", str(base), "--lora", str(lora_dir), "--lora-scale", str(scale),
                 "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--output", str(png), "--seed", "5",
                 "--steps", str(CFG.steps), "--guidance-scale", str(CFG.guidance_scale)]) == 0
    images = Sampler(pipe.transformer, *encoders).decode(want)
    assert all(np.array_equal(cell, images[i]) for i, cell in enumerate(grid_cells(png, 2)))


def test_scale_zero_is_exactly_the_base(base, lora_dir, encoders, plain):
    adapted = load_exported_adapters(load_pretrained_model(str(base)), str(lora_dir))
    assert torch.equal(tokens(adapted, encoders, 0.0), plain)  # the adapters' effect at 1: the test above


def test_merged_adapters_sample_as_the_unmerged_ones(base, lora_dir, encoders, plain):
    adapted = load_exported_adapters(load_pretrained_model(str(base)), str(lora_dir))
    unmerged, before = tokens(adapted, encoders), logits(adapted)
    merged = merge_adapters(adapted)
    assert not has_adapters(merged)
    assert set(merged.state_dict()) == set(load_pretrained_model(str(base)).state_dict())  # a plain U-ViT
    gap = (logits(merged) - before).abs().max().item()
    assert gap < 1e-3, gap  # (W + s·BA)x against Wx + s·B(Ax): float rounding only
    assert torch.equal(tokens(merged, encoders), unmerged) and not torch.equal(unmerged, plain)


def test_adapters_that_do_not_fit_are_refused(tmp_path, base, lora_dir):
    model = load_pretrained_model(str(base))
    with pytest.raises(ValueError, match="holds no LoRA adapters"):
        load_exported_adapters(model, str(base))
    weights = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    with safe_open(lora_dir / "pytorch_lora_weights.safetensors", "pt") as fh:
        header = fh.metadata()
    for name, change, why in [
        ("wide", lambda w: w | {"transformer.transformer_layers.0.attn1.to_q.lora_A.weight": torch.zeros(RANK, 48)},
         "another base model"),
        ("foreign", lambda w: w | {"transformer.no_such_block.to_q.lora_A.weight": torch.zeros(RANK, 32)},
         "which the base model lacks"),
        ("text", lambda w: w | {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                                torch.zeros(RANK, 32)}, "besides the U-ViT"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        save_file(change(weights), folder / "pytorch_lora_weights.safetensors", metadata=header)
        with pytest.raises(ValueError, match=why):
            load_exported_adapters(load_pretrained_model(str(base)), str(folder))
    assert not has_adapters(model)


def test_sample_and_export_refusals_are_one_line(capsys, tmp_path, base, lora_dir):
    out = str(tmp_path / "x.png")
    for argv, why in [
        (["--pretrained", str(base), "--lora-scale", "0.5"], "--lora-scale weighs adapters"),
        (["--pretrained", str(base), "--no-ema"], "--no-ema"),
        (["--pretrained", str(base), "--lora", str(base)], "holds no LoRA adapters"),
    ]:
        assert main(["sample", *argv, "--prompt", "x", "--output", out, "--steps", "2"]) == 1
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", "c", "--output", "o", "--lora", "--merge-lora"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", "c", "--pretrained", str(base), "--prompt", "x", "--output", out])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, base) -> str:
    """A LoRA run's checkpoint on the base after 3 steps (its EMA adapters differ from the raw ones)."""
    root = tmp_path_factory.mktemp("lora-run")
    write_token_dataset(str(root / "tokens"), [32])
    return train(parse_config({
        "run_dir": str(root / "run"), "steps": 3,
        "data": {"dataset": str(root / "tokens"), "global_batch_size": 8, "micro_batch_size": 8, "workers": 0},
        "model": {"preset": "tiny", "pretrained": str(base)},
        "lora": {"enabled": True, "rank": RANK, "alpha": ALPHA},
        "optim": {"lr": 5e-2, "warmup_steps": 1}, "ema": {"decay": 0.5},
        "checkpoint": {"every": 3}, "log": {"every": 3, "progress": False}})).checkpoint


def test_export_lora_of_a_checkpoint_computes_as_the_checkpoint(tmp_path, base, lora_checkpoint):
    trained = load_trained_model(lora_checkpoint)
    assert has_adapters(trained)
    raw = adapter_state_dict(load_trained_model(lora_checkpoint, ema=False))
    ema = adapter_state_dict(trained)
    assert any(not torch.equal(v, raw[k]) for k, v in ema.items())

    out = tmp_path / "adapters"
    assert main(["export", "--lora", "--checkpoint", lora_checkpoint, "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["amused_export.json", "pytorch_lora_weights.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    written = load_file(out / "pytorch_lora_weights.safetensors")
    assert written.keys() == {f"transformer.{k}" for k in ema}
    assert all(torch.equal(written[f"transformer.{k}"], v) for k, v in ema.items())  # the EMA ones by default
    assert json.loads((out / "amused_export.json").read_text())["alpha"] == ALPHA

    # the exported adapters on the base compute what the checkpoint itself does, bit for bit
    assert torch.equal(logits(load_exported_adapters(load_pretrained_model(str(base)), str(out))), logits(trained))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["export", "--lora", "--checkpoint", lora_checkpoint, "--output", str(out)]) == 0  # a rerun
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert main(["export", "--lora", "--no-ema", "--checkpoint", lora_checkpoint, "--output", str(out)]) == 1
    raw_out = tmp_path / "raw"
    assert main(["export", "--lora", "--no-ema", "--checkpoint", lora_checkpoint, "--output", str(raw_out)]) == 0
    assert all(torch.equal(load_file(raw_out / "pytorch_lora_weights.safetensors")[f"transformer.{k}"], v)
               for k, v in raw.items())


def test_merge_lora_export_opens_as_a_plain_pipeline(tmp_path, base, lora_checkpoint):
    out = tmp_path / "merged"
    models = ["--vqgan", str(base), "--text-encoder", str(base)]
    assert main(["export", "--merge-lora", "--checkpoint", lora_checkpoint, "--output", str(out), *models]) == 0
    pipe = AmusedPipeline.from_pretrained(out)
    merged = build_model("tiny", str(out))  # what model.pretrained reads
    assert not has_adapters(pipe.transformer) and set(merged.state_dict()) == set(pipe.transformer.state_dict())
    base_weights = load_pretrained_model(str(base)).state_dict()
    assert any(not torch.equal(v, base_weights[k]) for k, v in merged.state_dict().items())  # adapters went in
    gap = (logits(merged) - logits(load_trained_model(lora_checkpoint))).abs().max().item()
    assert gap < 1e-4, gap  # merged: float rounding only (the token equality is test_merged_adapters_...)


def test_lora_checkpoint_refusals(capsys, tmp_path, base, lora_dir, lora_checkpoint, trained_checkpoint):
    out = str(tmp_path / "out")
    models = ["--vqgan", str(base), "--text-encoder", str(base)]
    for argv, why in [
        (["export", "--checkpoint", lora_checkpoint, "--output", out, *models], "is a LoRA checkpoint"),
        (["export", "--lora", "--checkpoint", trained_checkpoint, "--output", out], "not a LoRA checkpoint"),
        (["export", "--merge-lora", "--checkpoint", trained_checkpoint, "--output", out, *models],
         "not a LoRA checkpoint"),
        (["export", "--lora", "--checkpoint", lora_checkpoint, "--output", out, *models], "do not apply to --lora"),
        (["sample", "--checkpoint", lora_checkpoint, "--lora", str(lora_dir), "--prompt", "x", "--output",
          f"{out}.png", *models], "already carries adapters"),
    ]:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1, err
    assert not Path(out).exists()


def test_lora_export_to_s3_and_sample_from_it(s3_bucket, tmp_path, base, lora_checkpoint):
    url = f"{s3_bucket}/exports/adapters"
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{url}/amused_export.json", b"an earlier attempt, cut before its weights")
    assert main(["export", "--lora", "--checkpoint", lora_checkpoint, "--output", url]) == 0
    assert sorted(p.rpartition("/")[2] for p in fs.ls(url)) == ["amused_export.json", "pytorch_lora_weights.safetensors"]
    assert torch.equal(logits(load_exported_adapters(load_pretrained_model(str(base)), url)),
                       logits(load_trained_model(lora_checkpoint)))
    # a LoRA checkpoint samples directly, its adapters at a scale too
    png = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", lora_checkpoint, "--lora-scale", "0.5", "--prompt", "x", "--output",
                 str(png), "--steps", "2", "--vqgan", str(base), "--text-encoder", str(base)]) == 0
    assert Image.open(png).size == (128, 128 + 36)


def test_a_run_without_ema_samples_and_exports_its_raw_adapters(tmp_path, base):
    """A StyleDrop-like run keeps no EMA: the readers' default (EMA) falls back to the only
    weights it has instead of failing on a missing ema.safetensors."""
    write_token_dataset(str(tmp_path / "tokens"), [16])
    checkpoint = train(parse_config({
        "run_dir": str(tmp_path / "run"), "steps": 2,
        "data": {"dataset": str(tmp_path / "tokens"), "global_batch_size": 8, "micro_batch_size": 8, "workers": 0},
        "model": {"preset": "tiny", "pretrained": str(base)}, "lora": {"enabled": True, "rank": RANK, "alpha": ALPHA},
        "optim": {"lr": 5e-2, "warmup_steps": 1}, "ema": {"enabled": False},
        "checkpoint": {"every": 2}, "log": {"every": 2, "progress": False}})).checkpoint
    raw = adapter_state_dict(load_trained_model(checkpoint, ema=False))
    assert adapter_state_dict(load_trained_model(checkpoint)).keys() == raw.keys()
    out = tmp_path / "adapters"
    assert main(["export", "--lora", "--checkpoint", checkpoint, "--output", str(out)]) == 0
    assert json.loads((out / "amused_export.json").read_text())["weights"] == "raw"
    written = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(written[f"transformer.{k}"], v) for k, v in raw.items())
