"""Sampling throughput: `amused sample`'s sampler vs diffusers' AmusedPipeline.

Both run the whole text-to-image path (text encoder for prompt and negative prompt,
`--steps` MaskGIT steps with classifier-free guidance, VQ-GAN decode) on the same
weights, settings and seed; the tokens are checked equal first, so the two do the same
work. Printed: images/s of each per batch size and the ratio ours / diffusers
(goal >= 1.0x on CPU, >= 1.5x on a GPU). Steady state: one untimed run first, then the
median of `--repeats` runs, the two alternated.

    python benchmarks/sample.py                          # CPU, the bench-sample U-ViT (9.6M parameters), 128 px
    python benchmarks/sample.py --device cuda --preset amused-256 --batches 1 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AmusedPipeline, AmusedScheduler

from amused.demo.tiny_models import write_tiny_models
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.presets import UVIT_CONFIGS
from amused.tokenizer.text import TextEncoder
from amused.training.config import SampleConfig
from amused.training.inference.sample import Sampler
from amused.training.uvit.model import build_model

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


def _compare(theirs, ours, repeats: int) -> tuple[float, float]:
    """Median seconds of each, the runs alternated so that drift in the machine's speed
    (2 shared cores here) falls on both alike; one untimed run of each first."""
    theirs(), ours()
    times = [(_seconds(theirs), _seconds(ours)) for _ in range(repeats)]
    return statistics.median(t for t, _ in times), statistics.median(o for _, o in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-sample", choices=list(UVIT_CONFIGS))
    parser.add_argument("--models", help="a pipeline folder with vqvae/ text_encoder/ tokenizer/ (default: tiny)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--guidance", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or str(write_tiny_models(Path(tmp) / "tiny"))
        transformer = build_model(args.preset).eval()
        image = ImageTokenizer.from_pretrained(models, device=args.device)
        text = TextEncoder.from_pretrained(models, device=args.device)
        sampler = Sampler(transformer, image, text)
        pipe = AmusedPipeline(vqvae=image.model, tokenizer=text.tokenizer, text_encoder=text.model,
                              transformer=sampler.model,
                              scheduler=AmusedScheduler(mask_token_id=transformer.config.vocab_size - 1))
        pipe.set_progress_bar_config(disable=True)
        cfg = SampleConfig(steps=args.steps, guidance_scale=args.guidance)
        params = sum(p.numel() for p in transformer.parameters()) / 1e6
        print(f"U-ViT {args.preset} ({params:.1f}M parameters), {sampler.side} px, {args.steps} steps, "
              f"CFG {args.guidance}, {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
        print("| batch | diffusers AmusedPipeline | amused sample | ratio |")
        print("| ---: | ---: | ---: | ---: |")
        for batch in args.batches:
            prompts = (PROMPTS * batch)[:batch]
            theirs_tokens = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                 output_type="latent", generator=torch.Generator().manual_seed(1)).images
            ours_tokens = sampler.generate(prompts, cfg, torch.Generator().manual_seed(1))
            if not torch.equal(theirs_tokens.cpu(), ours_tokens.cpu()):
                raise SystemExit("tokens differ: the two samplers do not do the same work")
            theirs, ours = _compare(
                lambda: pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np",
                             generator=torch.Generator().manual_seed(1)),
                lambda: sampler.decode(sampler.generate(prompts, cfg, torch.Generator().manual_seed(1))), args.repeats)
            print(f"| {batch} | {batch / theirs:.2f} images/s ({theirs * 1000:.0f} ms) | "
                  f"{batch / ours:.2f} images/s ({ours * 1000:.0f} ms) | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
