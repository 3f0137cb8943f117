"""Shared fixtures: tiny random models built once, a local S3 server, one Ray per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import s3fs
import torch

from amused.demo.datasets import write_token_dataset
from amused.demo.tiny_models import write_tiny_models
from amused.training.config import parse_config
from amused.training.uvit.task import train
from tests.samples import free_port


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; the environment points boto/s3fs (and Ray workers) at it."""
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_bucket(s3_server) -> str:
    fs = s3fs.S3FileSystem()
    fs.mkdir("amused-test")
    return "s3://amused-test"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session; started after the S3 variables so workers inherit them."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> str:
    """A tiny U-ViT's training checkpoint after 4 steps (its EMA differs from the raw weights)."""
    root = tmp_path_factory.mktemp("trained")
    write_token_dataset(str(root / "tokens"), [64])
    return train(parse_config({
        "run_dir": str(root / "run"), "steps": 4,
        "data": {"dataset": str(root / "tokens"), "global_batch_size": 8, "micro_batch_size": 8, "workers": 0},
        "model": {"preset": "tiny"}, "optim": {"lr": 1e-2, "warmup_steps": 1}, "ema": {"decay": 0.5},
        "checkpoint": {"every": 4}, "log": {"every": 4, "progress": False}})).checkpoint
