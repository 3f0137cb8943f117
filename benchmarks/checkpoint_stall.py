"""The training stall per checkpoint, synchronous vs asynchronous publishing
(`checkpoint.asynchronous`), with the run folder local and on S3 (a moto server on
127.0.0.1, started here: a fast, CPU-bound stand-in; real object storage is slower per
byte, which only lengthens what asynchronous publishing hides).

The benchmark U-ViT of benchmarks/train.py, one rank, ZeRO-2, a metrics line every step
and a checkpoint every `--every` steps. A checkpoint's time falls into the step after it
(its metrics interval starts before the checkpoint is written), so the stall of
checkpoint k is the time of step k+1 beyond the median step away from checkpoints;
printed per mode: the median stall, the median time save_checkpoint blocked the loop
(`checkpoint_s`, in the metrics line after it), the normal step and the run's wall time,
then the sync/async ratios of both. The stall also holds what the background upload
takes from the step's CPU (on a 2-core machine moto itself competes with training). The
last checkpoint (at the end of training, which waits for its upload) is not counted.

    python benchmarks/checkpoint_stall.py
    python benchmarks/checkpoint_stall.py --steps 40 --every 10 --where s3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import torch

from amused.demo.datasets import write_token_dataset
from amused.plumbing.storage import join
from amused.tokenizer.presets import UVIT_CONFIGS
from amused.training.config import parse_config
from amused.training.uvit.model import build_model
from amused.training.uvit.task import train

PRESET = "bench-train"


def _moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)


def run(run_dir: str, model_dir: str, dataset: str, batch: int, steps: int, every: int,
        asynchronous: bool) -> dict:
    cfg = parse_config({
        "run_dir": run_dir, "steps": steps, "seed": 0,
        "data": {"dataset": dataset, "global_batch_size": batch, "micro_batch_size": batch, "workers": 1},
        "model": {"preset": "tiny", "pretrained": model_dir},
        "optim": {"warmup_steps": 5}, "engine": {"zero_stage": 2},
        "checkpoint": {"every": every, "keep": 2, "asynchronous": asynchronous},
        "log": {"every": 1, "progress": False},
    })
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    fs, path = fsspec.core.url_to_fs(join(run_dir, "metrics.jsonl"))
    lines = [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]
    seconds = {r["step"]: batch / r["samples_per_s"] for r in lines}
    blocked = [r["checkpoint_s"] for r in lines if "checkpoint_s" in r]
    after = [k + 1 for k in range(every, steps - 1, every)]
    # Away from checkpoints: neither the first steps (warm-up) nor a step right after one.
    normal = [t for s, t in seconds.items() if s > 3 and s not in after]
    base = statistics.median(normal)
    ckpt_bytes = sum(f["size"] for f in json.loads(fs.cat_file(
        fsspec.core.url_to_fs(join(run_dir, "checkpoints", f"step_{steps:08d}", "COMPLETE"))[1]))["files"].values())
    return {"stall": statistics.median(seconds[s] - base for s in after), "blocked": statistics.median(blocked),
            "step": base,
            "wall": wall, "bytes": ckpt_bytes, "checkpoints": len(after)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--where", default="local,s3")
    args = parser.parse_args()

    moto, endpoint = _moto()
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            os.environ["AMUSED_SCRATCH"] = str(folder / "scratch")
            fsspec.filesystem("s3").mkdir("bench")
            torch.manual_seed(0)
            model_dir = str(folder / "model")
            build_model(PRESET).save_pretrained(model_dir)
            cfg = UVIT_CONFIGS[PRESET]
            side = cfg["sample_size"]
            dataset = str(folder / "tokens")
            write_token_dataset(dataset, [256] * 4, token_grid=(side, side), codebook_size=cfg["codebook_size"],
                                text_seq_len=77, text_dim=cfg["encoder_hidden_size"])
            print(f"U-ViT {PRESET}, batch {args.batch}, {args.steps} steps, a checkpoint every {args.every}; "
                  "S3 = moto on 127.0.0.1; "
                  f"load {os.getloadavg()[0]:.1f}")
            results = {}
            for where in args.where.split(","):
                for mode in (False, True):
                    root = str(folder / "runs") if where == "local" else "s3://bench"
                    r = run(join(root, f"{where}-{'async' if mode else 'sync'}"), model_dir, dataset, args.batch,
                            args.steps, args.every, mode)
                    results[where, mode] = r
                    print(f"{where:5s} {'async' if mode else 'sync ':5s}: stall {r['stall']:6.2f} s per checkpoint, "
                          f"save_checkpoint blocked {r['blocked']:5.2f} s "
                          f"({r['bytes'] / 1e6:.0f} MB), normal step {r['step']:.3f} s, wall {r['wall']:.1f} s, "
                          f"load {os.getloadavg()[0]:.1f}")
            for where in args.where.split(","):
                for what in ("stall", "blocked"):
                    sync, asyn = results[where, False][what], results[where, True][what]
                    print(f"{where}: {what} sync / async = {sync:.2f} / {asyn:.2f} s = {sync / max(asyn, 1e-3):.1f}x")
    finally:
        moto.terminate()
        moto.wait(timeout=10)


if __name__ == "__main__":
    main()
