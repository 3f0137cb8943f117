"""Ray Train launch: the same `train(cfg)` on N Ray workers (gloo on CPU, NCCL on GPU),
so one Ray cluster runs the data jobs and the training alike. Under torchrun or the
deepspeed launcher, `amused train CONFIG` calls `train(cfg)` directly.

Here the driver, on the user's host, holds RUN_DIR/train.lock from before Ray is asked
for workers until they are done: rank 0 may land on any node, and a lock it left there
when killed would refuse every later run whose rank 0 lands elsewhere, while the driver
of the next run, on the same host, sees that the dead driver is gone and takes over."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ray.train import RunConfig, ScalingConfig, WorkerGroupError
from ray.train.torch import TorchConfig, TorchTrainer

from amused.plumbing.raysession import ray_session
from amused.training.config import TrainConfig, parse_config
from amused.training.distributed import Layout, train_lock
from amused.training.engine import TrainResult
from amused.training.progress import LAUNCH_ENV, follow_progress
from amused.training.uvit.task import train


def _worker(loop_config: dict) -> None:
    os.environ[LAUNCH_ENV] = loop_config["launch"]
    train(parse_config(loop_config["config"]), launcher_holds_lock=True)


def train_on_ray(cfg: TrainConfig, workers: int, gpus_per_worker: float = 0.0, address: str = "",
                 cpus_per_worker: float = 1.0) -> TrainResult:
    # The ranks' own start-up check, run here too so that a batch that does not split
    # over `workers` is refused before a cluster is asked for anything.
    Layout.plan(cfg.data.global_batch_size, cfg.data.micro_batch_size, workers, cfg.data.lanes or workers)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    with train_lock(cfg.run_dir), ray_session(address or None):
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"config": cfg.to_json(), "launch": uuid.uuid4().hex},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            # Ray's own storage holds only the run record; checkpoints live in cfg.run_dir.
            run_config=RunConfig(name="amused-train", storage_path=str(_storage(cfg.run_dir))),
        )
        try:
            with follow_progress(cfg.run_dir, cfg.steps, "train"):
                trainer.fit()
        except WorkerGroupError as exc:
            # Ray's own message is a traceback snippet; a rank's own error (a held lock, a
            # damaged checkpoint file, a bad setting) says in one line what went wrong.
            if not exc.worker_failures:
                raise
            raise exc.worker_failures[min(exc.worker_failures)] from exc
    # Ray Train 2 returns metrics only with Ray checkpoints; rank 0 wrote the outcome.
    return TrainResult.read(cfg.run_dir)


def _storage(run_dir: str) -> Path:
    path = Path(run_dir).resolve() / "ray"
    path.mkdir(parents=True, exist_ok=True)
    return path
