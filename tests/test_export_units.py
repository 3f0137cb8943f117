"""The model card and the export's portable source record, without models."""

import json

import pytest

from amused.training.config import parse_config
from amused.training.inference.card import CardFacts, front_matter, hub_id_of, model_card
from amused.training.inference.export import CARD_KEYS, EXPORT_COMPLETE, SOURCE, _recorded, portable

pytestmark = pytest.mark.unit

CACHED_BASE = "/root/.cache/huggingface/hub/models--amused--amused-256/snapshots/abc123"


def lora_facts(**changes) -> CardFacts:
    cfg = parse_config({"run_dir": "s3://bucket/runs/style", "steps": 300,
                        "data": {"dataset": "s3://bucket/tokens", "global_batch_size": 8},
                        "model": {"preset": "tiny", "pretrained": CACHED_BASE},
                        "lora": {"enabled": True, "rank": 8, "alpha": 16}})
    facts = dict(name="style-pipe", cfg=cfg, resolution=256, token_grid=16, base_model=CACHED_BASE,
                 base_model_id=hub_id_of(CACHED_BASE), dataset="s3://bucket/tokens", manifest=None, evaluation=None,
                 variant=None, source={"checkpoint": "checkpoints/step_00000300", "run": "s3://bucket/runs/style",
                                       "step": 300, "weights": "ema", "vqgan": "s3://bucket/vq", "text_encoder": "s3://bucket/te",
                                       "lora": "merged"})
    return CardFacts(**{**facts, **changes})


def test_a_lora_fine_tune_names_its_hub_base_in_the_front_matter():
    card = model_card(lora_facts())
    meta = front_matter(card)
    assert meta == {"license": "openrail++", "library_name": "diffusers", "pipeline_tag": "text-to-image",
                    "tags": ["text-to-image", "amused", "muse", "masked-image-modeling", "amused-pipeline", "lora"],
                    "base_model": "amused/amused-256"}
    assert "`checkpoints/step_00000300` of the run `s3://bucket/runs/style`, step 300 of 300" in card
    assert "LoRA adapters (rank 8, alpha 16), merged into it" in card
    assert "its manifest could not be read at export time" in card and "No evaluation of this checkpoint" in card
    assert 'from_pretrained("style-pipe")' in card


def test_a_base_outside_the_hub_cache_is_named_in_the_text_only_and_the_license_is_kept():
    card = model_card(lora_facts(base_model="../bases/mine", base_model_id=None, license="apache-2.0"))
    assert "base_model" not in front_matter(card) and "`../bases/mine`, fine-tuned with LoRA" in card
    assert front_matter(card)["license"] == "apache-2.0" and "`apache-2.0` (the `license` field above)" in card
    with pytest.raises(ValueError, match="no YAML front matter"):
        front_matter(card.partition("---\n")[2].partition("---\n")[2])


def test_portable_paths_never_name_a_machines_absolute_path(tmp_path):
    run = tmp_path / "runs" / "a"
    assert portable(str(run / "checkpoints" / "step_00000004"), str(run)) == "checkpoints/step_00000004"
    assert portable(str(tmp_path / "models" / "vq"), str(run)) == "../../models/vq"
    assert portable("s3://bucket/models/vq", str(run)) == "s3://bucket/models/vq"
    assert portable(str(tmp_path / "models" / "vq"), "s3://bucket/runs/a") == "vq"
    assert hub_id_of("/data/hf/hub/models--openai--clip-vit-large-patch14/snapshots/0123/") == \
        "openai/clip-vit-large-patch14"
    assert hub_id_of(str(tmp_path / "amused-256")) is None


def test_a_rerun_tells_a_card_change_from_another_export(tmp_path):
    out = tmp_path / "pipe"
    source = {"checkpoint": "checkpoints/step_00000004", "step": 4, "weights": "ema", "sha256": "a" * 64,
              "vqgan": "../vq", "text_encoder": "../te"}
    assert _recorded(str(out), source, EXPORT_COMPLETE) is None  # nothing there yet
    out.mkdir()
    (out / EXPORT_COMPLETE).write_text("{}")
    record = source | {"license": "openrail++", "base_model": None, "card_sha256": "b" * 64}
    (out / SOURCE).write_text(json.dumps(record))
    assert _recorded(str(out), source, EXPORT_COMPLETE) == record  # the same weights: only the card may change
    (out / SOURCE).write_text(json.dumps(source))  # an export from before the card was recorded
    assert _recorded(str(out), source, EXPORT_COMPLETE) == source
    for other in ({"sha256": "c" * 64}, {"step": 5}, {"variant": "fp16"}, {"weights": "raw"}):
        with pytest.raises(FileExistsError, match="already holds another export"):
            _recorded(str(out), source | other, EXPORT_COMPLETE)
    (out / SOURCE).unlink()  # a complete folder without a record: not ours to replace
    with pytest.raises(FileExistsError, match="already holds another export"):
        _recorded(str(out), source, EXPORT_COMPLETE)
    assert set(CARD_KEYS) == set(record) - set(source)
