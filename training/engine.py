"""`train(cfg)`: the DeepSpeed training loop, the same under torchrun, the deepspeed
launcher, Ray Train and a plain in-process call (one rank).

Start-up checks everything that depends on the data, the model and the world size
before any step. A rerun on a run folder resumes from its newest intact checkpoint (its
files checked against the checksums in its marker; a damaged one is named and the one
before it taken); on another number of ranks through DeepSpeed's universal checkpoint
conversion; each rank checks the checkpoint files it wrote. RUN_DIR/train.lock is held
for the whole training, so a second training of the folder stops before it changes
anything (pipeline/runlock.py): by rank 0 under torchrun, the deepspeed launcher or in
process; under Ray Train by the launching driver (training/launch.py), whose host does
not change from one run to the next as rank 0's node does, so a dead run's lock is known
stale there and taken over.

Non-finite policy: every micro-step's loss is checked on all ranks. A step in which any
rank saw a non-finite loss is skipped: its bad micro-steps contribute no gradient and
the optimizer step runs at learning rate 0, so the weights do not change (the data and
the schedule move on), and it is counted in `metrics.jsonl` (`nonfinite_skipped`).
`engine.max_nonfinite_in_row` such steps in a row stop the run with an error. A
non-finite gradient norm after a finite loss counts the same way (ZeRO 1/2 skip that
update themselves).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from amused.pipeline.shards import ModelIdentity, TokenDataset, read_empty_prompt
from amused.plumbing.fsio import read_json, write_json_atomic
from amused.plumbing.runlock import FolderLock, FolderLocked
from amused.plumbing.storage import VQGAN_SUBFOLDERS
from amused.training import checkpoint as ckpt
from amused.training.config import TrainConfig, dump_config
from amused.training.ema import EMA
from amused.training.uvit.data import ShardReader
from amused.training.uvit.model import build_model, enable_activation_checkpointing, mask_id, param_groups, token_grid
from amused.training.uvit.objective import LossParts, draw_masks, masked_loss


class NonFiniteError(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: str
    step: int
    resumed_from: int | None
    checkpoint: str | None
    last_metrics: dict = field(default_factory=dict)

    FILE = "result.json"

    def write(self) -> None:
        write_json_atomic(str(Path(self.run_dir) / self.FILE), dataclasses.asdict(self))

    @classmethod
    def read(cls, run_dir: str) -> "TrainResult":
        return cls(**read_json(str(Path(run_dir) / cls.FILE)))


@dataclass
class Layout:
    """How the global batch splits over ranks, lanes and micro-steps."""

    world_size: int
    lanes: int
    lane_batch: int  # rows per lane per micro-step
    accum: int

    @classmethod
    def plan(cls, global_batch: int, micro_batch: int, world_size: int, lanes: int) -> "Layout":
        if lanes % world_size:
            raise ValueError(f"data.lanes={lanes} must be a multiple of the number of ranks ({world_size})")
        per_rank = lanes // world_size
        if micro_batch % per_rank:
            raise ValueError(f"data.micro_batch_size={micro_batch} must be a multiple of the lanes per rank "
                             f"({lanes} lanes / {world_size} ranks = {per_rank})")
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"data.global_batch_size={global_batch} must be a multiple of micro_batch_size x ranks "
                             f"({micro_batch} x {world_size})")
        return cls(world_size, lanes, micro_batch // per_rank, global_batch // (micro_batch * world_size))


# ---------------------------------------------------------------- distributed set-up

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> bool:
    """Joins the launcher's process group (or makes a one-rank one); True if we made it."""
    import deepspeed

    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        created = True
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return created


