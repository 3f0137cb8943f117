"""The DeepSpeed training loop over a model's task (`run_loop`), the same under torchrun,
the deepspeed launcher, Ray Train and a plain in-process call (one rank). Each model's
room starts it: `training.uvit.task.train` (`amused train`), `training.vqgan.task.train_vqgan`.

Start-up checks everything that depends on the data, the model and the world size
before any step. A rerun on a run folder resumes from its newest intact checkpoint (its
files checked against the checksums in its marker; a damaged one is named and the one
before it taken; training/state.py); on another number of ranks through DeepSpeed's
universal checkpoint conversion; each rank checks the checkpoint files it wrote.
RUN_DIR/train.lock is held for the whole training, so a second training of the folder
stops before it changes anything (plumbing/runlock.py): by rank 0 under torchrun, the
deepspeed launcher or in process; under Ray Train by the launching driver
(training/launch.py), whose host does not change from one run to the next as rank 0's
node does, so a dead run's lock is known stale there and taken over.

One step of the loop: the train step (`train_step`), the non-finite policy
(`NonFinitePolicy`), the task's after-update work and the EMA for a good step, the
metrics line when its interval is due (`Interval`), the checkpoint when due.

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
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import deepspeed
import torch
import torch.distributed as dist

from amused.plumbing.determinism import deterministic_torch, machine_threads
from amused.plumbing.fsio import read_json, write_json_atomic
from amused.plumbing.storage import join
from amused.training import checkpoint as ckpt
from amused.training.config import OptimConfig
from amused.training.distributed import (
    Layout,
    rank0_decides,
)
from amused.training.ema import EMA
from amused.training.metrics_log import MetricsLog, plot_metrics
from amused.training.optim import build_optimizer, check_resume
from amused.training.progress import ProgressView
from amused.training.state import TrainState


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
        write_json_atomic(join(self.run_dir, self.FILE), dataclasses.asdict(self))

    @classmethod
    def read(cls, run_dir: str) -> "TrainResult":
        return cls(**read_json(join(run_dir, cls.FILE)))


class Task(Protocol):
    """What a model family brings to the loop (the U-ViT: training/uvit/task.py, the
    VQ-GAN: training/vqgan/task.py); the loop owns DeepSpeed, the schedule, the
    non-finite policy, EMA, metrics, checkpoints and resume."""

    name: str  # what its progress is shown as ("train", "vqgan")
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


# ---------------------------------------------------------------- the loop

def kernels(deterministic: bool, threads: int | None) -> AbstractContextManager:
    """What a training runs in, from its model on: with its `deterministic` setting,
    deterministic kernels and `threads` (engine.threads) torch threads (default: the CPUs
    this process may use; Ray Train's launcher gives its workers their CPUs), so that a
    rerun on the same machine writes the same bytes."""
    return deterministic_torch(threads or machine_threads()) if deterministic else nullcontext()


def run_loop(cfg, task: Task, resume: TrainState | None, universal: bool, device: torch.device,
             bf16: bool) -> TrainResult:
    """The training loop over any Task. `cfg` provides run_dir, steps, seed, data.global_batch_size,
    data.micro_batch_size and the optim, engine, ema, checkpoint and log sections."""
    rank = dist.get_rank()
    if resume and resume.global_batch_size != cfg.data.global_batch_size:
        raise ValueError(f"data.global_batch_size={cfg.data.global_batch_size} but the run's checkpoints were made "
                         f"with {resume.global_batch_size}: a resumed run must keep its batch")
    check_resume(cfg.optim, universal)
    engine = _deepspeed_engine(cfg, task, bf16, universal, device)
    if resume:
        _restore(engine, cfg, task, resume, universal)
    # After the restore: DeepSpeed's load links the parameters to their fp32 master pieces anew.
    ema = EMA.of(engine, cfg.ema.decay, cfg.ema.warmup, device) if cfg.ema.enabled else None
    if ema is not None and resume:
        ema.load(str(ckpt.local_copy(ckpt.step_folder(cfg.run_dir, resume.step)) / ckpt.EMA_WEIGHTS))
    start_step = resume.step if resume else 0
    policy = NonFinitePolicy(cfg.engine.max_nonfinite_in_row, resume.nonfinite_in_row if resume else 0)
    interval = Interval(cfg.log.every, cfg.steps, task.stats_size, device)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    log = MetricsLog(cfg.run_dir, cfg.log, start_step, cfg.to_json()) if rank == 0 else None
    # The same display the launching driver shows (a bar on a terminal, lines in a log).
    view = ProgressView(cfg.steps, task.name) if log and cfg.log.progress else None
    if view:
        view.show(log.progress.record)
    last_metrics: dict = {}
    saved_at = start_step if resume else None
    publisher = ckpt.Publisher(cfg.run_dir, cfg.checkpoint.keep, cfg.checkpoint.asynchronous)

    step = start_step
    try:
        while step < cfg.steps:
            outcome = train_step(engine, task, step, trainable, interval.stats)
            step += 1
            policy.record(outcome.bad, step, cfg.run_dir)
            events = {}
            if not outcome.bad:
                events = task.after_update(engine, step)
                if ema is not None:
                    ema.update()
            interval.count(outcome.bad, events)
            if log:
                log.tick(step)
            if interval.due(step):
                dist.all_reduce(interval.stats)
                last_metrics = interval.close(step, task, outcome, cfg.data.global_batch_size)
                if log:
                    log.write(last_metrics)
            if due(step, cfg.checkpoint.every, cfg.steps if cfg.checkpoint.at_end else None):
                started = time.monotonic()
                save_checkpoint(engine, cfg, step, task, ema, policy.in_row, publisher)
                # How long training stood still for it (the longest one of the interval), in the next
                # metrics line (asynchronous: the local write, plus any wait for the previous upload).
                interval.longest({"checkpoint_s": time.monotonic() - started})
                saved_at = step
            if view:
                view.show(log.progress.record)
    except Exception:
        publisher.settle()  # the checkpoint in flight gets its marker: a restart resumes from it
        raise
    publisher.wait()
    if view:
        view.close()
    if log:
        log.close()
        plot_metrics(cfg.run_dir, task.plot)
    task.close()
    path = ckpt.step_folder(cfg.run_dir, saved_at) if saved_at is not None else None
    result = TrainResult(run_dir=cfg.run_dir, step=step, resumed_from=start_step if resume else None,
                         checkpoint=path, last_metrics=last_metrics)
    if rank == 0:
        result.write()
    return result


def due(step: int, every: int, last: int | None) -> bool:
    """Metrics lines and checkpoints: every `every` steps and at the `last` step (if any)."""
    return step % every == 0 or step == last


def lr_factor(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The learning rate at a step as a fraction of `optim.lr`: linear warm-up, then
    constant or a cosine down to `optim.min_lr_ratio` at `total_steps`."""
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def deepspeed_config(cfg, layout: Layout, bf16: bool, universal: bool) -> dict:
    return {
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": layout.accum,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        # Our own optimizer (training/optim.py): DeepSpeed's FusedAdam needs a CUDA build of its own.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 62,
        "checkpoint": {"load_universal": universal},
    }


def _deepspeed_engine(cfg, task: Task, bf16: bool, universal: bool, device: torch.device):
    """The task's model under DeepSpeed with the `optim.name` optimizer and the lr schedule."""
    # Lets DeepSpeed's universal conversion read checkpoints of this model.
    task.model.universal_checkpoint_info = {"universal_checkpoint_version": 0.4}
    optimizer = build_optimizer(cfg.optim, task.param_groups(cfg.optim.weight_decay), device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, cfg.steps))
    engine, _, _, _ = deepspeed.initialize(model=task.model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, task.layout, bf16, universal))
    return engine


