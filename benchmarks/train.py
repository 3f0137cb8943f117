"""Training throughput: our DeepSpeed engine vs a plain PyTorch loop, and the shard reader.

    (a) plain loop:  the same U-ViT, masking, loss and AdamW on batches already in memory
    (b) engine:      `training.uvit.task.train` (DeepSpeed, shard reader, EMA, metrics; no checkpoint: the run is thrown away)
    (c) reader:      `training.uvit.data.ShardReader` alone, as fast as it can go
    (d) engine, text ids: (b) on a text "ids" dataset, the step running a frozen CLIP text
                     tower sized to the U-ViT's text inputs (`bench_text_config`) on each sample's 77 ids
    (e) text tower alone: `TextEncoder.encode_ids` on batches of ids, as the ids step runs it
    (f) (a) with (e) run before each step and timed apart: tower time / step time per step

Printed: samples/s of each, engine overhead (1 - b/a; goal <= 5%), reader / step
consumption (c/b; goal >= 10x), and the step time the ids mode adds: measured end to end
(b/d - 1, median of `--repeats` interleaved (b, d) pairs; on a shared machine the noise is
several points), from the tower alone (b/e), and per step in the plain loop (f: the tower
and the step alternate, so a load change hits both; the figure to trust on a busy machine),
all scaled to aMUSEd-256: x (aMUSEd's text/step FLOP ratio / this model's), both ratios
counted with torch's FLOP counter (text tower: one forward on 77 ids; U-ViT step: forward
x 3, backward ~ 2x forward). Steady state: the first
`--warmup` steps are not timed. With --gpu-peak-tflops it turns a measured rate into MFU.

    python benchmarks/train.py                     # CPU, the bench-train U-ViT (10.3M parameters)
    python benchmarks/train.py --repeats 3         # three (states, ids) engine pairs for the ids overhead
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
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from amused.demo.datasets import write_token_dataset
from amused.demo.tiny_models import clip_bpe_tokenizer
from amused.pipeline.shards import TokenDataset
from amused.tokenizer.presets import CLIP_TEXT_COMMON, CLIP_TEXT_CONFIGS, UVIT_CONFIGS
from amused.tokenizer.text import TextEncoder
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


def bench_text_config(preset: str) -> CLIPTextConfig:
    """The text tower that goes with a U-ViT preset: CLIP-L/14's for aMUSEd's; otherwise a
    4-layer one whose widths are the U-ViT's text inputs (for bench-train: 3.2M parameters)."""
    uvit = UVIT_CONFIGS[preset]
    if uvit["encoder_hidden_size"] == CLIP_TEXT_CONFIGS["amused"]["hidden_size"]:
        return CLIPTextConfig(**CLIP_TEXT_COMMON, **CLIP_TEXT_CONFIGS["amused"])
    width = uvit["encoder_hidden_size"]
    return CLIPTextConfig(**CLIP_TEXT_COMMON, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4,
                          num_attention_heads=4, projection_dim=uvit["cond_embed_dim"])


def text_flops_per_caption(config: CLIPTextConfig) -> float:
    """One forward of the text tower on 77 ids (what the ids mode's step runs per sample)."""
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, config.max_position_embeddings, dtype=torch.long, device="meta"),
              output_hidden_states=True)
    return float(counter.get_total_flops())


