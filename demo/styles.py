"""A drawing style the demo's shapes never had, and the classifier that finds it.

The style is "outline": the shape drawn as a ring of its colour around background-coloured
inside, where every demo image fills it. `outline_image` draws one like `shapes.shape_image`
(same palette, centring and sizes); `is_outline` reads it back from the pixels: the shape's
region (as `classify_shape_image` finds it) with its holes filled must be much larger than
the region itself.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from amused.demo.shapes import COLOURS, SHAPES, classify_shape_image, shape_region
from amused.demo.showcase import prompt_following, seeded_samples, seeded_tokens
from amused.training.config import SampleConfig
from amused.training.inference.sample import Sampler

OUTLINE = 4  # pixels of the ring at 32 px: two tokens of the demo's 16 x 16 grid, which its VQ-GAN keeps


def outline_image(colour: str, shape: str, background: str, side: int = 32, width: int = OUTLINE,
                  size: float = 0.8) -> Image.Image:
    """A `colour` `shape` on a `background` background, drawn as a `width`-pixel outline."""
    img = Image.new("RGB", (side, side), COLOURS[background])
    draw = ImageDraw.Draw(img)
    extent = int(side * size)
    x0 = y0 = (side - extent) // 2
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    ink = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, outline=ink, width=width)
    elif shape == "square":
        draw.rectangle(box, outline=ink, width=width)
    elif shape == "triangle":
        # PIL's polygon draws `width` inwards on this version; a closed line is the same ring.
        points = [(x0 + extent // 2, y0), (x0, y0 + extent - 1), (x0 + extent - 1, y0 + extent - 1)]
        draw.line([*points, points[0]], fill=ink, width=width, joint="curve")
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def is_outline(img: Image.Image, hollow: float = 0.2) -> bool:
    """Whether the largest region that differs from the background is a ring: its filled
    area is at least 1 / (1 - `hollow`) times its own. A filled shape (every demo image) has no hole; a decoder's
    stray pixels do not make one."""
    region, _ = shape_region(np.asarray(img.convert("RGB"), np.float32))  # the region the shape classifier reads
    if region is None or region.sum() < 0.02 * region.size:
        return False
    filled = ndimage.binary_fill_holes(region)
    holes = filled & ~region
    return bool(holes.sum() >= hollow * filled.sum())


def shows_style(img: Image.Image, colour: str, shape: str) -> bool:
    """The feedback signal: an outline of the prompt's own colour and shape (a styled sample
    that kept its content)."""
    return is_outline(img) and classify_shape_image(img)[:2] == (colour, shape)


def select_feedback(sampler: Sampler, template: str, pairs: list[tuple[str, str]], cfg: SampleConfig,
                    per_prompt: int, seed: int) -> tuple[np.ndarray, list[str], int]:
    """StyleDrop's feedback round: `per_prompt` samples of `template` for each (colour, shape)
    of `pairs`, kept where `shows_style` accepts them; (their token grids, their prompts, the
    number drawn)."""
    prompts = [template.replace("{}", f"{c} {s}") for c, s in pairs]
    tokens, expanded = seeded_tokens(sampler, prompts, cfg, per_prompt, seed)
    images = sampler.decode(tokens)
    keep = [i for i, p in enumerate(expanded)
            if shows_style(Image.fromarray(images[i]), *pairs[i // per_prompt])]
    return tokens[keep].cpu().numpy(), [expanded[i] for i in keep], len(expanded)


def held_out_prompts(template: str, seen: set[tuple[str, str]] | list[tuple[str, str]]) -> list[str]:
    """`template` ("a {} in [V] style") for every (colour, shape) pair of the demo except `seen`."""
    return [template.replace("{}", f"{c} {s}") for c in COLOURS for s in SHAPES if (c, s) not in seen]


def outline_share(images: np.ndarray) -> float:
    return sum(is_outline(Image.fromarray(img)) for img in images) / len(images)


def measure_style(tuned: Sampler, base: Sampler, style_prompts: list[str], plain_prompts: list[str],
                  cfg: SampleConfig, per_prompt: int, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """The learning proof's figures: the share of outlines in samples of `style_prompts`
    (with [V]) by the tuned model (adapters at scale 1) and by the base (the classifier's
    false positives), and the demo's prompt-following score on `plain_prompts` (no [V])
    with the adapters at scale 0 and 1 and with the base; plus the images, by name."""
    images, figures = {}, {}
    for name, sampler, scale, prompts in (("style_tuned", tuned, 1.0, style_prompts),
                                          ("style_base", base, 1.0, style_prompts),
                                          ("plain_scale0", tuned, 0.0, plain_prompts),
                                          ("plain_scale1", tuned, 1.0, plain_prompts),
                                          ("plain_base", base, 1.0, plain_prompts)):
        sampler.lora_scale = scale
        images[name], expanded = seeded_samples(sampler, prompts, cfg, per_prompt, seed)
        figures[name] = {"outline": outline_share(images[name]), "samples": len(expanded)}
        if name.startswith("plain"):
            figures[name]["prompt_following"] = prompt_following(images[name], expanded)["score"]
        else:  # which colour and shape the styled samples show, beside their style
            pairs = [tuple(p.split()[1:3]) for p in expanded]
            figures[name]["colour_shape"] = sum(
                classify_shape_image(Image.fromarray(img))[:2] == pair
                for img, pair in zip(images[name], pairs)) / len(expanded)
            figures[name]["outline_colour_shape"] = sum(
                shows_style(Image.fromarray(img), *pair) for img, pair in zip(images[name], pairs)) / len(expanded)
        print(f"style proof: {name}: {figures[name]}", flush=True)  # each set takes CPU minutes
    tuned.lora_scale = 1.0
    return figures, images
