"""One way for every data job to get Ray: join the running one or start one for the job."""

from __future__ import annotations

import itertools
import logging
from contextlib import contextmanager
from typing import Callable, Iterator

from amused.plumbing.storage import storage_env


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Uses an initialised Ray as is; else connects to `address` (None: a local one) and
    shuts it down afterwards. Every worker of the job, on any node, gets this process's
    storage settings (S3 retry policy, no listing cache). Our own progress bars and reports
    replace Ray Data's."""
    # ray costs 1.2-1.7 s to import; the configs of the jobs that call this are imported by
    # the CLI and the run config, which must not pay it.
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": storage_env()})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def ray_tasks(fn: Callable[..., dict], calls: list[dict], in_flight: int, **options) -> Iterator[dict]:
    """`fn(**call)` for each call as a Ray task of one CPU (`options`: more task options), at
    most `in_flight` at once, results in completion order; if one fails, or the caller stops
    reading, the tasks not yet done are cancelled."""
    import ray  # see ray_session

    task = ray.remote(_call).options(num_cpus=1, **options)
    todo = iter(calls)
    pending = [task.remote(fn, kw) for kw in itertools.islice(todo, in_flight)]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            pending += [task.remote(fn, kw) for kw in itertools.islice(todo, 1)]
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref)


def _call(fn: Callable[..., dict], kwargs: dict) -> dict:
    return fn(**kwargs)