def _restore(engine, cfg, task: Task, resume: TrainState, universal: bool) -> None:
    """Every rank: DeepSpeed's state, the task's and this rank's RNG from the
    local copy of the checkpoint (each rank's share fetched by `resume_state`; the
    universal form converted by rank 0 and fetched whole by every rank). A rank the
    checkpoint did not have, or any rank after a universal conversion, gets a seed of
    its own instead of its RNG state."""
    rank = dist.get_rank()
    folder = ckpt.local_copy(ckpt.step_folder(cfg.run_dir, resume.step))
    load_from = folder
    if universal:
        converted = rank0_decides(ckpt.to_universal, cfg.run_dir, resume.step)
        load_from = ckpt.local_copy(ckpt.Checkpoint.at(converted).checked().folder)
    engine.load_checkpoint(str(load_from.parent), tag=ckpt.tag(resume.step), custom_load_fn=_load_module)
    task.load_state_dict(resume.task)
    if universal or not ckpt.restore_rank_rng(folder, rank):
        torch.manual_seed(cfg.seed * 7919 + resume.step * 104729 + rank)


def _load_module(src: dict, dst: torch.nn.Module) -> None:
    """DeepSpeed's module load (not in the universal form, which restores the optimizer's
    parameters only): a checkpoint holds the trained parameters only (`save_checkpoint`),
    so frozen ones (a LoRA run's base, from model.pretrained) may be missing; a trained
    one missing or a name the model lacks is an error."""
    frozen = {name for name, p in dst.named_parameters() if not p.requires_grad}
    loaded = dst.load_state_dict(src, strict=False)
    missing = sorted(set(loaded.missing_keys) - frozen)
    if missing or loaded.unexpected_keys:
        raise ValueError(f"the checkpoint's weights do not fit the model: {len(missing)} trained parameter(s) missing "
                         f"(e.g. {missing[:2]}), {len(loaded.unexpected_keys)} unexpected "
                         f"(e.g. {loaded.unexpected_keys[:2]})")


