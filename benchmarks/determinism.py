"""What `deterministic: true` costs on the CPU training step: the demo's U-ViT (preset
`small`, batch 32, ZeRO 2, one rank: the train stage's settings in configs/demo.yaml)
through the engine (`training.uvit.task.train`), with the switch off and on in
interleaved pairs, at the same torch thread count (off: set here before the run; on:
`engine.threads`). ms/step from the metrics lines after the warm-up; the median pair.

    python benchmarks/determinism.py                 # 3 pairs of 40 timed steps, 2 threads
    python benchmarks/determinism.py --threads 1 --pairs 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from amused.tokenizer.presets import UVIT_CONFIGS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import engine_run, preset_tokens  # noqa: E402  (the engine run benchmarks/train.py times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--preset", default="small", choices=list(UVIT_CONFIGS))
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (metrics are logged every --warmup steps)")
    ms = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = str(Path(tmp) / "tokens")
        preset_tokens(dataset, args.preset, [512] * 4)
        for pair in range(args.pairs):
            for on in (False, True):
                torch.set_num_threads(args.threads)  # off: the count to compare at; on sets it itself
                rate = engine_run(Path(tmp) / f"run-{pair}-{int(on)}", {"preset": args.preset}, dataset, args.batch,
                                  args.steps, args.warmup, zero=2, workers=1, deterministic=on, threads=args.threads)
                ms[on].append(1000 * args.batch / rate)
            print(f"pair {pair}: off {ms[False][-1]:.1f} ms/step, on {ms[True][-1]:.1f} ms/step "
                  f"({100 * (ms[True][-1] / ms[False][-1] - 1):+.1f}%)", flush=True)
    costs = sorted(b / a - 1 for a, b in zip(ms[False], ms[True]))
    print(f"U-ViT {args.preset}, batch {args.batch}, {args.threads} threads, {args.steps} timed steps per run: "
          f"off {sorted(ms[False])[len(ms[False]) // 2]:.1f} ms/step, on {sorted(ms[True])[len(ms[True]) // 2]:.1f} "
          f"ms/step (medians); cost {100 * costs[len(costs) // 2]:+.1f}% (median of {args.pairs} pairs)")


if __name__ == "__main__":
    main()
