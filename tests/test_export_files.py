"""What an exported folder holds besides the weights, as the released aMUSEd repositories
have it: the complete tokenizer (slow and fast files), the fp16 variant (which decodes in
fp32), a model card that a rerun brings up to date, and a record of its source that names
no machine's absolute path."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AmusedPipeline
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer, CLIPTokenizerFast

from amused.tokenizer.text import TOKENIZER_FILES, save_tokenizer
from amused.training.checkpoint import EMA_WEIGHTS, MARKER, Checkpoint
from amused.training.inference.card import CARD, front_matter
from amused.training.inference.export import SOURCE, _source, export_pipeline
from amused.training.inference.sample import load_pretrained_model, load_trained_model

CAPTIONS = ["a red circle on a white background", "A  BLUE square, on yellow!!", "naïve café über 3.14 #tags",
            "", "two words " * 40]  # the last one longer than the 77 positions
FIGURES = {"fid": 123.456, "clip_score": 7.25, "clip_score_unfloored": 7.25, "images": 8, "fid_reference_images": 8,
           "prompts": "prompts.txt", "seed": 0, "sample": {"steps": 6, "guidance_scale": 4.0, "schedule": "cosine"}}


def ids(tokenizer, captions=CAPTIONS):
    return tokenizer(captions, padding="max_length", truncation=True, max_length=77).input_ids


@pytest.fixture(scope="module")
def run_copy(tmp_path_factory, trained_checkpoint) -> Path:
    """The trained checkpoint in a run folder of its own, with an evaluation of its step
    (the session's run folder is shared: nothing is written into it)."""
    run = tmp_path_factory.mktemp("exportrun") / "run"
    trained = Checkpoint.at(trained_checkpoint)
    shutil.copytree(trained.folder, run / "checkpoints" / trained.name)
    (run / "eval").mkdir()
    (run / "eval" / f"{trained.name}.json").write_text(json.dumps(
        {**FIGURES, "step": trained.step, "weights": "ema", "checkpoint": f"/elsewhere/run/checkpoints/{trained.name}"}))
    return run / "checkpoints" / trained.name


@pytest.fixture(scope="module")
def released_vqgan(tmp_path_factory, tiny_models) -> Path:
    """The tiny VQ-GAN as a released VQ-GAN folder has it: no force_upcast in its config
    (VQModel's default: off), unlike the VQ-GANs this project builds."""
    folder = tmp_path_factory.mktemp("released") / "vqgan"
    shutil.copytree(tiny_models / "vqgan", folder)
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("force_upcast") is True
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory, tiny_models, released_vqgan, run_copy) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "pipe"
    export_pipeline(str(run_copy), str(out), str(released_vqgan), str(tiny_models), variant="fp16")
    return out


def test_tokenizer_folder_is_complete_and_its_slow_files_alone_give_the_same_ids(fp16_export, tiny_models, tmp_path):
    folder = fp16_export / "tokenizer"
    assert sorted(p.name for p in folder.iterdir()) == sorted(TOKENIZER_FILES)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 77
    assert json.loads((folder / "special_tokens_map.json").read_text())["bos_token"] == "<|startoftext|>"
    assert (folder / "merges.txt").read_text().startswith("#version: 0.2\ni n\n")  # 4.x's slow class skips line 1
    # transformers 5 has one CLIP tokenizer class (CLIPTokenizerFast is the same class): it builds from the
    # slow files (vocab.json + merges.txt) when tokenizer.json is absent, which shows they hold the same BPE.
    # The real slow class of transformers 4.x reads this folder in tests/test_export_old_stack.py (slow).
    slow_only = tmp_path / "slow"
    slow_only.mkdir()
    for name in set(TOKENIZER_FILES) - {"tokenizer.json"}:
        shutil.copy(folder / name, slow_only / name)
    reference = ids(CLIPTokenizer.from_pretrained(tiny_models / "tokenizer"))
    assert ids(CLIPTokenizer.from_pretrained(slow_only)) == reference
    assert ids(CLIPTokenizerFast.from_pretrained(folder)) == reference
    assert len({tuple(r) for r in reference}) == len(CAPTIONS)  # the captions give distinct ids: a real comparison
    # merges as "a b" strings: tokenizers < 0.20 (transformers 4.36) cannot read the pair form
    assert all(isinstance(m, str) for m in json.loads((folder / "tokenizer.json").read_text())["model"]["merges"])
    # and the tiny models' own tokenizer (the text encoder folder a run names) is as complete
    assert sorted(p.name for p in (tiny_models / "tokenizer").iterdir()) == sorted(TOKENIZER_FILES)


