"""LoRA adapters (peft) on the U-ViT, through diffusers' own adapter API, so the names
and scaling are the ones diffusers' aMUSEd LoRA loader (`AmusedLoraLoaderMixin`) reads and writes.

A LoRA run (`lora.enabled`, always from `model.pretrained`) trains the adapters only, on
the same DeepSpeed engine as a full run; its checkpoints hold only what it trains:

    RUN_DIR/checkpoints/step_N/
        mp_rank_00_model_states.pt   ["module"]: the adapters only (DeepSpeed's
                                     exclude_frozen_parameters), names with the adapter
                                     name, e.g. `transformer_layers.0.attention.to_q.lora_A.default.weight`;
                                     ZeRO 0: also their AdamW state ("optimizer")
        zero_pp_rank_R_*optim_states.pt  ZeRO 1/2: the adapters' fp32 copies and AdamW
                                     state, partitioned
        ema.safetensors              the adapters' EMA (fp32), the same names (the EMA
                                     tracks trainable parameters only)
        trainer.json                 its "lora" key (`record`): the base's identity
                                     {"path", "sha256"} (ModelIdentity of model.pretrained's
                                     transformer folder), rank, alpha, target_modules
        config.yaml                  model.pretrained and the lora: section it ran with

Readers: `load_trained(checkpoint, ema)` gives the base with the checkpoint's adapters
(refusing another base); `adapter_state_dict(model_or_state)` gives the adapters under
the names peft's `get_peft_model_state_dict` and diffusers' `save_lora_weights`
(`transformer_lora_layers=`) use, without the adapter name (`...to_q.lora_A.weight`);
`load_adapters(model, state)` puts adapters (either naming) into a model `apply_lora`
made, refusing any missing or unexpected one.
"""

from __future__ import annotations

import json

import torch
from diffusers import UVit2DModel
from peft import LoraConfig as PeftLoraConfig

from amused.pipeline.shards import ModelIdentity
from amused.training.checkpoint import TRAINER, Checkpoint
from amused.training.config import LoraConfig, TrainConfig, parse_config
from amused.training.uvit.model import build_model

ADAPTER = "default"
_NAMED = f".{ADAPTER}."
_LAYERS = (".lora_A.", ".lora_B.")


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Adds the adapters to `model` (in place) and freezes every other weight."""
    model.requires_grad_(False)
    model.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                     target_modules=list(cfg.target_modules), init_lora_weights="gaussian"),
                      adapter_name=ADAPTER)
    return model


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether `model` carries adapters (peft's, added by `apply_lora` or diffusers' loader)."""
    return bool(getattr(model, "peft_config", None))


def is_adapter(name: str) -> bool:
    return any(layer in name for layer in _LAYERS)


def adapter_state_dict(source: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a model (or of a state dict: a LoRA checkpoint's weights), named
    without the adapter name, as diffusers' `save_lora_weights` wants them (detached)."""
    state = dict(source.named_parameters()) if isinstance(source, torch.nn.Module) else source
    return {name.replace(_NAMED, "."): t.detach() for name, t in state.items() if is_adapter(name)}


def load_adapters(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies `state` (adapter names with or without the adapter name) into the adapters of
    `model` (made by `apply_lora`); every adapter must be there and nothing else."""
    mine = {name.replace(_NAMED, "."): p for name, p in model.named_parameters() if is_adapter(name)}
    given = adapter_state_dict(state)
    missing = sorted(set(mine) - set(given))
    unexpected = sorted({n for n in state if not is_adapter(n)} | (set(given) - set(mine)))
    if missing or unexpected:
        raise ValueError(f"the adapters do not fit the model: {len(missing)} missing (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); another lora.rank/target_modules?")
    with torch.no_grad():
        for name, param in mine.items():
            if param.shape != given[name].shape:
                raise ValueError(f"adapter {name}: shape {tuple(given[name].shape)}, the model's is "
                                 f"{tuple(param.shape)} (another lora.rank?)")
            param.copy_(given[name])


def base_identity(pretrained: str) -> ModelIdentity:
    """What the adapters were trained on: model.pretrained's U-ViT folder and its hash."""
    return ModelIdentity.of(pretrained, ("transformer",))


def record(cfg: LoraConfig, base: ModelIdentity) -> dict:
    """The "lora" entry of a LoRA run's trainer state."""
    return {"base": {"path": base.path, "sha256": base.sha256}, "rank": cfg.rank, "alpha": cfg.alpha,
            "target_modules": list(cfg.target_modules)}


def check_same(recorded: dict | None, current: dict | None, where: str) -> None:
    """Adapters load only onto the base and the adapter shape they were trained with."""
    if recorded is None and current is None:
        return
    if recorded is None or current is None:
        raise ValueError(f"{where} was trained {'with' if current is None else 'without'} LoRA adapters; "
                         f"lora.enabled must stay {current is None} for it (or start a new run folder)")
    if recorded["base"]["sha256"] != current["base"]["sha256"]:
        raise ValueError(f"{where}: its adapters were trained on the base {recorded['base']['path']} (sha256 "
                         f"{recorded['base']['sha256'][:12]}...); model.pretrained = {current['base']['path']} "
                         f"hashes to {current['base']['sha256'][:12]}...: adapters load only onto their own base")
    changed = [k for k in ("rank", "alpha", "target_modules") if recorded[k] != current[k]]
    if changed:
        raise ValueError(f"{where}: lora.{changed[0]} was {recorded[changed[0]]!r}, now {current[changed[0]]!r}; "
                         "the adapters' settings cannot change within a run")


def load_trained(checkpoint: Checkpoint, ema: bool = True) -> UVit2DModel:
    """A LoRA run's checkpoint as a model: its base (model.pretrained, checked against the
    identity it recorded) with its adapters (EMA or raw) loaded."""
    cfg: TrainConfig = checkpoint.config(parse_config)
    recorded = json.loads(checkpoint.file(TRAINER).read_text()).get("lora")
    if not cfg.lora.enabled or recorded is None:
        raise ValueError(f"{checkpoint.folder} is not a LoRA run's checkpoint (lora.enabled false in its config, "
                         f"or no \"lora\" entry in its {TRAINER})")
    check_same(recorded, record(cfg.lora, base_identity(cfg.model.pretrained)), checkpoint.folder)
    model = apply_lora(build_model(cfg.model.preset, cfg.model.pretrained), cfg.lora)
    load_adapters(model, checkpoint.state_dict(ema))
    return model.eval()
