"""Training throughput: our DeepSpeed engine vs a plain PyTorch loop, and the shard reader.

    (a) plain loop:  the same U-ViT, masking, loss and AdamW on batches already in memory
    (b) engine:      `training.uvit.task.train` (DeepSpeed, shard reader, EMA, metrics, checkpoint at the end)
    (c) reader:      `training.uvit.data.ShardReader` alone, as fast as it can go

Printed: samples/s of each, engine overhead (1 - b/a; goal <= 5%), and reader / step
consumption (c/b; goal >= 10x). Steady state: the first `--warmup` steps are not timed.
It also counts, with torch's FLOP counter, the training FLOPs of one 256 px sample for
the aMUSEd-256 U-ViT (forward x 3) and, with --gpu-peak-tflops, turns a measured rate into MFU.

    python benchmarks/train.py                     # CPU, the bench-train U-ViT (10.3M parameters)
    python benchmarks/train.py --preset amused-256 --batch 64 --steps 60 --gpu-peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from amused.demo.datasets import write_token_dataset
from amused.pipeline.shards import TokenDataset
from amused.tokenizer.presets import UVIT_CONFIGS
from amused.training.config import parse_config
from amused.training.uvit.data import ShardReader
from amused.training.uvit.model import build_model, mask_id, param_groups
from amused.training.uvit.objective import draw_masks, masked_loss
from amused.training.uvit.task import train


def training_flops_per_sample(preset: str, text_len: int = 77) -> float:
    """Forward FLOPs x 3 (backward ~ 2x forward), counted by torch on one sample."""
    with torch.device("meta"):
        model = build_model(preset)
    side = model.config.sample_size
    args = (torch.zeros(1, side, side, dtype=torch.long, device="meta"),
            torch.zeros(1, text_len, model.config.encoder_hidden_size, device="meta"),
            torch.zeros(1, model.config.cond_embed_dim, device="meta"), torch.zeros(1, 5, device="meta"))
    with FlopCounterMode(display=False) as counter:
        model(*args)
    return 3.0 * counter.get_total_flops()


def plain_loop(model_dir: str, batch: dict, steps: int, warmup: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = build_model("tiny", model_dir)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
    n = batch["image_tokens"].shape[0]
    grid = tuple(batch["image_tokens"].shape[1:])
    for step in range(steps + warmup):
        if step == warmup:
            start = time.perf_counter()
        masks = draw_masks(seed, step, 1, n, grid, 0.15, 0.1)
        masked, _ = masks.micro(range(0, 1), slice(0, n))
        logits = model(batch["image_tokens"].masked_fill(masked, mask_id(model)), batch["text_hidden_states"].float(),
                       batch["text_pooled"].float(), batch["micro_conds"])
        loss = masked_loss(logits, batch["image_tokens"], masked, 0.1, 1 / max(1, masks.total_masked())).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * n / (time.perf_counter() - start)


def engine_run(folder: Path, model_dir: str, dataset: str, batch: int, steps: int, warmup: int,
               zero: int, workers: int) -> float:
    cfg = parse_config({
        "run_dir": str(folder / f"run-zero{zero}"), "steps": steps + warmup, "seed": 0,
        "data": {"dataset": dataset, "global_batch_size": batch, "micro_batch_size": batch, "workers": workers},
        "model": {"preset": "tiny", "pretrained": model_dir}, "optim": {"warmup_steps": 10},
        "engine": {"zero_stage": zero}, "checkpoint": {"every": steps + warmup},
        "log": {"every": warmup, "progress": False},
    })
    train(cfg)
    # One metrics line per `warmup` steps; the lines after the first cover the timed steps,
    # each at its own rate over equal step counts, so the overall rate is their harmonic mean.
    lines = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in lines[1:]]
    return len(rates) / sum(1 / r for r in rates)


def reader_rate(dataset: str, batch: int, batches: int, workers: int) -> float:
    reader = ShardReader(TokenDataset(dataset), lanes=1, rank=0, world_size=1, lane_batch=batch, accum=1,
                         window_rows=1024, seed=0, workers=workers)
    next(reader)
    start = time.perf_counter()
    for _ in range(batches):
        next(reader)
    rate = batches * batch / (time.perf_counter() - start)
    reader.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--preset", default="bench-train", choices=list(UVIT_CONFIGS))
    parser.add_argument("--gpu-peak-tflops", type=float, default=0.0, help="peak dense bf16 TFLOP/s, for MFU")
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (metrics are logged every --warmup steps)")
    model_cfg = UVIT_CONFIGS[args.preset]
    side = model_cfg["sample_size"]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        model_dir = str(folder / "model")
        build_model(args.preset).save_pretrained(model_dir)
        dataset = str(folder / "tokens")
        shards = [args.rows // 4] * 4
        write_token_dataset(dataset, shards, token_grid=(side, side), codebook_size=model_cfg["codebook_size"],
                            text_seq_len=77, text_dim=model_cfg["encoder_hidden_size"])
        params = sum(p.numel() for p in build_model("tiny", model_dir).parameters())
        print(f"U-ViT {args.preset}: {params / 1e6:.1f}M parameters, {side}x{side} tokens, batch {args.batch}, "
              f"{args.steps} timed steps after {args.warmup}")

        sample = next(ShardReader(TokenDataset(dataset), lanes=1, rank=0, world_size=1, lane_batch=args.batch,
                                  accum=1, window_rows=1024, seed=0))
        a = plain_loop(model_dir, sample, args.steps, args.warmup, seed=0)
        print(f"(a) plain PyTorch loop      {a:8.1f} samples/s")
        b = engine_run(folder, model_dir, dataset, args.batch, args.steps, args.warmup, args.zero, args.workers)
        print(f"(b) DeepSpeed engine ZeRO-{args.zero} {b:8.1f} samples/s   overhead 1 - b/a = {100 * (1 - b / a):.1f}%"
              " (goal <= 5%)")
        c = reader_rate(dataset, args.batch, max(50, 4 * args.steps), args.workers)
        print(f"(c) shard reader alone      {c:8.1f} samples/s   c/b = {c / b:.1f}x (goal >= 10x)")

    flops = training_flops_per_sample("amused-256")
    print(f"aMUSEd-256 U-ViT training FLOPs per 256 px sample (3 x forward, torch FLOP counter): {flops / 1e12:.3f} TFLOP")
    if args.gpu_peak_tflops and args.preset == "amused-256":
        mfu = b * flops / (args.gpu_peak_tflops * 1e12)
        print(f"MFU = {b:.1f} samples/s x {flops / 1e12:.3f} TFLOP / {args.gpu_peak_tflops} TFLOP/s = {100 * mfu:.1f}%")


if __name__ == "__main__":
    main()