def test_slow_files_are_derived_from_a_folder_that_holds_only_tokenizer_json(tiny_models, tmp_path):
    fast_only = tmp_path / "fast"
    fast_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # what transformers 5's save_pretrained writes
        shutil.copy(tiny_models / "tokenizer" / name, fast_only / name)
    out = save_tokenizer(CLIPTokenizer.from_pretrained(fast_only), tmp_path / "complete")
    slow_only = tmp_path / "slow"
    slow_only.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(out / name, slow_only / name)
    assert ids(CLIPTokenizer.from_pretrained(slow_only)) == ids(CLIPTokenizer.from_pretrained(tiny_models / "tokenizer"))


def test_fp16_variant_loads_in_diffusers_beside_the_fp32_files(fp16_export, run_copy):
    for model, weights in (("transformer", "diffusion_pytorch_model"), ("vqvae", "diffusion_pytorch_model"),
                           ("text_encoder", "model")):
        assert (fp16_export / model / f"{weights}.fp16.safetensors").is_file(), model
        assert (fp16_export / model / f"{weights}.safetensors").is_file(), model  # fp32 kept, as released repos
    half = load_file(str(fp16_export / "transformer" / "diffusion_pytorch_model.fp16.safetensors"))
    assert {t.dtype for t in half.values()} == {torch.float16}

    pipe = AmusedPipeline.from_pretrained(fp16_export, variant="fp16", torch_dtype=torch.float16)
    assert {next(getattr(pipe, m).parameters()).dtype for m in ("transformer", "vqvae", "text_encoder")} == {
        torch.float16}
    ema = load_trained_model(str(run_copy)).state_dict()
    assert all(torch.equal(v, ema[k].half()) for k, v in pipe.transformer.state_dict().items())
    # The VQ-GAN decodes in fp32 (the aMUSEd VQ-GAN overflows in fp16): the exported config asks
    # diffusers to, though the released-style VQ-GAN folder exported from does not.
    assert pipe.vqvae.config.force_upcast is True
    images = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0
    assert next(pipe.vqvae.parameters()).dtype == torch.float16  # upcast for the decoding only
    # without the variant: fp32, the configs name fp32, and our own loader reads the same weights
    plain = AmusedPipeline.from_pretrained(fp16_export)
    assert next(plain.text_encoder.parameters()).dtype == torch.float32 and plain.vqvae.config.force_upcast is True
    fp32 = load_file(str(fp16_export / "vqvae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, plain.vqvae.state_dict()[k]) for k, v in fp32.items())
    ours = load_pretrained_model(str(fp16_export)).state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in ours.items())


def test_model_card_names_the_step_data_and_evaluation(fp16_export, run_copy):
    card = (fp16_export / CARD).read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "openrail++" and "amused" in meta["tags"] and "base_model" not in meta  # from scratch
    step = Checkpoint.at(run_copy).step
    assert f"checkpoints/step_{step:08d}`, step {step} of {step}, EMA weights" in card
    assert f"## Evaluation (step {step})" in card and "FID 123.456 (8 images vs 8 reference)" in card
    assert "CLIP score 7.25" in card
    assert "64x64 pixels (8x8 tokens)" in card  # the tiny VQ-GAN's 8x downsampling of the tiny U-ViT's grid
    assert "the token dataset `" in card and "64 images in 1 shards" in card  # trained_checkpoint's dataset
    assert 'variant="fp16", torch_dtype=torch.float16' in card


def test_source_record_is_relative_to_the_run(fp16_export, run_copy, tiny_models, released_vqgan):
    source = json.loads((fp16_export / SOURCE).read_text())
    step = Checkpoint.at(run_copy)
    assert source["checkpoint"] == f"checkpoints/{step.name}" and source["step"] == step.step
    assert source["variant"] == "fp16" and source["weights"] == "ema" and len(source["sha256"]) == 64
    assert "run" not in source  # a local run: no machine's path at all
    assert not any(str(v).startswith("/") for v in source.values())
    run = run_copy.parent.parent
    assert (run / source["vqgan"]).resolve() == released_vqgan.resolve()
    card = (fp16_export / CARD).read_text()
    assert source["license"] == "openrail++" and source["base_model"] is None
    assert source["card_sha256"] == hashlib.sha256(card.encode()).hexdigest()
    assert (run / source["text_encoder"]).resolve() == tiny_models.resolve()


def test_export_refuses_an_unknown_variant_and_a_quantized_one(tiny_models, run_copy, tmp_path):
    models = (str(tiny_models / "vqgan"), str(tiny_models))
    with pytest.raises(ValueError, match="--variant bf16: not one of"):
        export_pipeline(str(run_copy), str(tmp_path / "a"), *models, variant="bf16")
    with pytest.raises(ValueError, match="a quantized U-ViT has no half-precision copy"):
        export_pipeline(str(run_copy), str(tmp_path / "b"), *models, variant="fp16", quantize="int8")
    assert not list(tmp_path.iterdir())


def test_a_rerun_with_another_license_or_a_new_evaluation_rewrites_the_card_alone(fp16_export, run_copy,
                                                                                 released_vqgan, tiny_models, tmp_path):
    out = tmp_path / "pipe"  # the same name as fp16_export's: the same card but for what changes
    shutil.copytree(fp16_export, out)
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    names = sorted(p.name for p in out.iterdir())

    def export(**card) -> tuple[str, dict]:
        export_pipeline(str(run_copy), str(out), str(released_vqgan), str(tiny_models), variant="fp16", **card)
        return (out / CARD).read_text(), json.loads((out / SOURCE).read_text())

    card, record = export()  # the same export: nothing changes
    assert card == (fp16_export / CARD).read_text() and record == json.loads((fp16_export / SOURCE).read_text())
    card, record = export(license="apache-2.0", base_model="amused/amused-256")
    assert front_matter(card)["license"] == "apache-2.0" and front_matter(card)["base_model"] == "amused/amused-256"
    assert (record["license"], record["base_model"]) == ("apache-2.0", "amused/amused-256")
    assert record["card_sha256"] == hashlib.sha256(card.encode()).hexdigest()
    evaluation = run_copy.parent.parent / "eval" / f"{run_copy.name}.json"
    saved = evaluation.read_text()
    try:  # an evaluation that lands after the export (here: a new result of that step)
        evaluation.write_text(json.dumps(json.loads(saved) | {"fid": 99.5}))
        card, _ = export(license="apache-2.0", base_model="amused/amused-256")
    finally:
        evaluation.write_text(saved)
    assert "FID 99.500" in card and "FID 123.456" not in card and front_matter(card)["license"] == "apache-2.0"
    assert weights.stat().st_mtime_ns == written and sorted(p.name for p in out.iterdir()) == names  # no leftovers
    with pytest.raises(FileExistsError, match="already holds another export"):  # other weights: refused as before
        export_pipeline(str(run_copy), str(out), str(released_vqgan), str(tiny_models), license="apache-2.0")


def test_a_checkpoint_without_checksums_is_told_apart_by_its_weights(run_copy, tmp_path):
    """Two runs' checkpoints/step_N from before checksums: the export hashes the weights, so
    a rerun into the other's export folder is refused instead of keeping its weights."""
    marker = json.loads((run_copy / MARKER).read_text())
    recorded = marker["files"][EMA_WEIGHTS]["sha256"]
    twin = tmp_path / "run" / "checkpoints" / run_copy.name
    shutil.copytree(run_copy, twin)
    (twin / MARKER).write_text(json.dumps({"step": marker["step"]}))  # a marker that predates checksums
    assert _source(Checkpoint.at(twin), ema=True)["sha256"] == recorded  # the same bytes, the same hash
    weights = load_file(str(twin / EMA_WEIGHTS))
    first = sorted(weights)[0]
    save_file(weights | {first: weights[first] + 1}, str(twin / EMA_WEIGHTS))
    assert _source(Checkpoint.at(twin), ema=True)["sha256"] not in (recorded, None)
