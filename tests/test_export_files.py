"""What an exported folder holds besides the weights, as the released aMUSEd repositories
have it: the complete tokenizer (slow and fast files), the fp16 variant, a model card, and
a record of its source that names no machine's absolute path."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AmusedPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer, CLIPTokenizerFast

from amused.tokenizer.text import TOKENIZER_FILES, save_tokenizer
from amused.training.checkpoint import Checkpoint
from amused.training.inference.card import CARD, front_matter
from amused.training.inference.export import SOURCE, export_pipeline
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
def fp16_export(tmp_path_factory, tiny_models, run_copy) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "pipe"
    export_pipeline(str(run_copy), str(out), str(tiny_models / "vqgan"), str(tiny_models), variant="fp16")
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
    # without the variant: fp32, the configs name fp32, and our own loader reads the same weights
    plain = AmusedPipeline.from_pretrained(fp16_export)
    assert next(plain.text_encoder.parameters()).dtype == torch.float32
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


def test_source_record_is_relative_to_the_run(fp16_export, run_copy, tiny_models):
    source = json.loads((fp16_export / SOURCE).read_text())
    step = Checkpoint.at(run_copy)
    assert source["checkpoint"] == f"checkpoints/{step.name}" and source["step"] == step.step
    assert source["variant"] == "fp16" and source["weights"] == "ema" and len(source["sha256"]) == 64
    assert "run" not in source  # a local run: no machine's path at all
    assert not any(str(v).startswith("/") for v in source.values())
    run = run_copy.parent.parent
    assert (run / source["vqgan"]).resolve() == (tiny_models / "vqgan").resolve()
    assert (run / source["text_encoder"]).resolve() == tiny_models.resolve()


def test_export_refuses_an_unknown_variant_and_a_quantized_one(tiny_models, run_copy, tmp_path):
    models = (str(tiny_models / "vqgan"), str(tiny_models))
    with pytest.raises(ValueError, match="--variant bf16: not one of"):
        export_pipeline(str(run_copy), str(tmp_path / "a"), *models, variant="bf16")
    with pytest.raises(ValueError, match="a quantized U-ViT has no half-precision copy"):
        export_pipeline(str(run_copy), str(tmp_path / "b"), *models, variant="fp16", quantize="int8")
    assert not list(tmp_path.iterdir())
