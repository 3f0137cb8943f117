"""StyleDrop (orchestration/styledrop.py, pipeline/style_data.py, demo/styles.py): the
single-image dataset, the LoRA flow end to end with a resume, the style classifier, and (slow)
the learning proof on the demo's trained model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amused.demo.shapes import COLOURS, SHAPES, shape_image
from amused.demo.styles import is_outline, outline_image, shows_style
from amused.orchestration.cli import main
from amused.orchestration.styledrop import finetune_style, read_feedback, style_proof, write_feedback
from amused.pipeline.shards import TokenDataset, read_manifest
from amused.pipeline.style_data import build_style_dataset, fill_template
from amused.plumbing.config import from_mapping, read_yaml
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.text import TextEncoder
from amused.training.config import SampleConfig
from amused.training.inference.export import export_pipeline
from amused.training.metrics_log import read_metrics
from amused.training.uvit.data import ShardReader

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = fill_template("A {} in [V] style", ["red circle", "red circle on a white background", "round thing"])


@pytest.fixture(scope="module")
def style_png(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("style") / "style.png"
    outline_image("red", "circle", "white", side=80).save(path)
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_models, trained_checkpoint) -> str:
    """A tiny exported pipeline (64 px, 8 x 8 tokens): the base the adapters go on."""
    return export_pipeline(trained_checkpoint, str(tmp_path_factory.mktemp("base") / "pipe"),
                           str(tiny_models / "vqgan"), str(tiny_models))


def test_the_dataset_holds_the_image_once_tokenized_and_each_captions_own_embeddings(tmp_path, base, style_png):
    out = str(tmp_path / "data")
    manifest = build_style_dataset(style_png, CAPTIONS, base, base, out, resolution=64)
    assert manifest.rows == len(CAPTIONS) and read_manifest(out).rows == len(CAPTIONS)

    pixels = np.asarray(Image.open(style_png).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
    tokens = ImageTokenizer.from_pretrained(base, device="cpu").encode(pixels[None])[0]
    emb = TextEncoder.from_pretrained(base, device="cpu").encode(CAPTIONS)
    hidden, pooled = emb.hidden_states.float().numpy().astype("<f2"), emb.pooled.float().numpy().astype("<f2")
    rows = next(TokenDataset(out).iter_batches(batch_size=16))
    assert rows["caption"] == CAPTIONS
    assert (rows["image_tokens"] == tokens).all()
    assert (rows["text_hidden_states"] == hidden).all() and (rows["text_pooled"] == pooled).all()
    assert len({r.tobytes() for r in rows["text_pooled"]}) == len(CAPTIONS)  # no caption overwrote another's

    # What training reads (its reader, several epochs): every batch carries one caption's own
    # embeddings, and all captions come by, never one caption's embeddings for every row.
    reader = ShardReader(TokenDataset(out), lanes=1, rank=0, world_size=1, lane_batch=1, accum=1, window_rows=1024,
                         seed=0, workers=0, prefetch=1, default_aesthetic=6.0)
    seen = []
    for _ in range(3 * len(CAPTIONS)):
        batch = next(reader)
        match = [i for i in range(len(CAPTIONS)) if np.array_equal(batch["text_pooled"][0].numpy(), pooled[i])]
        assert len(match) == 1 and np.array_equal(batch["text_hidden_states"][0].numpy(), hidden[match[0]])
        assert (batch["image_tokens"][0].numpy() == tokens).all()
        seen.append(match[0])
    reader.close()
    assert sorted(set(seen)) == list(range(len(CAPTIONS)))

    # A rerun finds the shard done (nothing is encoded or written again); other captions are refused.
    shard = tmp_path / "data" / "00000.parquet"
    before = shard.stat().st_mtime_ns
    build_style_dataset(style_png, CAPTIONS, base, base, out, resolution=64)
    assert shard.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="another image or captions"):
        build_style_dataset(style_png, CAPTIONS[:2], base, base, out, resolution=64)


def test_feedback_rows_follow_the_image_rows_and_a_run_trains_on_them(tmp_path, base, style_png):
    """StyleDrop's second round: accepted samples (token grids + the prompt each was drawn
    from, written by write_feedback) become rows after the image's, and finetune_style trains on them."""
    tokenizer = ImageTokenizer.from_pretrained(base, device="cpu")
    tokens = np.random.default_rng(0).integers(0, tokenizer.codebook_size, size=(2, *tokenizer.grid(64)))
    captions = ["a blue square in [V] style", "a green triangle in [V] style"]
    rows_url = write_feedback(str(tmp_path / "feedback.npz"), tokens, captions)
    back_tokens, back_captions = read_feedback(rows_url)
    assert back_captions == captions and (back_tokens == tokens).all()

    out = tmp_path / "style"
    keys = {"style.resolution": 64, "style.per_prompt": 1, "style.feedback": rows_url, "train.checkpoint.every": 2,
            "train.log.every": 1, "sample.steps": 2}
    result = finetune_style(style_png, base, str(out), ["red circle"], steps=2, keys=keys, progress=False)
    assert result["step"] == 2
    rows = next(TokenDataset(str(out / "data")).iter_batches(batch_size=16))
    assert rows["caption"] == ["A red circle in [V] style", *captions]
    image_tokens = tokenizer.encode(
        np.asarray(Image.open(style_png).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))[None])[0]
    assert (rows["image_tokens"][0] == image_tokens).all() and (rows["image_tokens"][1:] == tokens).all()
    assert len(set(rows["content_id"])) == 3  # each feedback row is its own content
    emb = TextEncoder.from_pretrained(base, device="cpu").encode(captions)
    assert (rows["text_pooled"][1:] == emb.pooled.float().numpy().astype("<f2")).all()

    # Other feedback rows into the same folder: refused, not mixed.
    with pytest.raises(ValueError, match="another image or captions"):
        build_style_dataset(style_png, ["A red circle in [V] style"], base, base, str(out / "data"), resolution=64,
                            feedback=(tokens[::-1], captions))


