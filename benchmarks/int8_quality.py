"""int8 against fp32 on a trained U-ViT: tokens, prompt following, weight bytes.

The same prompts and per-image seeds through `amused sample`'s sampler twice, fp32 and
`quantize_uvit(..., "int8", "cpu")` as `amused sample --quantize int8` runs it (compiled;
the sampling time printed includes compiling, once per batch shape: `--batch` should
divide prompts x seeds). Printed: the share of tokens equal to fp32's,
the demo's prompt-following score (shape and colour classifier) of each, and the bytes
of the U-ViT's weights. Sample settings: configs/demo.yaml's `sample:`.

    python benchmarks/int8_quality.py --checkpoint /tmp/clean/demo-out/run/train/checkpoints/step_00001600
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import yaml

from amused.demo.showcase import prompt_following
from amused.training.config import SampleConfig
from amused.training.inference.quantize import quantize_uvit, weight_bytes
from amused.training.inference.sample import Sampler, checkpoint_models, load_trained_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompts", default="configs/demo-prompts.txt")
    parser.add_argument("--config", default="configs/demo.yaml", help="its `sample:` section")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt, each from its own seed")
    parser.add_argument("--batch", type=int, default=56)
    args = parser.parse_args()

    prompts = [p.strip() for p in open(args.prompts) if p.strip() and not p.startswith("#")]
    cfg = SampleConfig(**yaml.safe_load(open(args.config))["sample"])
    fp32 = load_trained_model(args.checkpoint)
    int8 = quantize_uvit(copy.deepcopy(fp32), "int8", "cpu")
    models = checkpoint_models(args.checkpoint)
    samplers = {"fp32": Sampler.from_folders(fp32, *models), "int8": Sampler.from_folders(int8, *models)}
    jobs = [(prompt, seed * 1_000_003 + p) for seed in range(args.seeds) for p, prompt in enumerate(prompts)]
    tokens, images, seconds = {}, {}, {}
    for name, sampler in samplers.items():
        start, parts = time.perf_counter(), []
        for i in range(0, len(jobs), args.batch):
            batch = jobs[i:i + args.batch]
            parts.append(sampler.generate([p for p, _ in batch], cfg, [torch.Generator().manual_seed(s) for _, s in batch]))
        tokens[name] = torch.cat(parts)
        seconds[name] = time.perf_counter() - start
        images[name] = sampler.decode(tokens[name])
        print(f"{name}: sampled in {seconds[name]:.1f} s", flush=True)
    expanded = [p for p, _ in jobs]
    equal = (tokens["int8"] == tokens["fp32"]).float()
    print(f"{len(prompts)} prompts x {args.seeds} seeds, {cfg}")
    print(f"tokens equal to fp32's: {equal.mean():.3f} (images entirely equal: "
          f"{equal.flatten(1).all(1).float().mean():.3f})")
    for name in samplers:
        score = prompt_following(images[name], expanded)
        print(f"{name}: prompt following {score['score']:.3f} ({score['matches']}/{score['samples']}), "
              f"U-ViT weights {weight_bytes(samplers[name].model):,} bytes, sampling {seconds[name]:.1f} s")


if __name__ == "__main__":
    main()
