"""Progress of a training run that the people and tools watching it read: rank 0 writes
RUN_DIR/progress.json (step, samples/s, loss, restarts); the driver that launched the
ranks shows it as a progress bar (`follow_progress`) and `amused status` prints it.

A launch (one `train_on_ray` call, one torchrun) has an id in the ranks' environment
(LAUNCH_ENV); rank 0 counts its starts under the same id as restarts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

LAUNCH_ENV = "AMUSED_LAUNCH_ID"


@contextmanager
def follow_progress(run_dir: str, total: int, desc: str) -> Iterator[None]:
    """A progress bar on this (the driver's) process for the block, fed by RUN_DIR/progress.json."""
    yield
