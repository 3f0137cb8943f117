"""Sampling throughput: `amused sample`'s sampler (fp32, and with `--quantize int8`) vs
diffusers' AmusedPipeline.

All run the whole text-to-image path (text encoder for prompt and negative prompt,
`--steps` MaskGIT steps with classifier-free guidance, VQ-GAN decode) on the same
weights, settings and seed; fp32 tokens are checked equal to diffusers' first, so the
two do the same work (int8's share of equal tokens is printed). Printed: images/s of
each per batch size and the ratio to diffusers (goal >= 1.0x fp32 on CPU, >= 1.5x on a
GPU; int8 >= 1.5x). Steady state: one untimed run first, then the median of `--repeats`
runs, the variants interleaved (A B C A B C). aMUSEd presets without `--models` run on
random aMUSEd-size VQ-GAN and CLIP ViT-L/14 text tower.

    python benchmarks/sample.py                          # CPU, the bench-sample U-ViT (9.6M parameters), 128 px
    python benchmarks/sample.py --batches 1 4 --quantize int8 --compile --repeats 3
    python benchmarks/sample.py --device cuda --preset amused-256 --batches 1 8 --quantize int8
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AmusedPipeline, AmusedScheduler
from pretokenize import write_models

from amused.demo.tiny_models import write_tiny_models
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.presets import UVIT_CONFIGS
from amused.tokenizer.text import TextEncoder
from amused.training.config import SampleConfig
from amused.training.inference.quantize import MODES, quantize_uvit
from amused.training.inference.sample import Sampler
from amused.training.uvit.model import build_model

DIFFUSERS = "diffusers AmusedPipeline"
PROMPTS = ["a red circle on a grey background", "a blue square on a white background", "a green triangle",
           "a yellow star on a black background"]


def _seconds(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _medians(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each run, interleaved so that drift in the machine's speed (2
    shared cores here) falls on all alike; one untimed run of each first."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_seconds(run))
            print(f"  {name}: {times[name][-1]:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def diffusers_pipeline(sampler: Sampler) -> AmusedPipeline:
    """diffusers' pipeline on the very modules (weights, dtype, device) of `sampler`."""
    pipe = AmusedPipeline(vqvae=sampler.image.model, tokenizer=sampler.text.tokenizer, text_encoder=sampler.text.model,
                          transformer=sampler.model,
                          scheduler=AmusedScheduler(mask_token_id=sampler.model.config.vocab_size - 1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def token_agreement(pipe: AmusedPipeline, samplers: dict[str, Sampler], prompts: list[str], cfg: SampleConfig,
                    generator: str = "cpu") -> dict[str, float]:
    """The share of each sampler's tokens equal to diffusers' for the same prompts and seed (a
    generator on the device `generator`: both draw their random numbers there)."""
    theirs = pipe(prompts, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, output_type="latent",
                  generator=torch.Generator(generator).manual_seed(1)).images.cpu()
    return {name: (s.generate(prompts, cfg, torch.Generator(generator).manual_seed(1)).cpu() == theirs)
            .float().mean().item() for name, s in samplers.items()}


def timed_runs(pipe: AmusedPipeline | None, samplers: dict[str, Sampler], prompts: list[str], cfg: SampleConfig,
               repeats: int, generator: str = "cpu") -> dict[str, float]:
    """Median seconds of the whole text-to-image path (decode included) of diffusers' pipeline
    (under DIFFUSERS; none without `pipe`) and each sampler, interleaved."""
    def seeded():
        return torch.Generator(generator).manual_seed(1)

    runs = {DIFFUSERS: lambda: pipe(prompts, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                                    output_type="np", generator=seeded())} if pipe else {}
    runs |= {name: (lambda s=sampler: s.decode(s.generate(prompts, cfg, seeded()))) for name, sampler in samplers.items()}
    return _medians(runs, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-sample", choices=list(UVIT_CONFIGS))
    parser.add_argument("--models", help="a pipeline folder with vqvae/ text_encoder/ tokenizer/ (default: tiny, "
                                         "or random aMUSEd-size for the amused presets)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--guidance", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quantize", choices=MODES, help="also time `amused sample --quantize`")
    parser.add_argument("--compile", action="store_true",
                        help="also time fp32 under torch.compile (Inductor, freezing), and compile the quantized "
                             "model on a GPU too")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or str(write_models(Path(tmp)) if args.preset.startswith("amused")
                                    else write_tiny_models(Path(tmp) / "tiny"))
        transformer = build_model(args.preset).eval()
        image = ImageTokenizer.from_pretrained(models, device=args.device)
        text = TextEncoder.from_pretrained(models, device=args.device)
        samplers = {"amused sample": Sampler(transformer, image, text)}
        if args.compile:
            compiled = torch.compile(copy.deepcopy(transformer), options={"freezing": True})
            samplers["amused sample, compiled"] = Sampler(compiled, image, text)
        if args.quantize:
            # quantize_uvit's default compiles on CPU, where torchao's int8 matmul needs it.
            model = quantize_uvit(copy.deepcopy(transformer), args.quantize, args.device, compile=args.compile or None)
            samplers[f"--quantize {args.quantize}"] = Sampler(model, image, text)
        pipe = diffusers_pipeline(samplers["amused sample"])
        cfg = SampleConfig(steps=args.steps, guidance_scale=args.guidance)
        params = sum(p.numel() for p in transformer.parameters()) / 1e6
        print(f"U-ViT {args.preset} ({params:.1f}M parameters), {samplers['amused sample'].side} px, {args.steps} "
              f"steps, CFG {args.guidance}, {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
        for batch in args.batches:
            prompts = (PROMPTS * batch)[:batch]
            for name, equal in token_agreement(pipe, samplers, prompts, cfg).items():
                if name == "amused sample" and equal < 1:
                    raise SystemExit("tokens differ: the two samplers do not do the same work")
                print(f"batch {batch}, {name}: tokens equal to diffusers' fp32: {equal:.3f}", flush=True)
            seconds = timed_runs(pipe, samplers, prompts, cfg, args.repeats)
            theirs = seconds[DIFFUSERS]
            print(f"| batch | {' | '.join(seconds)} |")
            print(f"| ---: |{' ---: |' * len(seconds)}")
            print(f"| {batch} | " + " | ".join(f"{batch / s:.3f} images/s ({s:.1f} s, {theirs / s:.2f}x)"
                                                for s in seconds.values()) + " |")


if __name__ == "__main__":
    main()