def current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def wants_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def rank0_decides(fn, *args):
    """Runs `fn` on rank 0 only (file-system checks) and gives every rank its result or
    its error, so all ranks fail the same way before any work."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn(*args))
        except FolderLocked as exc:  # stays itself: "busy" is not "wrongly set up"
            box[0] = ("locked", str(exc))
        except Exception as exc:  # any failure must reach the other ranks, or they wait forever
            box[0] = ("error", f"{exc}" if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise ValueError(value)
    if status == "locked":
        raise FolderLocked(value)
    return value


def train_lock(run_dir: str) -> FolderLock:
    return FolderLock(str(Path(run_dir) / "train.lock"))


def locked(run_dir: str, fn, *args):
    """`fn(*args)` with rank 0 holding RUN_DIR/train.lock, taken before anything in the
    folder changes; every rank fails alike when another process holds it."""
    lock = train_lock(run_dir)
    rank0_decides(lock.acquire)
    try:
        return fn(*args)
    finally:
        lock.release()  # a no-op on the other ranks


# ---------------------------------------------------------------- start-up checks

def _check_identity(what: str, configured: str | None, subfolders: tuple[str, ...], recorded) -> None:
    if configured is None:
        return
    mine = ModelIdentity.of(configured, subfolders)
    if mine.sha256 != recorded.sha256:
        raise ValueError(f"model.{what} = {configured} is not the model the token dataset was made with "
                         f"(the manifest names {recorded.path}, sha256 {recorded.sha256[:12]}...; this folder "
                         f"hashes to {mine.sha256[:12]}...)")


def _inspect_run(cfg: TrainConfig) -> dict:
    """Rank 0: the dataset (its manifest read once, for every rank), the tokenizer identities,
    the empty prompt and the checkpoint to resume."""
    try:
        dataset = TokenDataset(cfg.data.dataset)
    except FileNotFoundError:
        raise ValueError(f"data.dataset: no token dataset at {cfg.data.dataset} (manifest.json missing)") from None
    spec = dataset.spec
    _check_identity("vqgan", cfg.model.vqgan, VQGAN_SUBFOLDERS, spec.image_tokenizer)
    _check_identity("text_encoder", cfg.model.text_encoder, (), spec.text_encoder)
    empty = read_empty_prompt(cfg.data.dataset)
    if empty is None and cfg.objective.cond_drop_prob > 0:
        if cfg.model.text_encoder is None:
            raise ValueError(f"objective.cond_drop_prob > 0 needs the empty prompt's embeddings: {cfg.data.dataset} "
                             "has no empty_prompt.safetensors; set model.text_encoder")
        from amused.tokenizer.text import TextEncoder

        out = TextEncoder.from_pretrained(cfg.model.text_encoder, device="cpu").encode([""])
        empty = {"hidden_states": out.hidden_states[0].half().numpy(), "pooled": out.pooled[0].half().numpy()}
    return {"dataset": dataset, "empty": empty}


def resume_state(run_dir: str) -> dict | None:
    """Every rank: the trainer state of the newest complete checkpoint whose files all
    match its marker (training/checkpoint.py). Each rank hashes its own share of a
    candidate's files, the verdicts are gathered, and the newest step every rank found
    intact is taken; rank 0 names what is damaged and sets it aside."""
    rank, world = dist.get_rank(), dist.get_world_size()
    verdicts: dict[int, list[str] | None] = {}
    for step in rank0_decides(ckpt.resume_candidates, run_dir):
        folder = ckpt.checkpoints_dir(run_dir) / ckpt.tag(step)
        try:
            mine = ckpt.damage(folder, rank=rank, world=world)
        except Exception as exc:  # reported, not raised: the other ranks wait in the gather
            mine = [f"{folder}: rank {rank} could not check its files: {type(exc).__name__}: {exc}"]
        every: list = [None] * world
        dist.all_gather_object(every, mine)
        lines = [line for part in every if part for line in part]
        # No checksums is a fact of the marker, the same on every rank.
        verdicts[step] = None if all(part is None for part in every) else list(dict.fromkeys(lines))
        if not verdicts[step]:
            break
    return rank0_decides(ckpt.resume_from, run_dir, verdicts)


def _check_model(model, spec) -> None:
    grid = token_grid(model)
    problems = []
    if tuple(spec.token_grid) != grid:
        problems.append(f"token grid {tuple(spec.token_grid)} in the dataset, {grid} in the model")
    if spec.codebook_size != model.config.codebook_size:
        problems.append(f"codebook {spec.codebook_size} in the dataset, {model.config.codebook_size} in the model")
    if spec.text_hidden_size != model.config.encoder_hidden_size:
        problems.append(f"text hidden size {spec.text_hidden_size} vs encoder_hidden_size "
                        f"{model.config.encoder_hidden_size}")
    if spec.text_pooled_dim != model.config.cond_embed_dim:
        problems.append(f"pooled text size {spec.text_pooled_dim} vs cond_embed_dim {model.config.cond_embed_dim}")
    if problems:
        raise ValueError("the token dataset does not fit model.preset/model.pretrained: " + "; ".join(problems))


# ---------------------------------------------------------------- the engine

def _lr_lambda(optim, total_steps: int):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _deepspeed_config(cfg: TrainConfig, layout: Layout, bf16: bool, universal: bool) -> dict:
    return {
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": layout.accum,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        # A torch AdamW: DeepSpeed's own needs a C++ build and behaves the same.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 62,
        "checkpoint": {"load_universal": universal},
    }


class MetricsLog:
    """Rank 0's metrics.jsonl (and optional TensorBoard / wandb)."""

    def __init__(self, run_dir: str, cfg, resume_step: int, config: dict):
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.path.exists():
            # Lines past the checkpoint come from steps that are about to be redone.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self.fh = open(self.path, "a")
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("log.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, dir=run_dir, config=config, resume="allow",
                                    id=Path(run_dir).resolve().name)

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def train(cfg: TrainConfig, launcher_holds_lock: bool = False) -> TrainResult:
    """Trains (or resumes) the run; `launcher_holds_lock`: the process that started the
    ranks holds RUN_DIR/train.lock (Ray Train's driver), so rank 0 does not take it."""
    if launcher_holds_lock:
        return in_process_group(_train, cfg)
    return in_process_group(locked, cfg.run_dir, _train, cfg)


