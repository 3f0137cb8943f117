"""MaskGIT-style sampling as aMUSEd does it, standing on its own (diffusers marks its
aMUSEd pipelines deprecated).

Each step: logits for [negative, prompt] in one batch, guided = neg + s * (cond - neg);
one token drawn per position from the softmax (known tokens kept); the mask ratio of
the schedule at (i + 1) / N decides how many of the drawn tokens go back under the mask:
the least confident, confidence = log p + temperature_i * Gumbel noise, temperature
annealed linearly. With one generator the random draws are made in the same order and
shapes as diffusers' AmusedScheduler, so for the same weights, prompt and seed the
tokens are the same (tests/test_sample.py pins this against diffusers 0.42.1). With a
list of generators, one per image, every image's draws come from its own stream, so an
image does not depend on which batch it was generated in (evaluation relies on this).

LoRA: a model may carry adapters, those of a LoRA training checkpoint or exported ones
put on a base (`load_exported_adapters`, the folder `amused export --lora` writes and
diffusers' `AmusedLoraLoaderMixin` reads); `lora_scale` weighs them on every forward the
way diffusers' pipeline does with `cross_attention_kwargs={"scale": s}` (0 = the base).

`save_images` writes each image of a batch as its own PNG with what made it (prompt, seed,
index in the batch, the sampler settings) in the PNG's tEXt chunks, as `amused sample
--output-dir` does, into a folder without an earlier sample's images; `Image.open(path).text`
reads them back.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import UVit2DModel
from diffusers.loaders import AmusedLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from PIL import Image, PngImagePlugin

from amused.plumbing.fsio import atomic_writer, list_files
from amused.plumbing.storage import join, local_folder
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.text import TextEncoder
from amused.training.checkpoint import Checkpoint
from amused.training.config import SampleConfig, TrainConfig, parse_config
from amused.training.lora import ADAPTER, adapter_state_dict, has_adapters, load_trained
from amused.training.uvit.model import build_model

# The adapters file of an exported LoRA folder and the prefix of its U-ViT keys: diffusers' names.
LORA_WEIGHTS = LORA_WEIGHT_NAME_SAFE
LORA_PREFIX = AmusedLoraLoaderMixin.transformer_name

Generators = torch.Generator | list[torch.Generator] | None


def _mask_ratio(schedule: str, progress: torch.Tensor) -> torch.Tensor:
    return torch.cos(progress * math.pi / 2) if schedule == "cosine" else 1 - progress


def _per_image(generator: Generators, draw: Callable[[torch.Generator | None, slice], torch.Tensor]) -> torch.Tensor:
    """`draw(gen, rows)` for the whole batch from one generator, or row by row from one each."""
    if isinstance(generator, list):
        return torch.cat([draw(g, slice(j, j + 1)) for j, g in enumerate(generator)])
    return draw(generator, slice(None))


def _uniform(generator: Generators, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    def draw(gen, rows):
        n = len(range(*rows.indices(shape[0])))
        device = gen.device if gen is not None else like.device
        return torch.zeros((n, *shape[1:]), dtype=like.dtype, device=device).uniform_(0, 1, generator=gen)

    return _per_image(generator, draw).to(like.device)


def _gumbel(generator: Generators, like: torch.Tensor) -> torch.Tensor:
    u = _uniform(generator, tuple(like.shape), like)
    return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))


def _multinomial(generator: Generators, probs: torch.Tensor) -> torch.Tensor:
    """One draw per position of probs (B, seq, V) -> (B, seq)."""
    def draw(gen, rows):
        p = probs[rows]
        p = p.to(gen.device) if gen is not None else p
        return torch.multinomial(p.float().reshape(-1, p.shape[-1]), 1, generator=gen).view(p.shape[:-1])

    return _per_image(generator, draw).to(probs.device)


@torch.no_grad()
def decode_tokens(model: UVit2DModel, hidden: torch.Tensor, pooled: torch.Tensor, neg_hidden: torch.Tensor,
                  neg_pooled: torch.Tensor, size: tuple[int, int], cfg: SampleConfig, generator: Generators = None,
                  tokens: torch.Tensor | None = None, starting_mask_ratio: float | torch.Tensor = 1.0,
                  first_step: int = 0, lora_scale: float = 1.0) -> torch.Tensor:
    """Token ids (B, h, w) for text embeddings (B, L, D) / (B, P).

    `tokens` (B, h, w) starts the decoding from partly known ids (mask id where unknown),
    as inpainting and variations do; known ids are never resampled. `first_step` skips
    the schedule's first steps (a variation starts where its mask ratio is reached).
    `lora_scale` weighs the model's adapters, if it has any, as diffusers' pipeline does.
    """
    mask_id = model.config.vocab_size - 1
    side = model.config.sample_size
    b = hidden.shape[0]
    device = hidden.device
    latents = tokens.clone() if tokens is not None else torch.full((b, side, side), mask_id, dtype=torch.long,
                                                                    device=device)
    start_ratio = torch.as_tensor(starting_mask_ratio, dtype=torch.float32, device=device).reshape(-1, 1)
    guided = cfg.guidance_scale > 1.0
    width, height = size
    micro = torch.tensor([width, height, cfg.crop_top, cfg.crop_left, cfg.aesthetic_score], device=device,
                         dtype=hidden.dtype).expand(2 * b if guided else b, -1)
    if guided:
        hidden, pooled = torch.cat([neg_hidden, hidden]), torch.cat([neg_pooled, pooled])
    temperatures = torch.linspace(cfg.temperature_start, cfg.temperature_end, cfg.steps, device=device)
    seq = side * side
    for i in range(first_step, cfg.steps):
        logits = model(torch.cat([latents] * 2) if guided else latents, micro_conds=micro, pooled_text_emb=pooled,
                       encoder_hidden_states=hidden, cross_attention_kwargs={"scale": lora_scale})
        if guided:
            uncond, cond = logits.chunk(2)
            logits = uncond + cfg.guidance_scale * (cond - uncond)
        flat = latents.reshape(b, seq)
        unknown = flat == mask_id
        probs = logits.reshape(b, logits.shape[1], seq).permute(0, 2, 1).softmax(-1)
        drawn = torch.where(unknown, _multinomial(generator, probs), flat)
        if i == cfg.steps - 1:
            latents = drawn.view(b, side, side)
            break
        ratio = start_ratio * _mask_ratio(cfg.schedule, torch.tensor((i + 1) / cfg.steps, device=device))
        mask_len = torch.clamp(torch.minimum(unknown.sum(-1, keepdim=True) - 1, (seq * ratio).floor()), min=1)
        chosen = torch.gather(probs, -1, drawn[:, :, None])[:, :, 0]
        chosen = torch.where(unknown, chosen, torch.finfo(chosen.dtype).max)
        confidence = torch.log(chosen.clamp(1e-20)) + temperatures[i] * _gumbel(generator, chosen)
        cut_off = torch.gather(confidence.sort(-1).values, 1, mask_len.long())
        latents = torch.where(confidence < cut_off, mask_id, drawn).view(b, side, side)
    return latents


def token_mask(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A pixel mask (H, W), non-zero = regenerate, as a bool token-grid mask (h, w): the
    grey mask resized with Lanczos and thresholded at one half, as aMUSEd's inpainting."""
    grey = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), mode="L")
    small = np.asarray(grey.resize((grid[1], grid[0]), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    return small >= 0.5


class Sampler:
    """The U-ViT with the VQ-GAN and text encoder it was trained with, loaded once (an
    evaluation actor keeps one for all its prompts)."""

    def __init__(self, model: UVit2DModel, image: ImageTokenizer, text: TextEncoder, lora_scale: float = 1.0):
        self.device = image.device
        self.lora_scale = lora_scale
        self.model = model.to(self.device).eval()
        self.image, self.text = image, text
        self.grid = (model.config.sample_size, model.config.sample_size)
        self.side = model.config.sample_size * image.downsample

    @classmethod
    def from_folders(cls, model: UVit2DModel, vqgan: str, text_encoder: str, device: str = "cpu",
                     lora_scale: float = 1.0) -> "Sampler":
        return cls(model, ImageTokenizer.from_pretrained(vqgan, device=device),
                   TextEncoder.from_pretrained(text_encoder, device=device), lora_scale=lora_scale)

    def _decode(self, prompts: list[str], cfg: SampleConfig, generator: Generators, **start) -> torch.Tensor:
        cond, neg = self.text.encode(prompts), self.text.encode([cfg.negative_prompt] * len(prompts))
        return decode_tokens(self.model, cond.hidden_states, cond.pooled, neg.hidden_states, neg.pooled,
                             (self.side, self.side), cfg, generator=generator, lora_scale=self.lora_scale, **start)

    def _tokens_of(self, image: np.ndarray, n: int) -> torch.Tensor:
        pixels = np.asarray(image)
        if pixels.shape != (self.side, self.side, 3) or pixels.dtype != np.uint8:
            raise ValueError(f"expected a {self.side}x{self.side} RGB uint8 image, got {pixels.shape} {pixels.dtype}")
        ids = torch.from_numpy(self.image.encode(pixels[None]).astype(np.int64)).to(self.device)
        return ids.expand(n, -1, -1)

    def generate(self, prompts: list[str], cfg: SampleConfig, generator: Generators = None) -> torch.Tensor:
        return self._decode(prompts, cfg, generator)

    def inpaint(self, prompts: list[str], image: np.ndarray, mask: np.ndarray, cfg: SampleConfig,
                generator: Generators = None) -> torch.Tensor:
        """Regenerate the tokens under `mask` (pixels, non-zero = regenerate); the others are
        the image's tokens and never resampled. aMUSEd's linear schedule, starting at the
        masked fraction."""
        known = self._tokens_of(image, len(prompts))
        hole = torch.from_numpy(token_mask(mask, self.grid)).to(self.device)
        if not hole.any():
            raise ValueError("the mask covers no token: nothing to inpaint")
        tokens = torch.where(hole, self.model.config.vocab_size - 1, known)
        ratio = hole.float().mean()
        return self._decode(prompts, dataclasses.replace(cfg, schedule="linear"), generator, tokens=tokens,
                            starting_mask_ratio=ratio)

    def vary(self, prompts: list[str], image: np.ndarray, strength: float, cfg: SampleConfig,
             generator: Generators = None) -> torch.Tensor:
        """A variation: each token of the image re-masked with the schedule's ratio at step
        N - int(N * strength), then the remaining steps run (strength 0.5 = the last 6 of 12)."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        first = cfg.steps - int(cfg.steps * strength)
        if first == cfg.steps:
            raise ValueError(f"strength {strength} leaves no step of {cfg.steps} to run")
        tokens = self._tokens_of(image, len(prompts))
        ratio = _mask_ratio(cfg.schedule, torch.tensor(first / cfg.steps)) if first else torch.tensor(1.0)
        remask = _uniform(generator, tuple(tokens.shape), torch.empty(0, device=self.device)) < ratio
        tokens = torch.where(remask, self.model.config.vocab_size - 1, tokens)
        return self._decode(prompts, cfg, generator, tokens=tokens, first_step=first)

    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        return self.image.decode(tokens)


# The files `amused sample --output-dir` writes: one NNN-<prompt>.png per image, and its grid.
GRID = "grid.png"
_IMAGE = re.compile(r"\d{3,}-[a-z0-9-]*\.png")


def earlier_samples(output_dir: str) -> list[str]:
    """The names of an earlier sample's files in `output_dir` (local or URL): its images and
    grid, which a new sample would overwrite, or mix with where its batch was longer."""
    names = [url.rpartition("/")[2] for url in list_files(output_dir, ".png", required=False)]
    return [n for n in names if n == GRID or _IMAGE.fullmatch(n)]


def check_new_samples(output_dir: str) -> None:
    """Refuses a folder that holds an earlier sample's files: one folder per sample run."""
    earlier = earlier_samples(output_dir)
    if earlier:
        raise FileExistsError(f"--output-dir {output_dir} already holds an earlier sample's images "
                              f"({', '.join(earlier[:2])}{', ...' if len(earlier) > 2 else ''}): choose a new folder "
                              "(or remove them); samples never overwrite or mix with earlier ones")


def save_images(images: np.ndarray, prompts: list[str], output_dir: str, cfg: SampleConfig, seed: int,
                extra: dict[str, object] | None = None) -> list[str]:
    """Each image of `images` (N, H, W, 3 uint8, made for `prompts` with one generator seeded
    `seed`) as DIR/NNN-<prompt>.png (local or any fsspec URL, each whole or not at all; a
    folder holding an earlier sample's images is refused, `check_new_samples`), its tEXt
    chunks: prompt, seed, index and batch_size (the batch's images share the generator: the
    same prompts and seed give the same images), every SampleConfig setting and `extra`
    (what else made them: the model, the device, a start image). Returns the URLs."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    check_new_samples(output_dir)
    common = {"seed": seed, "batch_size": len(images), **dataclasses.asdict(cfg), **(extra or {}),
              "Software": "amused sample"}
    urls = []
    for index, (pixels, prompt) in enumerate(zip(images, prompts)):
        info = PngImagePlugin.PngInfo()
        for key, value in {"prompt": prompt, "index": index, **common}.items():
            info.add_text(key, str(value))  # tEXt; iTXt (UTF-8) where the text is not Latin-1
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "image"
        url = join(output_dir, f"{index:03d}-{slug}.png")
        with atomic_writer(url) as fh:
            Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(fh, format="PNG", pnginfo=info)
        urls.append(url)
    return urls


def load_trained_model(checkpoint: str | Path, ema: bool = True) -> UVit2DModel:
    """The U-ViT of a training checkpoint folder: the architecture from its config, the
    weights from `ema.safetensors` (default) or DeepSpeed's model states (weights only).
    A LoRA run's checkpoint: its base (model.pretrained) with its adapters."""
    trained = Checkpoint.at(checkpoint)
    cfg = trained.config(parse_config)
    ema = uses_ema(cfg, ema)
    if cfg.lora.enabled:
        return load_trained(trained, ema)
    model = build_model(cfg.model.preset, cfg.model.pretrained)
    model.load_state_dict(trained.state_dict(ema), strict=True)
    return model.eval()


def uses_ema(cfg: TrainConfig, ema: bool) -> bool:
    """Whether the EMA weights are read: asked for, and kept by the run (a StyleDrop run
    keeps none; its raw weights are then the only ones)."""
    return ema and cfg.ema.enabled


def load_pretrained_model(folder: str) -> UVit2DModel:
    """The U-ViT of an exported or released aMUSEd pipeline folder (or a bare transformer folder)."""
    return build_model("pretrained", folder).eval()  # the preset name picks random weights only


def load_exported_adapters(model: UVit2DModel, url: str) -> UVit2DModel:
    """Puts the adapters of the folder `url` (`amused export --lora`, or any diffusers aMUSEd
    LoRA of the U-ViT) on `model`, through diffusers' own loader, so they act as they do in
    diffusers (rank and alpha from the file's LoRA metadata; without it diffusers' guess,
    alpha = rank). Every adapter must fit a module of the model and all must load."""
    folder = local_folder(url)
    if not (folder / LORA_WEIGHTS).is_file():
        raise ValueError(f"{url} holds no LoRA adapters (no {LORA_WEIGHTS}; amused export --lora writes one)")
    if has_adapters(model):
        raise ValueError(f"--lora {url}: the model already carries adapters (a LoRA checkpoint): merge those first "
                         "(amused export --merge-lora) and sample the merged folder with --pretrained")
    state, alphas, metadata = AmusedLoraLoaderMixin.lora_state_dict(str(folder), return_lora_metadata=True)
    others = sorted({k.partition(".")[0] for k in state if not k.startswith(f"{LORA_PREFIX}.")})
    if others:
        raise ValueError(f"{url}: adapters for {others} besides the U-ViT's ({LORA_PREFIX}.*): not supported")
    given = {k.removeprefix(f"{LORA_PREFIX}."): tuple(v.shape) for k, v in state.items()}
    for key, shape in given.items():
        _check_fits(model, key, shape, url)
    AmusedLoraLoaderMixin.load_lora_into_transformer(state, alphas, model, adapter_name=ADAPTER, metadata=metadata)
    loaded = set(adapter_state_dict(model))
    if loaded != set(given):
        raise ValueError(f"{url}: {len(set(given) - loaded)} adapter(s) of the file did not load "
                         f"(e.g. {sorted(set(given) - loaded)[:1]}) and {len(loaded - set(given))} made are not in it")
    return model.eval()


def _check_fits(model: UVit2DModel, key: str, shape: tuple[int, ...], where: str) -> None:
    """One adapter matrix of `where` against the linear layer of `model` it adapts."""
    name, _, part = key.rpartition(".lora_")
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{where}: adapter {key} adapts {name}, which the base model lacks: adapters of another "
                         "architecture") from None
    if not isinstance(layer, torch.nn.Linear) or part not in ("A.weight", "B.weight"):
        raise ValueError(f"{where}: adapter {key} is not a LoRA matrix of a linear layer")
    fits = len(shape) == 2 and (shape[1] == layer.in_features if part == "A.weight" else
                                shape[0] == layer.out_features)
    if not fits:
        raise ValueError(f"{where}: adapter {key} has shape {shape}; the base's {name} maps {layer.in_features} -> "
                         f"{layer.out_features}: adapters of another base model")


def checkpoint_models(checkpoint: str | Path, vqgan: str | None = None, text_encoder: str | None = None
                      ) -> tuple[str, str]:
    """The VQ-GAN and text encoder a checkpoint was trained with, unless given."""
    trained = Checkpoint.at(checkpoint).config(parse_config).model
    vqgan, text_encoder = vqgan or trained.vqgan, text_encoder or trained.text_encoder
    if not vqgan or not text_encoder:
        raise ValueError("the checkpoint's config names no VQ-GAN / text encoder: pass --vqgan and --text-encoder")
    return vqgan, text_encoder
