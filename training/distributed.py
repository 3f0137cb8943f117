"""Distributed set-up shared by every training: how a batch splits over ranks, the
process group a training runs in, and rank-0 decisions every rank shares.

A training joins the group its launcher made (torchrun or the deepspeed launcher: the
launcher's RANK, WORLD_SIZE, MASTER_ADDR/PORT and LOCAL_RANK; Ray Train: a group it
already initialised) or, called in a plain process, makes a one-rank group of its own
that lives only as long as the call (`process_group`), without writing RANK, MASTER_PORT
and the like into the process environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

from amused.plumbing.runlock import FolderLock, FolderLocked
from amused.plumbing.storage import join


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


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """`values` in os.environ for the block only, as they were before afterwards."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def process_group() -> Iterator[None]:
    """The block runs in the launcher's process group, or in a one-rank group made for
    it and destroyed after it. Every rank meets at a barrier on the way out; a group
    joined from the launcher's environment is ended here too (exiting with it alive
    sometimes aborts), one that Ray Train made is left to Ray."""
    ray_made = dist.is_initialized()
    launched = ray_made or "RANK" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not launched:
        # An in-process store: no port, no rendezvous; nothing outside this process joins.
        dist.init_process_group(_backend(), store=dist.HashStore(), rank=0, world_size=1)
    try:
        # DeepSpeed's engine reads its local rank from LOCAL_RANK (and refuses to start
        # without it), so a one-rank group sets it for the block and no longer.
        with _environ(LOCAL_RANK=os.environ.get("LOCAL_RANK", str(local_rank))):
            deepspeed.init_distributed(dist_backend=_backend())
            yield
    finally:
        if dist.is_initialized():
            dist.barrier()
            if not ray_made:
                # DeepSpeed's destroy also drops the groups it cached, so a later call in
                # this process starts from nothing.
                deepspeed.comm.destroy_process_group()


def in_process_group(fn, *args):
    """`fn(*args)` inside the launcher's process group (or a one-rank one for the call)."""
    with process_group():
        return fn(*args)


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
    return FolderLock(join(run_dir, "train.lock"))


def locked(run_dir: str, fn, *args):
    """`fn(*args)` with rank 0 holding RUN_DIR/train.lock, taken before anything in the
    folder changes; every rank fails alike when another process holds it."""
    lock = train_lock(run_dir)
    rank0_decides(lock.acquire)
    try:
        return fn(*args)
    finally:
        lock.release()  # a no-op on the other ranks
