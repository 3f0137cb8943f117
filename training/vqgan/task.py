"""`amused vqgan train CONFIG`: VQ-GAN training on webdataset image shards, on the same
DeepSpeed loop as the U-ViT (`training.engine.run_loop`: schedule, non-finite policy,
metrics, checkpoints with exact resume).

The VQ-GAN and the patch discriminator are one module with one optimizer: the loss
(`tokenizer.vq_objective.vqgan_losses`) routes each player's gradient to its own
parameters, so no second engine is needed. Codebook health (usage and perplexity over
the last `codebook.window` batches of all ranks) is logged; with `codebook.reinit_every`
the codes no rank used in that window move onto rank 0's recent encoder outputs, the
same on every rank. A codebook that collapses is reported in the metrics, not hidden.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from diffusers import VQModel
from torch import nn

from amused.plumbing.config import from_mapping, opt, section
from amused.plumbing.determinism import seed_all
from amused.plumbing.fsio import file_exists, list_files
from amused.plumbing.storage import VQGAN_SUBFOLDERS, join, local_folder, resolve_subfolder
from amused.tokenizer.image import build_vqgan
from amused.tokenizer.presets import VQGAN_CONFIGS, downsample_of
from amused.tokenizer.vq_objective import (
    CodebookHealth,
    PatchDiscriminator,
    VQLossWeights,
    psnr,
    reinit_dead_codes,
    usage_and_perplexity,
    vqgan_losses,
)
from amused.training.checkpoint import Checkpoint, write_config
from amused.training.config import (
    CheckpointConfig,
    EMAConfig,
    EngineConfig,
    LogConfig,
    OptimConfig,
    _check,
    deterministic_setting,
)
from amused.training.distributed import Layout, current_device, in_process_group, locked, rank0_decides, wants_bf16
from amused.training.engine import kernels, run_loop
from amused.training.inference.export import publish_folder
from amused.training.master import write_rows_through
from amused.training.state import resume_state
from amused.training.vqgan.data import ImageCropReader


@dataclass
class VQDataConfig:
    images: str = opt(help="webdataset image shards (folder, .tar or glob; local or s3)")
    resolution: int = opt(256, "random crops of this size")
    global_batch_size: int = opt(32, "images per optimizer step over all ranks")
    micro_batch_size: int = opt(8, "images per rank per forward")
    seed: int = opt(0, "shard order and crops")

    def __post_init__(self):
        _check(self.resolution >= 8 and self.global_batch_size >= 1 and self.micro_batch_size >= 1,
               "data.resolution must be >= 8 and the batch sizes >= 1")
        _check(self.seed >= 0, f"data.seed must be >= 0, got {self.seed}")  # numpy seeds are unsigned


@dataclass
class VQModelConfig:
    preset: str = opt("amused", f"architecture from scratch: {', '.join(VQGAN_CONFIGS)}")
    pretrained: str | None = opt(None, "fine-tune this VQModel folder (or a pipeline folder with vqvae/)")

    def __post_init__(self):
        _check(self.preset in VQGAN_CONFIGS, f"model.preset must be one of {', '.join(VQGAN_CONFIGS)}, "
                                             f"got {self.preset!r}")


@dataclass
class CodebookConfig:
    window: int = opt(100, "batches over which codebook usage is counted")
    reinit_every: int = opt(0, "every N steps move dead codes onto recent encoder outputs (0 = never)")

    def __post_init__(self):
        _check(self.window >= 1 and self.reinit_every >= 0, "codebook.window must be >= 1, reinit_every >= 0")


@dataclass
class DiscriminatorConfig:
    width: int = opt(64, "channels of the first PatchGAN layer")
    layers: int = opt(3, "strided layers")
    lr_ratio: float = opt(1.0, "discriminator lr / VQ-GAN lr")

    def __post_init__(self):
        _check(self.width >= 1 and self.layers >= 1, "discriminator.width and discriminator.layers must be >= 1")
        _check(self.lr_ratio > 0, f"discriminator.lr_ratio must be > 0, got {self.lr_ratio}")


@dataclass
class VQGANConfig:
    run_dir: str = opt(help="run folder, any fsspec URL (local, shared file system, s3://)")
    steps: int = opt(help="optimizer steps to train to")
    data: VQDataConfig = opt(help="image shards")
    seed: int = opt(0, "initialisation")
    deterministic: bool = deterministic_setting()
    model: VQModelConfig = field(default_factory=VQModelConfig)
    loss: VQLossWeights = field(default_factory=VQLossWeights)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=500, weight_decay=0.0))
    # Stage 0: dead-code re-initialisation writes the codebook in place, which ZeRO 1/2
    # would overwrite from their fp32 partitions; a VQ-GAN (~80M) needs no partitioning.
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(zero_stage=0))
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(enabled=False))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = section(LogConfig, output=False)

    def __post_init__(self):
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(not (self.codebook.reinit_every and self.engine.zero_stage),
               "codebook.reinit_every needs engine.zero_stage: 0 (ZeRO 1/2 would overwrite the re-initialised codes)")
        if not self.model.pretrained:  # a pretrained model's downsampling is known once it is read
            factor = downsample_of(VQGAN_CONFIGS[self.model.preset]["block_out_channels"])
            _check(self.data.resolution % factor == 0,
                   f"data.resolution {self.data.resolution} must be a multiple of {factor}, the downsampling of "
                   f"model.preset {self.model.preset!r}")

    def to_json(self) -> dict:
        return asdict(self)


def parse_vqgan_config(data: dict) -> VQGANConfig:
    return from_mapping(VQGANConfig, data)


class VQGANWithDiscriminator(nn.Module):
    def __init__(self, vq: VQModel, discriminator: PatchDiscriminator | None):
        super().__init__()
        self.vq, self.discriminator = vq, discriminator

    def forward(self, pixels: torch.Tensor, step: int, weights: VQLossWeights):
        return vqgan_losses(self.vq, self.discriminator, pixels, weights, step)


def build_vq(model: VQModelConfig) -> VQModel:
    if model.pretrained:
        return VQModel.from_pretrained(local_folder(resolve_subfolder(model.pretrained, VQGAN_SUBFOLDERS)),
                                       use_safetensors=True)
    return build_vqgan(model.preset)


# Written last into an exported VQModel folder (what "already exported" means).
VQ_COMPLETE = "config.json"
_TERMS = ("l1", "l2", "codebook", "commitment", "adversarial", "discriminator")


class VQGANTask:
    name = "vqgan"
    plot = ("psnr_db", "codebook_usage", "l1", "lr")
    stats_size = len(_TERMS) + 2  # the terms' sums, PSNR sum, images

    def __init__(self, cfg: VQGANConfig, module: VQGANWithDiscriminator, layout, rank: int, world: int,
                 device: torch.device):
        self.cfg, self.model, self.layout, self.device, self.rank, self.world = cfg, module, layout, device, rank, world
        self.reader = ImageCropReader(cfg.data.images, cfg.data.resolution, cfg.data.micro_batch_size, rank, world,
                                      cfg.data.seed)
        self.health = CodebookHealth(module.vq.config.num_vq_embeddings, cfg.codebook.window)
        self.recent: torch.Tensor | None = None

    def param_groups(self, weight_decay: float) -> list[dict]:
        groups = [{"params": list(self.model.vq.parameters()), "weight_decay": weight_decay}]
        if self.model.discriminator is not None:
            groups.append({"params": list(self.model.discriminator.parameters()), "weight_decay": 0.0,
                           "lr": self.cfg.optim.lr * self.cfg.discriminator.lr_ratio})
        return groups

    def begin_step(self, step: int) -> None:
        pass

    def micro_step(self, engine, step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = next(self.reader).to(self.device)
        total, terms, fwd = engine(pixels, step, self.cfg.loss)
        ids = fwd.ids.detach()
        self.health.update(ids)
        self.recent = fwd.latents.detach().permute(0, 2, 3, 1).reshape(-1, fwd.latents.shape[1])
        n = float(len(pixels))
        values = [terms[t].detach().double() * n if t in terms else torch.zeros((), dtype=torch.float64,
                                                                                 device=self.device) for t in _TERMS]
        quality = psnr(fwd.reconstruction.detach(), pixels).double().sum()
        return total, torch.stack([*values, quality, torch.tensor(n, dtype=torch.float64, device=self.device)])

    def _global_counts(self) -> torch.Tensor:
        counts = self.health.counts().to(self.device)
        dist.all_reduce(counts)
        return counts

    def metrics(self, stats: list[float], samples: int, elapsed: float) -> dict:
        *terms, quality, n = stats
        usage, perplexity = usage_and_perplexity(self._global_counts().cpu())
        out = {t: v / n for t, v in zip(_TERMS, terms) if v}
        out.update(psnr_db=quality / n, codebook_usage=usage, codebook_perplexity=perplexity)
        if out["codebook_usage"] < 0.1:
            out["codebook_collapse"] = True  # shown in metrics.jsonl, not hidden
        return out

    def after_update(self, engine, step: int) -> dict:
        every = self.cfg.codebook.reinit_every
        if not every or step % every:
            return {}
        dead = torch.nonzero(self._global_counts() == 0).flatten()
        moved = reinit_dead_codes(engine.module.vq.quantize.embedding, dead, self.recent if self.rank == 0 else None,
                                  torch.Generator().manual_seed(self.cfg.seed * 7919 + step),
                                  share=lambda rows: dist.broadcast(rows, src=0))
        if moved:  # under bf16 the optimizer's fp32 master would overwrite them at the next step
            write_rows_through(engine, "vq.quantize.embedding.weight", dead)
        return {"codes_reinitialised": moved} if moved else {}

    def state_dict(self) -> dict:
        mine = {"reader": self.reader.state_dict(), "health": self.health.state_dict()}
        every = [None] * self.world
        dist.all_gather_object(every, mine)
        return {"ranks": every}

    def load_state_dict(self, state: dict) -> None:
        if len(state["ranks"]) != self.world:
            raise ValueError(f"this VQ-GAN run was checkpointed on {len(state['ranks'])} ranks; resume it on as many "
                             f"(now {self.world})")
        mine = state["ranks"][self.rank]
        self.reader.load_state_dict(mine["reader"])
        self.health.load_state_dict(mine["health"])

    def epoch(self) -> int:
        return self.reader.epoch

    def close(self) -> None:
        pass


def train_vqgan(cfg: VQGANConfig):
    """Trains (or resumes) the run; returns training.engine.TrainResult."""
    return in_process_group(locked, cfg.run_dir, _train_vqgan, cfg)


def _train_vqgan(cfg: VQGANConfig):
    with kernels(cfg.deterministic, cfg.engine.threads):
        rank, world = dist.get_rank(), dist.get_world_size()
        device = current_device()
        rank0_decides(_inspect, cfg)
        resume = resume_state(cfg.run_dir)
        layout = Layout.plan(cfg.data.global_batch_size, cfg.data.micro_batch_size, world, world)
        bf16 = wants_bf16(cfg.engine.precision, device)
        seed_all(cfg.seed, rank)
        vq = build_vq(cfg.model)
        disc = PatchDiscriminator(3, cfg.discriminator.width, cfg.discriminator.layers) \
            if cfg.loss.adversarial_start and cfg.loss.adversarial else None
        module = VQGANWithDiscriminator(vq, disc)
        if rank == 0:
            write_config(cfg.run_dir, cfg)
        task = VQGANTask(cfg, module, layout, rank, world, device)
        return run_loop(cfg, task, resume, False, device, bf16)


def _inspect(cfg: VQGANConfig) -> None:
    list_files(cfg.data.images, ".tar")  # no shards: a clear error before any work


def vq_from_checkpoint(checkpoint: str) -> VQModel:
    """The VQModel of a VQ-GAN training checkpoint (its own weights; the discriminator dropped)."""
    trained = Checkpoint.at(checkpoint)
    vq = build_vq(trained.config(parse_vqgan_config).model)
    weights = {k[len("vq."):]: v for k, v in trained.state_dict(ema=False).items() if k.startswith("vq.")}
    vq.load_state_dict(weights, strict=True)
    return vq.eval()


def export_vqgan(checkpoint: str, output: str) -> str:
    """A VQModel folder (safetensors) that `amused pretokenize --vqgan` and diffusers load."""
    if file_exists(join(output, VQ_COMPLETE)):
        raise FileExistsError(f"{output} already holds a model; choose another --output")
    return publish_folder(output, lambda staging: vq_from_checkpoint(checkpoint).save_pretrained(
        staging, safe_serialization=True), VQ_COMPLETE)
