"""The model card (README.md) of an exported pipeline folder, as the Hugging Face Hub reads
it: YAML front matter (license, library_name, pipeline_tag, tags, base_model for a
fine-tune), then what the weights are: the checkpoint and its step, the base model, the
token dataset (its URL and its manifest's facts), the training settings, the resolution
and the evaluation figures of that very checkpoint when the run has them
(RUN/eval/step_N.json, which `amused evaluate` and `amused run` write).

Paths are written as the export's source records them (relative to the run folder, or
URLs), never as a machine's absolute path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:  # the CLI imports DEFAULT_LICENSE for its help: no torch for `amused --help`
    from amused.pipeline.shards import Manifest
    from amused.training.config import TrainConfig

CARD = "README.md"
# The license field when none is asked for: the released aMUSEd models' (a fine-tune of one inherits
# it). A model trained from scratch is its trainer's to license: `amused export --license` says so.
DEFAULT_LICENSE = "openrail++"
TAGS = ("text-to-image", "amused", "muse", "masked-image-modeling", "amused-pipeline")
# A folder of the Hugging Face cache names the Hub repository it holds (HF_HOME/hub/models--OWNER--NAME/snapshots/REV).
_HUB_CACHE = re.compile(r"models--([\w.-]+)--([\w.-]+)/snapshots/")


@dataclass(frozen=True)
class CardFacts:
    """What the card says, gathered by the export (training/inference/export.py)."""

    name: str
    source: dict  # the export's amused_export.json record
    cfg: TrainConfig
    resolution: int
    token_grid: int
    base_model: str | None  # the base folder, portable: relative to the run folder, or a URL
    base_model_id: str | None  # the base's Hub repository id ("amused/amused-256"), the front matter's base_model
    dataset: str  # portable, as base_model
    manifest: Manifest | None  # None when the dataset's manifest could not be read at export time
    evaluation: dict | None  # the checkpoint's eval/step_N.json
    variant: str | None
    license: str = DEFAULT_LICENSE


def model_card(facts: CardFacts) -> str:
    meta = {"license": facts.license, "library_name": "diffusers", "pipeline_tag": "text-to-image",
            "tags": [*TAGS, *(["lora"] if facts.cfg.lora.enabled else []),
                     *(["int8"] if facts.source.get("quantize") else [])]}
    if facts.base_model_id:
        meta["base_model"] = facts.base_model_id
    return "\n".join(["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", *_body(facts)]) + "\n"


def _body(f: CardFacts) -> list[str]:
    src, cfg = f.source, f.cfg
    weights = "EMA" if src["weights"] == "ema" else "raw (not EMA)"
    run = f" of the run `{src['run']}`" if "run" in src else ""
    lines = [f"# {f.name}", "",
             "An aMUSEd text-to-image model (a U-ViT predicting masked VQ-GAN tokens, decoded MaskGIT-style), "
             "trained with amused-pipeline and exported as a diffusers `AmusedPipeline` folder.", "",
             f"- **Checkpoint**: `{src['checkpoint']}`{run}, step {src['step']} of {cfg.steps}, {weights} weights",
             f"- **Base model**: {_base(f)}",
             f"- **Resolution**: {f.resolution}x{f.resolution} pixels ({f.token_grid}x{f.token_grid} tokens); "
             f"U-ViT preset `{cfg.model.preset}`",
             f"- **Data**: {_data(f)}",
             f"- **Training**: {src['step']} steps, global batch {cfg.data.global_batch_size}, learning rate "
             f"{cfg.optim.lr:g} ({cfg.optim.schedule}, {cfg.optim.warmup_steps} warm-up steps), EMA decay "
             f"{cfg.ema.decay if cfg.ema.enabled else 'off'}",
             f"- **VQ-GAN / text encoder**: `{src['vqgan']}` / `{src['text_encoder']}`"]
    if src.get("quantize"):
        lines.append(f"- **U-ViT**: {src['quantize']}-quantized (torchao), for inference on CPU")
    lines += ["", f"## Evaluation (step {src['step']})", "", *_evaluation(f.evaluation), "", "## Use", "",
              "```python", "import torch", "from diffusers import AmusedPipeline", "",
              f'pipe = AmusedPipeline.from_pretrained("{f.name}"{_load_args(f.variant)})',
              'image = pipe("a red circle on a white background", generator=torch.Generator().manual_seed(0)).images[0]',
              "```", "", "## License", "", f"`{f.license}` (the `license` field above)."]
    return lines


def hub_id_of(folder: str) -> str | None:
    """The Hub repository id of a base model folder when it lies in the Hugging Face cache."""
    found = _HUB_CACHE.search(folder)
    return f"{found.group(1)}/{found.group(2)}" if found else None


def _base(f: CardFacts) -> str:
    if not f.base_model:
        return "none: trained from random weights"
    if f.base_model_id:
        return f"`{f.base_model_id}` (the folder `{f.base_model}`), " + _tuning(f)
    return f"`{f.base_model}`, " + _tuning(f)


def _tuning(f: CardFacts) -> str:
    if f.cfg.lora.enabled:
        merged = "merged into it" if f.source.get("lora") == "merged" else "kept apart"
        return f"fine-tuned with LoRA adapters (rank {f.cfg.lora.rank}, alpha {f.cfg.lora.alpha:g}), {merged}"
    return "fine-tuned"


def _data(f: CardFacts) -> str:
    if f.manifest is None:
        return f"the token dataset `{f.dataset}` (its manifest could not be read at export time)"
    m, spec = f.manifest, f.manifest.spec
    skipped = sum(m.skipped().values())
    return (f"the token dataset `{f.dataset}`: {m.rows} images in {len(m.shards)} shards "
            f"({skipped} skipped while tokenizing), {spec.resolution} px {spec.crop}-cropped, "
            f"{spec.views} view(s) per image, captions stored as `{spec.text}`")


def _evaluation(result: dict | None) -> list[str]:
    from amused.training.evaluation.metrics import METRICS  # torch: see the imports above

    if result is None:
        return ["No evaluation of this checkpoint was found in the run (`amused evaluate` writes eval/step_N.json)."]
    sample = result.get("sample", {})
    return [*(f"- {m.show(result)}" for m in METRICS),
            f"- {result.get('images')} images of the prompts `{result.get('prompts')}`, seed {result.get('seed')}, "
            f"{sample.get('steps')} decoding steps, guidance {sample.get('guidance_scale')}, "
            f"{sample.get('schedule')} schedule"]


def _load_args(variant: str | None) -> str:
    return f', variant="{variant}", torch_dtype=torch.float16' if variant else ""


def front_matter(card: str) -> dict:
    """The YAML front matter of a model card's text."""
    if not card.startswith("---\n"):
        raise ValueError("the model card has no YAML front matter")
    return yaml.safe_load(card[4:].partition("\n---\n")[0])