# ---------------------------------------------------------------- one step

@dataclass
class StepOutcome:
    bad: bool  # some rank saw a non-finite loss or gradient: the weights did not change
    lr: float
    grad_norm: float | None


def train_step(engine, task: Task, step: int, trainable: list[torch.Tensor], stats: torch.Tensor) -> StepOutcome:
    """One optimizer step over the task's micro-steps; adds the finite micro-steps'
    statistics to `stats`. A micro-step whose loss is non-finite on any rank contributes
    no gradient, and a step with one (or with a non-finite gradient norm) runs at
    learning rate 0."""
    task.begin_step(step)
    bad = False
    for k in range(task.layout.accum):
        loss, micro_stats = task.micro_step(engine, step, k)
        if _finite_on_every_rank(loss):
            stats += micro_stats
        else:
            bad = True
            # A zero that reaches every parameter, so DeepSpeed's gradient hooks run as always.
            loss = torch.stack([p.sum() for p in trainable]).sum() * 0.0
        engine.backward(loss)
        if k == task.layout.accum - 1:
            lr = engine.lr_scheduler.get_last_lr()[0]
            own_norm = _grad_norm(trainable) if engine.zero_optimization_stage() == 0 else None
            if bad or (own_norm is not None and not math.isfinite(own_norm)):
                bad = True
                for group in engine.optimizer.param_groups:
                    group["lr"] = 0.0
        # DeepSpeed counts micro-steps in step() and updates only at the accumulation boundary.
        engine.step()
    grad_norm = own_norm if own_norm is not None else engine.get_global_grad_norm()
    grad_norm = None if grad_norm is None else float(grad_norm)
    return StepOutcome(bad or (grad_norm is not None and not math.isfinite(grad_norm)), lr, grad_norm)


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.item() >= 1