def test_the_feedback_signal_wants_an_outline_of_the_prompts_colour_and_shape():
    assert shows_style(outline_image("blue", "square", "white"), "blue", "square")
    assert not shows_style(outline_image("blue", "square", "white"), "blue", "circle")
    assert not shows_style(outline_image("red", "square", "white"), "blue", "square")
    assert not shows_style(shape_image(np.random.default_rng(0), 32, 32)[0], "blue", "square")


def test_a_template_needs_one_subject_place_and_distinct_subjects():
    with pytest.raises(ValueError, match="exactly once"):
        fill_template("A [V] style", ["x"])
    with pytest.raises(ValueError, match="repeat"):
        fill_template("A {} in [V] style", ["cat", "cat "])


def test_finetune_style_trains_adapters_samples_and_a_rerun_continues(tmp_path, base, style_png):
    out = tmp_path / "style"
    keys = {"style.resolution": 64, "style.per_prompt": 2, "train.checkpoint.every": 2, "train.log.every": 1,
            "sample.steps": 4}
    first = finetune_style(style_png, base, str(out), ["red circle", "round thing"], steps=2, keys=keys,
                           progress=False)
    assert first["step"] == 2 and Path(first["grid"]).is_file()
    state = torch.load(Path(first["checkpoint"]) / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert state and all(".lora_" in name for name in state)  # adapters only
    shard = out / "data" / "00000.parquet"
    before = shard.stat().st_mtime_ns

    # The rerun goes through the command line, with the same keys.
    assert main(["finetune-style", "--image", style_png, "--subject", "red circle", "--subject", "round thing",
                 "--pretrained", base, "--output", str(out), "--steps", "4",
                 *[arg for key, value in keys.items() for arg in ("--set", f"{key}={value}")]]) == 0
    second = json.loads((out / "samples" / "result.json").read_text())
    assert second["step"] == 4 and second["checkpoint"] != first["checkpoint"]
    assert [m["step"] for m in read_metrics(str(out / "train"))] == [1, 2, 3, 4]  # continued, not restarted
    assert shard.stat().st_mtime_ns == before  # the dataset was not made again
    assert len(second["prompts"]) == 2


def test_the_outline_classifier_finds_outlines_and_not_filled_shapes():
    rng = np.random.default_rng(0)
    filled = [shape_image(rng, 32, 32)[0] for _ in range(100)]
    assert not any(is_outline(img) for img in filled)
    names = list(COLOURS)
    outlines = [outline_image(c, s, b) for c in names for b in names if b != c for s in SHAPES]
    assert all(is_outline(img) for img in outlines)


# The demo's exported pipeline (`make demo`); AMUSED_DEMO_PIPELINE names another.
DEMO_PIPELINE = os.environ.get("AMUSED_DEMO_PIPELINE", str(REPO / "demo-out" / "pipeline"))


@pytest.fixture(scope="module")
def proof(tmp_path_factory) -> dict:
    """The learning proof's figures (two 100-step rounds, 128 feedback samples, the
    measurement: about 8 min with the CPUs to itself, 17 min on 2 busy cores): the demo's
    trained model learns outline drawing from one outlined red circle."""
    if not (Path(DEMO_PIPELINE) / "model_index.json").is_file():
        pytest.skip(f"no demo pipeline at {DEMO_PIPELINE}: run `make demo` (or set AMUSED_DEMO_PIPELINE)")
    sample = from_mapping(SampleConfig, read_yaml(str(REPO / "configs" / "demo.yaml"))["sample"], "sample")
    plain = (REPO / "configs" / "demo-prompts.txt").read_text().splitlines()[:32]
    return style_proof(DEMO_PIPELINE, str(tmp_path_factory.mktemp("proof")), sample, plain)["figures"]


@pytest.mark.slow
def test_a_style_learned_from_one_image_shows_on_held_out_prompts(proof):
    """What the proof reaches today (measured: 47% outlines on held-out [V] prompts, 0% on
    the base's samples of them): the style is learned, well above the classifier's false
    positives, and the adapters at scale 0 are exactly the base."""
    assert proof["style_base"]["outline"] <= 0.1  # the classifier does not say yes to everything
    assert proof["style_tuned"]["outline"] >= proof["style_base"]["outline"] + 0.25
    assert proof["plain_scale0"]["prompt_following"] == proof["plain_base"]["prompt_following"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="below the issue's goals so far (benchmarks/RESULTS.md, StyleDrop): 47% outlines on held-out "
                          "[V] prompts (goal 80%), the base's own no-[V] prompt following 84.4% (goal 85%)")
def test_the_style_reaches_the_issues_goals(proof):
    assert proof["style_tuned"]["outline"] >= 0.8
    assert proof["plain_scale0"]["prompt_following"] >= 0.85


def test_a_style_fine_tune_without_adapters_is_refused_before_any_work(tmp_path, style_png):
    """`--set train.lora.enabled=false` would fine-tune the whole base on one image."""
    with pytest.raises(ValueError, match="train.lora.enabled"):
        finetune_style(style_png, str(tmp_path / "base"), str(tmp_path / "out"), ["red circle"],
                       keys={"train.lora.enabled": False})
    assert not (tmp_path / "out").exists()