def plain_loop(model_dir: str, batch: dict, steps: int, warmup: int, seed: int, text_ids: dict | None = None):
    """samples/s of plain training steps; with `text_ids` (a text encoder and a batch of ids),
    the median over steps of (text tower time / step time) instead, the tower run just before
    each step on the batch's ids and timed apart, so that both see the same machine load."""
    torch.manual_seed(seed)
    model = build_model("tiny", model_dir)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
    n = batch["image_tokens"].shape[0]
    grid = tuple(batch["image_tokens"].shape[1:])
    ratios = []
    for step in range(steps + warmup):
        if step == warmup:
            start = time.perf_counter()
        if text_ids:
            t0 = time.perf_counter()
            text_ids["text"].encode_ids(text_ids["ids"])
            t1 = time.perf_counter()
        masks = draw_masks(seed, step, 1, n, grid, 0.15, 0.1)
        masked, _ = masks.micro(range(0, 1), slice(0, n))
        logits = model(batch["image_tokens"].masked_fill(masked, mask_id(model)), batch["text_hidden_states"].float(),
                       batch["text_pooled"].float(), batch["micro_conds"])
        loss = masked_loss(logits, batch["image_tokens"], masked, 0.1, 1 / max(1, masks.total_masked())).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if text_ids and step >= warmup:
            ratios.append((t1 - t0) / (time.perf_counter() - t1))
    return sorted(ratios)[len(ratios) // 2] if text_ids else steps * n / (time.perf_counter() - start)


def preset_tokens(path: str, preset: str, shards: list[int], text_encoder: str | None = None) -> None:
    """A random token dataset shaped for U-ViT `preset`: its token grid, codebook and text width."""
    spec = UVIT_CONFIGS[preset]
    side = spec["sample_size"]
    write_token_dataset(path, shards, token_grid=(side, side), codebook_size=spec["codebook_size"],
                        text_seq_len=77, text_dim=spec["encoder_hidden_size"], text_encoder=text_encoder)


def engine_run(run_dir: Path, model: dict, dataset: str, batch: int, steps: int, warmup: int,
               zero: int, workers: int, precision: str = "auto", deterministic: bool = False,
               threads: int | None = None) -> float:
    """samples/s of `training.uvit.task.train` over `steps` steps after `warmup`; `model` is the
    config's model section (a preset, or a `pretrained` folder, and the model options)."""
    cfg = parse_config({
        "run_dir": str(run_dir), "steps": steps + warmup, "seed": 0, "deterministic": deterministic,
        "data": {"dataset": dataset, "global_batch_size": batch, "micro_batch_size": batch, "workers": workers},
        "model": model,
        "optim": {"warmup_steps": 10},
        "engine": {"zero_stage": zero, "precision": precision, "threads": threads},
        "checkpoint": {"every": steps + warmup + 1, "at_end": False},
        "log": {"every": warmup, "progress": False},
    })
    train(cfg)
    # One metrics line per `warmup` steps; the lines after the first cover the timed steps,
    # each at its own rate over equal step counts, so the overall rate is their harmonic mean.
    lines = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in lines[1:]]
    return len(rates) / sum(1 / r for r in rates)


