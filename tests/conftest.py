"""Shared fixtures: tiny random models built once, a local S3 server behind a
fault-injecting proxy, one Ray per session."""

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
import yaml

from amused.demo.datasets import write_token_dataset
from amused.demo.tiny_models import write_tiny_models
from amused.training.config import parse_config
from amused.training.uvit.task import train
from tests.s3proxy import S3Proxy
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
def s3_proxy():
    """A moto S3 server on 127.0.0.1 behind the fault-injecting proxy (faults off), which
    counts every request; the environment points boto/s3fs (and Ray workers) at the proxy."""
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)
    proxy = S3Proxy(f"http://127.0.0.1:{port}")
    os.environ.update({"AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    yield proxy
    proxy.close()
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(s3_proxy) -> str:
    """The S3 endpoint the environment names."""
    return s3_proxy.url


@pytest.fixture
def s3_faults(s3_proxy, s3_bucket) -> S3Proxy:
    """The proxy with its counters zeroed; a test turns faults on with `.faults = Faults(...)`.
    Faults are off again afterwards."""
    s3_proxy.reset_counts()
    yield s3_proxy
    s3_proxy.faults = None


@pytest.fixture(scope="session")
def s3_bucket(s3_server) -> str:
    fs = s3fs.S3FileSystem()
    fs.mkdir("amused-test")
    return "s3://amused-test"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session; started after the S3 variables so workers inherit them.
    A new one even where another Ray runs on this machine (which ray.init would join)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
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


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """configs/demo.yaml as parsed YAML, its run folder in a temp folder."""
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/demo.yaml").read_text())
    cfg["run_dir"] = str(tmp_path_factory.mktemp("run"))
    return cfg
