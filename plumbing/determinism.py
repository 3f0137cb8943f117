"""Deterministic torch: the settings under which the same computation on the same machine
with the same thread count gives the same bytes, run after run.

What varies otherwise:
  - the thread count: torch takes it from OMP_NUM_THREADS (which Ray sets from a worker's
    CPUs, and a user's shell may set) or the machine's cores, and a CPU reduction split
    over another number of threads sums in another order; MKL keeps its own dynamic
    thread choice (MKL_DYNAMIC, which Intel's reproducibility conditions want off) unless
    torch's thread count is set explicitly;
  - kernels that add across threads in the order the threads run: on a CPU, indexing's
    backward (`x[ids]` with repeated ids: `index_put_` with accumulate) uses atomic adds
    on every thread unless torch is in its deterministic mode; on a GPU, atomic adds and
    cuBLAS with its default workspace;
  - on a GPU, cuDNN's autotuner (`benchmark`) times the algorithms and keeps the fastest,
    so two runs may convolve differently.
`deterministic_torch` fixes all of these for the block; a training, an encoder actor or an
evaluation actor runs inside it when its config asks (the `deterministic` of train, vqgan,
pretokenize and evaluate).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

# cuBLAS is deterministic only with a fixed workspace, which it reads when its first handle
# is made (so before the first CUDA matmul of the process).
CUBLAS_WORKSPACE = ":4096:8"


def machine_threads() -> int:
    """The CPUs this process may run on: a property of the machine (and the process's
    affinity), never of the load or of what Ray assigned."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def seed_all(seed: int, rank: int) -> None:
    """torch's global generators (CPU and GPU) from `seed`, the same on every rank (the
    model's initial weights), numpy's and Python's from (seed, rank): the pipeline draws
    from keyed generators of its own, but a library may draw from these (a retry's jitter,
    for one, which should not agree across ranks), and every checkpoint records their
    state, which unseeded differs from run to run."""
    torch.manual_seed(seed)
    np.random.seed([seed, rank])
    random.seed(seed * 1_000_003 + rank)


def set_deterministic(threads: int | None) -> dict:
    """Deterministic kernels, no autotuning and `threads` torch threads (None: leave the
    count, on a GPU where the CPU does no arithmetic that matters); returns what was set
    before, for `restore`. An operation with no deterministic implementation raises (it
    is not merely warned about): a run that claims to be reproducible must be."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads: {threads!r} must be >= 1")
    before = {"algorithms": torch.are_deterministic_algorithms_enabled(),
              "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
              "cudnn_deterministic": torch.backends.cudnn.deterministic,
              "cudnn_benchmark": torch.backends.cudnn.benchmark,
              "fill": torch.utils.deterministic.fill_uninitialized_memory,
              "threads": torch.get_num_threads()}
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=False)
    # The mode also fills every new tensor with NaN, so that reading memory never written
    # is reproducible: 2.3x the demo U-ViT's CPU step (30 vs 13 s for 40 steps, 2026-12-02),
    # for a bug nothing here has (the two-run test compares every byte the stages write).
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if threads is not None:
        # Also turns MKL's dynamic thread choice off (torch does so in every explicit call).
        torch.set_num_threads(threads)
    return before


def restore(before: dict) -> None:
    torch.use_deterministic_algorithms(before["algorithms"], warn_only=before["warn_only"])
    torch.backends.cudnn.deterministic = before["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = before["cudnn_benchmark"]
    torch.utils.deterministic.fill_uninitialized_memory = before["fill"]
    if torch.get_num_threads() != before["threads"]:
        torch.set_num_threads(before["threads"])


@contextmanager
def deterministic_torch(threads: int | None) -> Iterator[None]:
    """`set_deterministic` for the block, the process's settings as they were afterwards
    (a training called in a process that goes on: the run's driver, a test)."""
    before = set_deterministic(threads)
    try:
        yield
    finally:
        restore(before)


# What `amused run` says once when a run's `deterministic` is off.
MAY_VARY = ("deterministic: false: two runs of this config may differ in the VQ-GAN and U-ViT weights (and so in "
            "the tokens, losses, samples and scores after them): torch's thread counts follow the environment "
            "(OMP_NUM_THREADS, Ray's CPUs per worker), some kernels add across threads in the order they run "
            "(indexing's backward on a CPU, atomic adds on a GPU), and cuDNN picks GPU kernels by timing them; "
            "`deterministic: true` fixes these for byte-identical runs on the same machine")