def text_rate(text_dir: str, batch: int, batches: int) -> float:
    text = TextEncoder.from_pretrained(text_dir, device="cpu")
    ids = torch.randint(0, len(text.tokenizer), (batch, text.seq_len), generator=torch.Generator().manual_seed(0))
    text.encode_ids(ids)
    start = time.perf_counter()
    for _ in range(batches):
        text.encode_ids(ids)
    return batches * batch / (time.perf_counter() - start)


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
    parser.add_argument("--repeats", type=int, default=1, help="interleaved (states, ids) engine runs")
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
        text_config = bench_text_config(args.preset)
        text_dir = folder / "text"
        CLIPTextModelWithProjection(text_config).save_pretrained(text_dir / "text_encoder")
        clip_bpe_tokenizer(text_dir / "tokenizer")
        for path, text in ((dataset, None), (dataset + "-ids", str(text_dir))):
            preset_tokens(path, args.preset, shards, text_encoder=text)
        params = sum(p.numel() for p in build_model("tiny", model_dir).parameters())
        print(f"U-ViT {args.preset}: {params / 1e6:.1f}M parameters, {side}x{side} tokens, batch {args.batch}, "
              f"{args.steps} timed steps after {args.warmup}")

        sample = next(ShardReader(TokenDataset(dataset), lanes=1, rank=0, world_size=1, lane_batch=args.batch,
                                  accum=1, window_rows=1024, seed=0))
        a = plain_loop(model_dir, sample, args.steps, args.warmup, seed=0)
        print(f"(a) plain PyTorch loop      {a:8.1f} samples/s")
        pairs = []
        for r in range(args.repeats):
            run = [engine_run(folder / f"run-{mode}-{r}", {"preset": "tiny", "pretrained": model_dir,
                                                             "text_encoder": text},
                              path, args.batch, args.steps, args.warmup, args.zero, args.workers)
                   for mode, path, text in (("states", dataset, None), ("ids", dataset + "-ids", str(text_dir)))]
            pairs.append(run)
            print(f"    pair {r}: states {run[0]:.1f}, ids {run[1]:.1f} samples/s, b/d - 1 = {100 * (run[0] / run[1] - 1):.1f}%")
        b = sorted(p[0] for p in pairs)[len(pairs) // 2]
        print(f"(b) DeepSpeed engine ZeRO-{args.zero} {b:8.1f} samples/s   overhead 1 - b/a = {100 * (1 - b / a):.1f}%"
              " (goal <= 5%)")
        c = reader_rate(dataset, args.batch, max(50, 4 * args.steps), args.workers)
        print(f"(c) shard reader alone      {c:8.1f} samples/s   c/b = {c / b:.1f}x (goal >= 10x)")
        overhead = sorted(s / i - 1 for s, i in pairs)[len(pairs) // 2]
        d = b / (1 + overhead)
        print(f"(d) engine, text ids        {d:8.1f} samples/s   step time +{100 * overhead:.1f}% (median of "
              f"{len(pairs)} same-run pair(s))")
        e = text_rate(str(text_dir), args.batch, max(20, args.steps))
        print(f"(e) text tower alone        {e:8.1f} samples/s   b/e = +{100 * b / e:.1f}% step time")
        ids = next(ShardReader(TokenDataset(dataset + "-ids"), lanes=1, rank=0, world_size=1, lane_batch=args.batch,
                               accum=1, window_rows=1024, seed=0))["text_ids"]
        f = plain_loop(model_dir, sample, args.steps, args.warmup, seed=0,
                       text_ids={"text": TextEncoder.from_pretrained(str(text_dir), device="cpu"), "ids": ids})
        print(f"(f) tower / step, alternating in the plain loop: +{100 * f:.1f}% step time (median of {args.steps} "
              "steps, each pair under the same load)")

    flops = training_flops_per_sample("amused-256")
    print(f"aMUSEd-256 U-ViT training FLOPs per 256 px sample (3 x forward, torch FLOP counter): {flops / 1e12:.3f} TFLOP")
    ratios = {}
    for preset, text_cfg in ((args.preset, text_config), ("amused-256", bench_text_config("amused-256"))):
        text_flops, step_flops = text_flops_per_caption(text_cfg), training_flops_per_sample(preset)
        ratios[preset] = text_flops / step_flops
        print(f"text tower / U-ViT training step, FLOPs per sample, {preset}: {text_flops / 1e9:.2f} / "
              f"{step_flops / 1e9:.1f} GFLOP = {100 * ratios[preset]:.2f}%")
    bench_ratio, amused_ratio = ratios[args.preset], ratios["amused-256"]
    scale = amused_ratio / bench_ratio
    print(f"text ids step overhead scaled to aMUSEd-256 (x {scale:.2f}): (d) end to end {100 * overhead:.1f}% -> "
          f"{100 * overhead * scale:.1f}%; (e) tower alone {100 * b / e:.1f}% -> {100 * b / e * scale:.1f}%; "
          f"(f) alternating {100 * f:.1f}% -> {100 * f * scale:.1f}%")
    if args.gpu_peak_tflops and args.preset == "amused-256":
        mfu = b * flops / (args.gpu_peak_tflops * 1e12)
        print(f"MFU = {b:.1f} samples/s x {flops / 1e12:.3f} TFLOP / {args.gpu_peak_tflops} TFLOP/s = {100 * mfu:.1f}%")


if __name__ == "__main__":
    main()