def in_process_group(fn, *args):
    """Runs `fn(*args)` inside the launcher's process group (or a one-rank one)."""
    created = init_distributed()
    try:
        return fn(*args)
    finally:
        if dist.is_initialized():
            dist.barrier()
            # Ranks of a launch end their group (exiting with it alive sometimes aborts).
            # A one-rank group made here stays for the next in-process call: DeepSpeed
            # caches its groups module-wide and cannot be initialised twice in a process.
            if created and dist.get_world_size() > 1:
                dist.destroy_process_group()


class Task(Protocol):
    """What a model family brings to the loop (the U-ViT here, the VQ-GAN in
    training/vqgan.py); the loop owns DeepSpeed, the schedule, the non-finite policy,
    EMA, metrics, checkpoints and resume."""

    model: torch.nn.Module
    layout: Layout
    stats_size: int  # length of the per-micro-step statistics vector
    plot: tuple[str, ...]  # metrics drawn in metrics.png

    def param_groups(self, weight_decay: float) -> list[dict]: ...
    def begin_step(self, step: int) -> None: ...
    def micro_step(self, engine, step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def metrics(self, stats: list[float], samples: int, elapsed: float) -> dict: ...
    def after_update(self, engine, step: int) -> dict: ...
    def state_dict(self) -> dict: ...  # every rank calls it at a checkpoint (it may be a collective)
    def load_state_dict(self, state: dict) -> None: ...
    def epoch(self) -> int: ...
    def close(self) -> None: ...


class UViTTask:
    """Masked-token training of the U-ViT on token shards."""

    plot = ("loss", "masked_accuracy", "lr")
    stats_size = 3  # cross-entropy sum, correct, masked count (this rank)

    def __init__(self, cfg: TrainConfig, model, dataset: TokenDataset, layout: Layout, rank: int, world: int,
                 device: torch.device, empty: dict | None, dtype: torch.dtype):
        self.cfg, self.model, self.layout, self.device, self.dtype = cfg, model, layout, device, dtype
        self.world = world
        self.reader = ShardReader(dataset, lanes=layout.lanes, rank=rank, world_size=world,
                                  lane_batch=layout.lane_batch, accum=layout.accum, window_rows=cfg.data.window_rows,
                                  seed=cfg.data.seed, workers=cfg.data.workers, prefetch=cfg.data.prefetch,
                                  default_aesthetic=cfg.data.default_aesthetic, pin_memory=device.type == "cuda")
        self.empty = {k: torch.as_tensor(v).to(device) for k, v in empty.items()} if empty else None
        self.grid = token_grid(model)

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self.model, weight_decay)

    def begin_step(self, step: int) -> None:
        lay, obj = self.layout, self.cfg.objective
        self.masks = draw_masks(self.cfg.seed, step, lay.lanes, lay.lane_batch * lay.accum, self.grid,
                                obj.rect_mask_prob, obj.cond_drop_prob)
        self.scale = self.world * lay.accum / max(1, self.masks.total_masked())

    def micro_step(self, engine, step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(k * self.layout.lane_batch, (k + 1) * self.layout.lane_batch)
        masked, drop = self.masks.micro(self.reader.lanes, rows)
        parts = _forward(engine, next(self.reader), masked, drop, self.empty, self.dtype, self.device,
                         self.cfg.objective.label_smoothing, self.scale)
        stats = torch.stack([parts.ce_sum.double(), parts.correct.double(),
                             torch.tensor(parts.count, dtype=torch.float64, device=self.device)])
        return parts.loss, stats

    def metrics(self, stats: list[float], samples: int, elapsed: float) -> dict:
        ce, correct, count = stats
        return {"loss": ce / count if count else None, "masked_accuracy": correct / count if count else None,
                "tokens_per_s": samples * self.grid[0] * self.grid[1] / elapsed}

    def after_update(self, engine, step: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(), "lanes": self.layout.lanes}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])

    def epoch(self) -> int:
        return self.reader.epoch

    def close(self) -> None:
        self.reader.close()