def _grad_norm(params: list[torch.Tensor]) -> float:
    """Gradient norm where DeepSpeed reports none (stage 0). Its backward at the
    accumulation boundary has already all-reduced the gradients, so every rank holds the
    averaged gradient and the local norm is the global one."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


@dataclass
class NonFinitePolicy:
    """Skipped steps (see `train_step`) are tolerated until `limit` come in a row; the
    count survives a resume (it is part of the checkpoint's TrainState)."""

    limit: int
    in_row: int = 0

    def record(self, bad: bool, step: int, run_dir: str) -> None:
        """After step `step`: counts it, and stops the run with NonFiniteError at the limit."""
        self.in_row = self.in_row + 1 if bad else 0
        if self.in_row >= self.limit:
            last = ckpt.Checkpoint.latest(run_dir)
            raise NonFiniteError(
                f"stopping at step {step}: {self.in_row} steps in a row had a non-finite loss or gradient "
                f"(engine.max_nonfinite_in_row={self.limit}); the last good checkpoint is "
                f"{last.name if last else 'none'}. Check the data (NaN embeddings?) and the learning rate.")


# ---------------------------------------------------------------- metrics

class Interval:
    """What one metrics line covers: its steps, how many were skipped, the task's
    statistics (summed over micro-steps; `stats`) and after-update events, and its time."""

    def __init__(self, every: int, last_step: int, stats_size: int, device: torch.device,
                 clock: Callable[[], float] = time.monotonic):
        self.every, self.last_step, self.clock = every, last_step, clock
        self.stats = torch.zeros(stats_size, dtype=torch.float64, device=device)
        self._start()

    def _start(self) -> None:
        self.steps, self.skipped, self.events, self.started = 0, 0, {}, self.clock()
        self.stats.zero_()

    def count(self, bad: bool, events: dict) -> None:
        self.steps += 1
        self.skipped += int(bad)
        self.add(events)

    def add(self, events: dict) -> None:
        """Counts summed over the interval, reported under their names in its metrics line."""
        for key, value in events.items():
            self.events[key] = self.events.get(key, 0) + value

    def longest(self, durations: dict) -> None:
        """Durations reported as the longest over the interval, under their names."""
        for key, value in durations.items():
            self.events[key] = max(self.events.get(key, value), value)

    def due(self, step: int) -> bool:
        return due(step, self.every, self.last_step)

    def close(self, step: int, task: Task, last: StepOutcome, global_batch_size: int) -> dict:
        """The metrics line at `step` (`stats` already summed over the ranks); starts the next interval."""
        elapsed = self.clock() - self.started
        samples = self.steps * global_batch_size
        record = {"step": step, "epoch": task.epoch(), **task.metrics(self.stats.tolist(), samples, elapsed),
                  "lr": last.lr, "grad_norm": last.grad_norm, "samples_per_s": samples / elapsed,
                  "nonfinite_skipped": self.skipped, **self.events}
        self._start()
        return record


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(engine, cfg, step: int, task: Task, ema: EMA | None, in_row: int,
                    publisher: ckpt.Publisher) -> None:
    """Every rank writes its files into the checkpoint's local copy, then hands it to
    `publisher` (hashing, upload, the marker): in the background when asynchronous, once
    the previous checkpoint's publishing is done."""
    rank, world = dist.get_rank(), dist.get_world_size()
    publisher.wait()
    folder = ckpt.local_copy(ckpt.step_folder(cfg.run_dir, step))
    ckpt.clear_own(folder, rank)
    # Frozen parameters (a LoRA run's base) come from model.pretrained, not the checkpoint.
    engine.save_checkpoint(str(folder.parent), tag=ckpt.tag(step), save_latest=False, exclude_frozen_parameters=True)
    ckpt.write_rank_files(folder, rank)
    task_state = task.state_dict()
    if ema is not None:
        ema.save(str(folder / ckpt.EMA_WEIGHTS))  # every rank: gathered to rank 0, which writes it
    if rank == 0:
        ckpt.write_config(folder, cfg)
        state = TrainState(step=step, world_size=world, global_batch_size=cfg.data.global_batch_size,
                           nonfinite_in_row=in_row, task=task_state)
        write_json_atomic(str(folder / ckpt.TRAINER), state.to_dict())
    publisher.submit(step)
