"""What a person looks at after a run: a grid of samples with their prompts under them
and, for the generated shape images, a prompt-following score (the fraction of samples
whose shape colour and shape, read from the pixels by a fixed classifier, match the
prompt)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from amused.demo.shapes import caption_parts, classify_shape_image
from amused.plumbing.fsio import file_exists, read_json, write_json_atomic
from amused.plumbing.plots import image_grid, save_png
from amused.plumbing.storage import join
from amused.training.checkpoint import Checkpoint
from amused.training.config import SampleConfig
from amused.training.inference.sample import Sampler, checkpoint_models, load_trained_model


def prompt_following(images, prompts: list[str]) -> dict:
    """Fraction of images (uint8 N x H x W x 3) whose (colour, shape) match their prompt."""
    hits = []
    for img, prompt in zip(images, prompts):
        colour, shape, _ = classify_shape_image(Image.fromarray(img))
        hits.append((colour, shape) == caption_parts(prompt)[:2])
    return {"score": sum(hits) / len(hits), "matches": sum(hits), "samples": len(hits)}


def seeded_tokens(sampler: Sampler, prompts: list[str], cfg: SampleConfig, per_prompt: int, seed: int = 0
                  ) -> tuple[torch.Tensor, list[str]]:
    """`per_prompt` token grids of each prompt, grid i of prompt p from its own generator (seed,
    p, i), so a sample does not depend on the others; (tokens,
    the prompt of each)."""
    expanded = [p for p in prompts for _ in range(per_prompt)]
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + p * 1009 + i)
                  for p in range(len(prompts)) for i in range(per_prompt)]
    return sampler.generate(expanded, cfg, generators), expanded


def seeded_samples(sampler: Sampler, prompts: list[str], cfg: SampleConfig, per_prompt: int, seed: int = 0
                   ) -> tuple[np.ndarray, list[str]]:
    """`seeded_tokens` decoded: (uint8 images, the prompt of each)."""
    tokens, expanded = seeded_tokens(sampler, prompts, cfg, per_prompt, seed)
    return sampler.decode(tokens), expanded


def sample_grid(run_dir: str, prompts: list[str], out: str, cfg: SampleConfig, score_shapes: bool,
                per_prompt: int = 4, seed: int = 0) -> dict:
    """Samples of the run's latest checkpoint (EMA weights): `per_prompt` per prompt, image
    i of prompt p drawn from its own generator (seed, p, i). Writes grid.png and
    result.json under `out` (local or any fsspec URL); a rerun for the same checkpoint is a no-op."""
    latest = Checkpoint.latest(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to sample from")
    checkpoint = str(latest.folder)
    result_url = join(out, "result.json")
    if file_exists(result_url) and read_json(result_url).get("checkpoint") == checkpoint:
        return read_json(result_url)
    sampler = Sampler.from_folders(load_trained_model(checkpoint), *checkpoint_models(checkpoint))
    images, expanded = seeded_samples(sampler, prompts, cfg, per_prompt, seed)
    grid = save_png(image_grid(images, expanded, columns=per_prompt * 2, cell=max(96, images.shape[1])),
                    join(out, "grid.png"))
    result = {"checkpoint": checkpoint, "step": latest.step, "grid": grid, "images": len(images)}
    if score_shapes:
        result["prompt_following"] = prompt_following(images, expanded)
    write_json_atomic(result_url, result)
    return result