def _train(cfg: TrainConfig) -> TrainResult:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = current_device()
    info = rank0_decides(_inspect_run, cfg)
    dataset, resume = info["dataset"], resume_state(cfg.run_dir)
    spec = dataset.spec
    lanes = resume["lanes"] if resume else (cfg.data.lanes or world)
    if resume and cfg.data.lanes and cfg.data.lanes != resume["lanes"]:
        raise ValueError(f"data.lanes={cfg.data.lanes} but the run was started with {resume['lanes']} lanes")
    layout = Layout.plan(cfg.data.global_batch_size, cfg.data.micro_batch_size, world, lanes)
    bf16 = wants_bf16(cfg.engine.precision, device)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.preset, cfg.model.pretrained)
    _check_model(model, spec)
    if rank == 0:
        (Path(cfg.run_dir) / "config.yaml").write_text(dump_config(cfg))
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)
    task = UViTTask(cfg, model, dataset, layout, rank, world, device, info["empty"],
                    torch.bfloat16 if bf16 else torch.float32)
    universal = bool(resume) and resume["world_size"] != world
    return run_loop(cfg, task, resume, universal, device, bf16)


def run_loop(cfg, task: Task, resume: dict | None, universal: bool, device: torch.device, bf16: bool) -> TrainResult:
    """The training loop over any Task. `cfg` provides run_dir, steps, seed, data.global_batch_size,
    data.micro_batch_size and the optim, engine, ema, checkpoint and log sections."""
    import deepspeed

    rank = dist.get_rank()
    layout = task.layout
    if resume and resume["global_batch_size"] != cfg.data.global_batch_size:
        raise ValueError(f"data.global_batch_size={cfg.data.global_batch_size} but the run's checkpoints were made "
                         f"with {resume['global_batch_size']}: a resumed run must keep its batch")
    # Lets DeepSpeed's universal conversion read checkpoints of this model.
    task.model.universal_checkpoint_info = {"universal_checkpoint_version": 0.4}
    optimizer = torch.optim.AdamW(task.param_groups(cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.optim, cfg.steps))
    engine, _, _, _ = deepspeed.initialize(model=task.model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=_deepspeed_config(cfg, layout, bf16, universal))
    ema = EMA(engine.module, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled and rank == 0 else None

    start_step, in_row = 0, 0
    if resume:
        start_step = resume["step"]
        root = ckpt.checkpoints_dir(cfg.run_dir)
        load_dir = rank0_decides(ckpt.to_universal, cfg.run_dir, start_step) if universal else root
        engine.load_checkpoint(str(load_dir), tag=ckpt.tag(start_step), load_module_strict=True)
        task.load_state_dict(resume)
        in_row = resume["nonfinite_in_row"]
        folder = root / ckpt.tag(start_step)
        if ema is not None:
            ema.load(str(folder / ckpt.EMA_WEIGHTS))
        if universal or not ckpt.restore_rank_rng(folder, rank):
            torch.manual_seed(cfg.seed * 7919 + start_step * 104729 + rank)

    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    log = MetricsLog(cfg.run_dir, cfg.log, start_step, cfg.to_json()) if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=start_step, unit="step", desc="train",
               disable=rank != 0 or not cfg.log.progress)
    stats = torch.zeros(task.stats_size, dtype=torch.float64, device=device)
    skipped = 0  # steps skipped in the interval (every rank agrees)
    interval_start, interval_steps = time.monotonic(), 0
    last_metrics: dict = {}
    events: dict = {}
    saved_at = start_step if resume else None

    step = start_step
    while step < cfg.steps:
        task.begin_step(step)
        bad = False
        for k in range(layout.accum):
            loss, micro_stats = task.micro_step(engine, step, k)
            finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                bad = True
                loss = torch.stack([p.sum() for p in trainable]).sum() * 0.0
            else:
                stats += micro_stats
            engine.backward(loss)
            boundary = k == layout.accum - 1
            if boundary:
                lr = scheduler.get_last_lr()[0]
                own_norm = _grad_norm(trainable) if engine.zero_optimization_stage() == 0 else None
                if bad or (own_norm is not None and not math.isfinite(own_norm)):
                    bad = True
                    for group in engine.optimizer.param_groups:
                        group["lr"] = 0.0
            # DeepSpeed counts micro-steps in step() and updates only at the accumulation boundary.
            engine.step()
        grad_norm = own_norm if own_norm is not None else engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad = True
        in_row = in_row + 1 if bad else 0
        skipped += int(bad)
        if not bad:
            for key, value in task.after_update(engine, step + 1).items():
                events[key] = events.get(key, 0) + value
            if ema is not None:
                ema.update(engine.module)
        step += 1
        interval_steps += 1
        bar.update(1)
        if in_row >= cfg.engine.max_nonfinite_in_row:
            last = ckpt.complete_steps(cfg.run_dir)
            raise NonFiniteError(
                f"stopping at step {step}: {in_row} steps in a row had a non-finite loss or gradient "
                f"(engine.max_nonfinite_in_row={cfg.engine.max_nonfinite_in_row}); the last good checkpoint is "
                f"{ckpt.tag(last[-1]) if last else 'none'}. Check the data (NaN embeddings?) and the learning rate.")

        if step % cfg.log.every == 0 or step == cfg.steps:
            dist.all_reduce(stats)
            elapsed = time.monotonic() - interval_start
            samples = interval_steps * cfg.data.global_batch_size
            last_metrics = {"step": step, "epoch": task.epoch(), **task.metrics(stats.tolist(), samples, elapsed),
                            "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples / elapsed,
                            "nonfinite_skipped": skipped, **events}
            if log:
                log.write(last_metrics)
                bar.set_postfix({k: last_metrics[k] for k in task.plot[:2]}, refresh=False)
            stats.zero_()
            interval_start, interval_steps, skipped, events = time.monotonic(), 0, 0, {}

        if step % cfg.checkpoint.every == 0 or step == cfg.steps:
            save_checkpoint(engine, cfg, step, task, ema, in_row)
            saved_at = step
    bar.close()
    if log:
        log.close()
        plot_metrics(cfg.run_dir, task.plot)
    task.close()
    path = str(ckpt.checkpoints_dir(cfg.run_dir) / ckpt.tag(saved_at)) if saved_at is not None else None
    result = TrainResult(run_dir=cfg.run_dir, step=step, resumed_from=start_step if resume else None,
                         checkpoint=path, last_metrics=last_metrics)
    if rank == 0:
        result.write()
    return result


