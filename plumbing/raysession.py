"""One way for every data job to get Ray: join the running one or start one for the job."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from contextlib import contextmanager
from typing import Callable, Iterator

from amused.plumbing.storage import storage_env
from amused.plumbing.terminal import output_to_log


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Uses an initialised Ray as is; else connects to `address` (None: a local one) and
    shuts it down afterwards. Every worker of the job, on any node, gets this process's
    storage settings (S3 retry policy, no listing cache). Our own progress bars and reports
    replace Ray Data's. A session this process starts sends Ray's messages to the file that
    `ray_log` names, if any."""
    # ray costs 1.2-1.7 s to import; the configs of the jobs that call this are imported by
    # the CLI and the run config, which must not pay it.
    import ray
    import ray.data  # configures the ray.data loggers, which _ray_messages_to then redirects

    started = not ray.is_initialized()
    log = os.environ.get(LOG_ENV) if started else None
    with _ray_messages_to(log) if log else contextlib.nullcontext():
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


# A local file: while a session this process started is open, Ray's messages go there instead
# of the terminal (the CLI sets it, to RUN_DIR/logs/ray.log or the like, unless --log-level debug).
LOG_ENV = "AMUSED_RAY_LOG"


@contextmanager
def ray_log(path: str | None) -> Iterator[None]:
    """Sessions opened inside send Ray's messages to the local file `path` (None: the terminal);
    an environment variable, so that child processes do the same."""
    saved = os.environ.pop(LOG_ENV, None)
    if path:
        os.environ[LOG_ENV] = path
    try:
        yield
    finally:
        os.environ.pop(LOG_ENV, None)
        if saved is not None:
            os.environ[LOG_ENV] = saved


@contextmanager
def _ray_messages_to(path: str) -> Iterator[None]:
    """File descriptor 2, where Ray's C++ core writes (the `core_worker.cc ... constructor
    arguments in the object store` line of every Ray Data actor pool) and which the processes
    Ray starts inherit, and the `ray` loggers go to `path`; Python's own stderr (our progress
    bars, warnings, errors) stays on the terminal."""
    with output_to_log(path, fds=(2,), keep_python_stderr=True), open(path, "a", encoding="utf-8") as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
        saved = [(lg.handlers, lg.propagate) for lg in loggers]
        for lg, (handlers, _) in zip(loggers, saved):  # Ray's own log files stay
            lg.handlers, lg.propagate = [h for h in handlers if isinstance(h, logging.FileHandler)] + [handler], False
        try:
            yield
        finally:
            for lg, (handlers, propagate) in zip(loggers, saved):
                lg.handlers, lg.propagate = handlers, propagate


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
