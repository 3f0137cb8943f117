"""Ray Train launch: the same `train(cfg)` on N Ray workers (gloo on CPU, NCCL on GPU),
so one Ray cluster runs the data jobs and the training alike. Under torchrun or the
deepspeed launcher, `amused train CONFIG` calls `train(cfg)` directly.

Here the driver, on the user's host, holds RUN_DIR/train.lock from before Ray is asked
for workers until they are done: rank 0 may land on any node, and a lock it left there
when killed would refuse every later run whose rank 0 lands elsewhere, while the driver
of the next run, on the same host, sees that the dead driver is gone and takes over.

A lost worker process or node is Ray Train's to handle (FailureConfig.max_failures =
`train.max_failures`): it replaces the whole worker group, and `train` on the new ranks
resumes from the newest complete checkpoint as any rerun does. Which rank errors are not
worth a restart is one rule, `deterministic` below."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from contextlib import nullcontext
from pathlib import Path

from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.exceptions import RayError
from ray.train import ControllerError, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.exceptions import RayTrainError
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import RestartingState

from amused.plumbing.raysession import ray_session
from amused.plumbing.storage import is_local, join, url_to_fs
from amused.training.checkpoint import Checkpoint
from amused.training.config import TrainConfig, parse_config
from amused.training.distributed import Layout, train_lock
from amused.training.engine import NonFiniteError, TrainResult
from amused.training.progress import LAUNCH_ENV, follow_progress
from amused.training.uvit.task import train


def _worker(loop_config: dict) -> None:
    os.environ[LAUNCH_ENV] = loop_config["launch"]
    train(parse_config(loop_config["config"]), launcher_holds_lock=True)


def deterministic(error: BaseException) -> bool:
    """Whether a rank's error would come back on every restart, so that the run stops at
    the first one instead of restarting `max_failures` times:
      - a ValueError: the rank's start-up check (a bad setting, data or model identity, a
        damaged checkpoint with nothing to resume);
      - NonFiniteError: a resume is exact, so the same steps diverge again;
    except a ValueError that only says a file could not be decoded (json.JSONDecodeError,
    UnicodeDecodeError: a run file such as metrics.jsonl cut off when a process was
    killed), which a restart rewrites. Anything else (OSError, a lost worker, a collective
    that timed out, ...) is retried."""
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
        return False
    return isinstance(error, (ValueError, NonFiniteError))


class _NotRetried(Exception):
    """Carries a rank's deterministic error out of Ray Train's controller."""

    def __init__(self, rank: int, error: BaseException):
        super().__init__(rank, error)
        self.rank, self.error = rank, error


class _StopOnDeterministicError(ControllerCallback):
    """Runs in Ray Train's controller. Ray's failure policy retries every worker-group
    error alike (it cannot be given another policy); this callback turns the restart of a
    group whose rank raised a `deterministic` error into a controller error, which is
    never retried."""

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if not isinstance(current_state, RestartingState):
            return
        error = current_state.training_failed_error
        for rank, failure in sorted(getattr(error, "worker_failures", {}).items()):
            if deterministic(failure):
                raise _NotRetried(rank, failure)


def train_on_ray(cfg: TrainConfig, workers: int, gpus_per_worker: float = 0.0, address: str = "",
                 cpus_per_worker: float = 1.0) -> TrainResult:
    # The ranks' own start-up check, run here too so that a batch that does not split
    # over `workers` is refused before a cluster is asked for anything.
    Layout.plan(cfg.data.global_batch_size, cfg.data.micro_batch_size, workers, cfg.data.lanes or workers)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    cfg = with_worker_threads(cfg, cpus_per_worker)
    with train_lock(cfg.run_dir), ray_session(address or None):
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"config": cfg.to_json(), "launch": uuid.uuid4().hex},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=ray_run_config(cfg.run_dir, cfg.max_failures),
        )
        try:
            # `--quiet` turns log.progress off: no bar, and no periodic lines where stderr is a log.
            with follow_progress(cfg.run_dir, cfg.steps, "train") if cfg.log.progress else nullcontext():
                trainer.fit()
        except ControllerError as exc:
            if not isinstance(exc.controller_failure, _NotRetried):
                raise
            raise exc.controller_failure.error from exc
        except WorkerGroupError as exc:
            raise _gave_up(cfg, exc) from exc
    # Ray Train 2 returns metrics only with Ray checkpoints; rank 0 wrote the outcome.
    return TrainResult.read(cfg.run_dir)


def with_worker_threads(cfg: TrainConfig, cpus_per_worker: float) -> TrainConfig:
    """With `deterministic` and no engine.threads: as many torch threads as the worker
    has CPUs (Ray's own rule for OMP_NUM_THREADS, floored, at least 1), fixed by the config
    rather than by a shell's OMP_NUM_THREADS, which Ray leaves as it finds it."""
    if not cfg.deterministic or cfg.engine.threads is not None:
        return cfg
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, threads=max(1, int(cpus_per_worker))))


def ray_run_config(run_dir: str, max_failures: int) -> RunConfig:
    """Ray Train's run settings: restarts up to `max_failures`; its own storage (the run
    record only, checkpoints live in the run folder) is RUN_DIR/ray, on object storage
    through our filesystem, so Ray uses the same endpoint, credentials and retries."""
    failure = FailureConfig(max_failures=max_failures)
    callbacks = [_StopOnDeterministicError()]
    if is_local(run_dir):
        path = Path(url_to_fs(run_dir)[1]).resolve() / "ray"
        path.mkdir(parents=True, exist_ok=True)
        return RunConfig(name="amused-train", storage_path=str(path), failure_config=failure, callbacks=callbacks)
    fs, path = url_to_fs(join(run_dir, "ray"))
    return RunConfig(name="amused-train", storage_path=path, storage_filesystem=PyFileSystem(FSSpecHandler(fs)),
                     failure_config=failure, callbacks=callbacks)


def _gave_up(cfg: TrainConfig, exc: WorkerGroupError) -> BaseException:
    """The error to stop with once Ray Train has restarted the group `max_failures` times
    (its policy raises the group's error after that many restarts, never sooner)."""
    failures = exc.worker_failures
    if not failures:
        return exc
    stops = [failures[r] for r in sorted(failures) if deterministic(failures[r])]
    if stops:
        # Never retried (see _StopOnDeterministicError; here with max_failures 0): the rank's own
        # line, and no "rerun to resume": a rerun would stop the same way.
        return stops[0]
    # A lost worker (Ray's error) names the cause; the others' collective errors follow from it.
    rank = min(failures, key=lambda r: (not isinstance(failures[r], (RayTrainError, RayError)), r))
    cause = f"{type(failures[rank]).__name__}: {failures[rank]}".splitlines()[0]
    last = Checkpoint.latest(cfg.run_dir)
    where = (f"the last good checkpoint is {last.folder} (step {last.step}); rerun to resume from it" if last
             else "no checkpoint was complete yet; a rerun starts over")
    return RuntimeError(f"training stopped after {cfg.max_failures} restart(s) (train.max_failures), "
                        f"rank {rank} failed: {cause}; {where}")