def _forward(engine, batch: dict, masked: torch.Tensor, drop: torch.Tensor, empty: dict | None, dtype,
             device, label_smoothing: float, scale: float) -> LossParts:
    """One micro-batch: mask, swap dropped captions for the empty prompt, run, score."""
    batch = {n: t.to(device, non_blocking=True) for n, t in batch.items()}
    masked, drop = masked.to(device), drop.to(device)
    hidden, pooled = batch["text_hidden_states"], batch["text_pooled"]
    if drop.any():
        hidden = torch.where(drop[:, None, None], empty["hidden_states"], hidden)
        pooled = torch.where(drop[:, None], empty["pooled"], pooled)
    tokens = batch["image_tokens"]
    logits = engine(tokens.masked_fill(masked, mask_id(engine.module)), hidden.to(dtype), pooled.to(dtype),
                    batch["micro_conds"])
    return masked_loss(logits, tokens, masked, label_smoothing, scale)


def plot_metrics(run_dir: str, names: tuple[str, ...] = UViTTask.plot) -> Path:
    """RUN_DIR/metrics.png: the task's main metrics (the U-ViT's: loss, masked-token
    accuracy, learning rate) against step."""
    from amused.plumbing.plots import line_plots

    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    series = {name: [(r["step"], r[name]) for r in records if r.get(name) is not None] for name in names}
    path = Path(run_dir) / "metrics.png"
    line_plots(series).save(path)
    return path


