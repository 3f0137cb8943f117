"""The training config: one small typed section per component, read from YAML.

Each section validates its own ranges; `load_config` rejects unknown keys, wrong types
and non-finite numbers by their dotted name (plumbing.config.from_mapping). Checks that
need the data or the world size (token grid vs model, batch vs ranks and lanes:
`training.distributed.Layout.plan`) run in each task's start-up (training/uvit/task.py,
training/vqgan/task.py) before any step; `amused run` knows its world size and runs the
batch check when it parses its config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import yaml

from amused.plumbing.config import check_choices, from_mapping, opt, read_yaml, section
from amused.tokenizer.presets import UVIT_CONFIGS


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class DataConfig:
    dataset: str = opt(help="token dataset URL, the output of `amused pretokenize`")
    global_batch_size: int = opt(help="samples per optimizer step over all ranks (aMUSEd-512: 1024)")
    micro_batch_size: int = opt(8, "samples per rank per forward pass; gradient accumulation makes up the rest")
    lanes: int | None = opt(None, "data-parallel lanes (default: the world size at the first start); fixed for "
                                  "the run so that resuming on another number of ranks sees the same samples")
    workers: int = opt(2, "data-loader processes per rank (0 reads in the training process)")
    prefetch: int = opt(2, "windows each data-loader process reads ahead")
    window_rows: int = opt(1024, "rows per lane shuffled together")
    seed: int = opt(0, "shuffle seed: the order is a function of (seed, epoch)")
    default_aesthetic: float = opt(6.0, "aesthetic score used where a sample has none (aMUSEd samples with 6)")

    def __post_init__(self):
        _check(self.global_batch_size >= 1, f"data.global_batch_size must be >= 1, got {self.global_batch_size}")
        _check(self.micro_batch_size >= 1, f"data.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _check(self.lanes is None or self.lanes >= 1, f"data.lanes must be >= 1, got {self.lanes}")
        _check(self.workers >= 0, f"data.workers must be >= 0, got {self.workers}")
        _check(self.prefetch >= 1, f"data.prefetch must be >= 1, got {self.prefetch}")
        _check(self.window_rows >= 1, f"data.window_rows must be >= 1, got {self.window_rows}")
        _check(self.seed >= 0, f"data.seed must be >= 0, got {self.seed}")  # numpy seeds are unsigned


@dataclass
class ModelConfig:
    # The allowed names are the presets table's, so a new preset needs no edit here.
    preset: Literal[tuple(UVIT_CONFIGS)] = opt("amused-256", "U-ViT architecture (tokenizer/presets.py)")
    pretrained: str | None = opt(None, "start from this UVit2DModel folder (diffusers layout; a pipeline folder's "
                                       "transformer/ is found) instead of random weights")
    vqgan: str | None = opt(None, "the VQ-GAN folder the tokens came from; checked against the dataset manifest")
    text_encoder: str | None = opt(None, "the CLIP folder the captions went through; checked against the manifest")
    activation_checkpointing: bool = opt(False, "recompute transformer layers in the backward pass")
    # Same weights and state-dict names either way (only the kernels differ), so switching it on a
    # resumed run leaves the run's fingerprint alone.
    compile: bool = opt(False, "torch.compile each transformer block (GPU; CPU too but slow to compile)",
                        output=False)


@dataclass
class ObjectiveConfig:
    rect_mask_prob: float = opt(0.15, "probability per batch of masking one rectangle per sample instead")
    label_smoothing: float = opt(0.1, "cross-entropy label smoothing")
    cond_drop_prob: float = opt(0.1, "fraction of samples whose text condition becomes the empty prompt's")

    def __post_init__(self):
        for name in ("rect_mask_prob", "label_smoothing", "cond_drop_prob"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"objective.{name} must be in [0, 1], got {value}")


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit"] = opt("adamw", "adamw, or adamw8bit: 8-bit optimizer states (bitsandbytes, "
                                                        "CUDA and CPU), for full fine-tuning in less memory")
    lr: float = opt(1e-4, "peak learning rate")
    betas: tuple[float, ...] = opt((0.9, 0.999), "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    weight_decay: float = opt(0.01, "AdamW weight decay (never on norms, biases, embeddings)")
    warmup_steps: int = opt(2000, "linear warm-up steps")
    schedule: Literal["constant", "cosine"] = opt("constant", "after warm-up")
    min_lr_ratio: float = opt(0.0, "cosine: final lr as a fraction of the peak")
    grad_clip: float = opt(0.0, "clip the global gradient norm to this (0 = off, as aMUSEd)")

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas must be two values in [0, 1), got {list(self.betas)}")
        _check(self.warmup_steps >= 0 and self.grad_clip >= 0 and self.weight_decay >= 0,
               "optim.warmup_steps, grad_clip and weight_decay must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class LoraConfig:
    """Low-rank adapters (peft) on the U-ViT: only they train, only they are checkpointed."""

    enabled: bool = opt(False, "train LoRA adapters instead of every weight (start from model.pretrained)")
    rank: int = opt(16, "adapter rank r")
    alpha: float = opt(32.0, "the adapters' output is scaled by alpha / rank")
    dropout: float = opt(0.0, "dropout on the adapters' input")
    target_modules: tuple[str, ...] = opt(("to_q", "to_k", "to_v", "to_out.0"),
                                          "module names (suffixes) that get adapters: the attention projections")
    text_encoder: bool = opt(False, "also adapt the CLIP text tower's attention: not supported yet (refused)")

    def __post_init__(self):
        _check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) >= 1, "lora.target_modules must name at least one module")
        # The tower runs outside the engine (frozen, text "ids" only): adapters there would not train.
        _check(not self.text_encoder, "lora.text_encoder: adapting the CLIP text tower is not supported; "
                                      "LoRA trains the U-ViT's adapters only (lora.target_modules)")


def deterministic_setting():
    """A training's `deterministic` switch (the U-ViT's and the VQ-GAN's). Kernels and threads,
    not what is computed (as model.compile): out of the run's fingerprint, so turning it on
    for a finished or resumed run keeps its work; a reproducible result starts from an empty
    folder anyway."""
    return opt(False, "deterministic kernels and a fixed thread count (engine.threads): byte-identical reruns on "
                      "the same machine (plumbing/determinism.py)", output=False)


@dataclass
class EngineConfig:
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage (0, 1 or 2)")
    precision: Literal["auto", "fp32", "bf16"] = opt("auto", "auto = bf16 on GPU, fp32 on CPU")
    max_nonfinite_in_row: int = opt(10, "non-finite loss/gradient steps are skipped and counted; "
                                        "this many in a row stops the run")
    threads: int | None = opt(None, "torch threads per rank with `deterministic` on (default: under Ray Train the "
                                    "worker's CPUs, else the CPUs this process may use)", output=False)

    def __post_init__(self):
        _check(self.threads is None or self.threads >= 1, f"engine.threads must be >= 1, got {self.threads}")
        # Stage 3 partitions the parameters themselves, which the EMA and the export read
        # whole; a 600M-parameter U-ViT fits every GPU with stage 2.
        _check(self.zero_stage in (0, 1, 2), f"engine.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        _check(self.max_nonfinite_in_row >= 1, "engine.max_nonfinite_in_row must be >= 1")


@dataclass
class EMAConfig:
    enabled: bool = opt(True, "keep an exponential moving average of the weights")
    decay: float = opt(0.9999, "EMA decay")
    warmup: bool = opt(True, "decay min((1 + step) / (10 + step), decay), as aMUSEd")

    def __post_init__(self):
        _check(0 < self.decay < 1, f"ema.decay must be in (0, 1), got {self.decay}")


@dataclass
class CheckpointConfig:
    every: int = opt(1000, "optimizer steps between checkpoints")
    keep: int = opt(3, "complete checkpoints kept (older ones are deleted)")
    asynchronous: bool = opt(True, "upload (and hash) a checkpoint in the background: the step after it waits "
                                   "only for the local write, the next checkpoint for the upload", output=False)
    at_end: bool = opt(True, "also save at the last step; off for a throw-away run such as a benchmark, where "
                             "amused-256's ~10 GB final checkpoint would cost more than the steps", output=False)

    def __post_init__(self):
        _check(self.every >= 1 and self.keep >= 1, "checkpoint.every and checkpoint.keep must be >= 1")


@dataclass
class LogConfig:
    every: int = opt(10, "optimizer steps between metrics.jsonl lines")
    tensorboard: bool = opt(False, "also write TensorBoard events under RUN_DIR/tensorboard")
    wandb_project: str | None = opt(None, "also log to this wandb project")
    progress: bool = opt(True, "progress bar with ETA on rank 0")

    def __post_init__(self):
        _check(self.every >= 1, "log.every must be >= 1")


@dataclass
class TrainConfig:
    run_dir: str = opt(help="run folder, any fsspec URL (local, shared file system, s3://): checkpoints, metrics, "
                            "config; on object storage each rank writes to local scratch ($AMUSED_SCRATCH) first")
    steps: int = opt(help="optimizer steps to train to")
    data: DataConfig = opt(help="token shards and the reader")
    seed: int = opt(0, "model initialisation, masking and condition dropout")
    deterministic: bool = deterministic_setting()
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = section(LogConfig, output=False)
    max_failures: int = opt(3, "under Ray Train: restarts from the latest complete checkpoint after a worker or "
                               "node is lost, before the run stops for a person", output=False)

    def __post_init__(self):
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(bool(self.run_dir.strip()), "run_dir must be a folder path, got ''")
        _check(self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}")
        _check(not self.lora.enabled or self.model.pretrained is not None,
               "lora.enabled needs model.pretrained: adapters on random weights learn nothing worth keeping")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SampleConfig:
    """Decoding settings of `amused sample` (aMUSEd's defaults)."""

    steps: int = opt(12, "decoding steps")
    guidance_scale: float = opt(10.0, "classifier-free guidance scale (1 = off)")
    temperature_start: float = opt(2.0, "Gumbel temperature at the first step, annealed linearly")
    temperature_end: float = opt(0.0, "... to this at the last")
    schedule: Literal["cosine", "linear"] = opt("cosine", "mask-ratio schedule")
    aesthetic_score: float = opt(6.0, "micro-conditioning aesthetic score")
    crop_top: int = opt(0, "micro-conditioning crop top")
    crop_left: int = opt(0, "micro-conditioning crop left")
    negative_prompt: str = opt("", "the prompt guidance steers away from")

    def __post_init__(self):
        check_choices(self)  # built in Python too (evaluation, styledrop): another schedule would sample linear
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        # The sampler guides only above 1; below it a scale would be ignored without a word.
        _check(self.guidance_scale >= 1, f"guidance_scale must be >= 1 (1 = off), got {self.guidance_scale}")
        for name in ("temperature_start", "temperature_end", "crop_top", "crop_left"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    """What `amused evaluate` measures and with which models (all local or s3 paths)."""

    prompts: str = opt(help="prompt set: a text file (one per line) or Parquet (column caption/prompt/TEXT)")
    reference: str = opt(help="FID reference statistics (.npz) from `amused fid-stats`")
    inception: str = opt(help="FID Inception weights file (pt_inception-2015-12-05-6726825d.pth)")
    clip: str = opt("", "CLIP folder (CLIPModel + tokenizer) for the CLIP score; empty = no CLIP score")
    vqgan: str = opt("", "VQ-GAN (default: the checkpoint config's model.vqgan)")
    text_encoder: str = opt("", "text encoder (default: the checkpoint config's model.text_encoder)")
    actors: int = opt(1, "Ray actors generating and measuring in parallel")
    gpus_per_actor: float = opt(0.0, "GPUs per actor (0 = CPU)")
    batch_size: int = opt(8, "prompts per generation batch in an actor")
    max_prompts: int = opt(0, "use the first N prompts (0 = all)")
    grid: int = opt(16, "images of the first prompts in the sample grid")
    seed: int = opt(0, "image i is drawn with seed * 2^32 + i")
    ema: bool = opt(True, "evaluate the EMA weights (--no-ema: the raw ones)")
    output: str = opt("", "results folder (default: RUN_DIR/eval)")
    watch: bool = opt(False, "with a run folder: keep evaluating new checkpoints until training ends "
                             "(in `amused run`: while the train stage runs)", output=False)
    # Like the trainings' switch, out of the results' identity: it picks kernels and threads.
    deterministic: bool = opt(False, "deterministic kernels in each actor, one torch thread per CPU actor: the "
                                     "same images and metrics on a rerun on the same machine", output=False)

    def __post_init__(self):
        for name in ("actors", "batch_size"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_actor", "max_prompts", "grid"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        # Image i draws from the generator seeded seed * 2^32 + i, which torch takes below 2^64.
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2^32), got {self.seed}")


def parse_config(data: dict) -> TrainConfig:
    return from_mapping(TrainConfig, data)


def load_config(path: str) -> TrainConfig:
    return parse_config(read_yaml(path))


def dump_config(cfg) -> str:
    """Any config with `to_json()` as YAML, in field order."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return yaml.safe_dump(plain(cfg.to_json()), sort_keys=False)