def _grad_norm(params: list[torch.Tensor]) -> float:
    """Gradient norm where DeepSpeed reports none (stage 0). Its backward at the
    accumulation boundary has already all-reduced the gradients, so every rank holds the
    averaged gradient and the local norm is the global one."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def save_checkpoint(engine, cfg, step: int, task: Task, ema: EMA | None, in_row: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    root = ckpt.checkpoints_dir(cfg.run_dir)
    folder = root / ckpt.tag(step)
    engine.save_checkpoint(str(root), tag=ckpt.tag(step), save_latest=False)
    ckpt.write_rank_files(folder, rank)
    task_state = task.state_dict()
    if rank == 0:
        if ema is not None:
            ema.save(str(folder / ckpt.EMA_WEIGHTS))
        (folder / "config.yaml").write_text(dump_config(cfg))
        state = {"step": step, "world_size": world, "global_batch_size": cfg.data.global_batch_size,
                 "nonfinite_in_row": in_row, **task_state}
        (folder / "trainer.json").write_text(json.dumps(state))
    # The gather is the barrier: rank 0 has every rank's checksums only once all files are written.
    every: list = [None] * world
    dist.all_gather_object(every, ckpt.own_checksums(folder, rank))
    if rank == 0:
        ckpt.mark_complete(cfg.run_dir, step, cfg.checkpoint.keep, {k: v for part in every for k, v in part.items()})
