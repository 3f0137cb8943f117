"""StyleDrop: a style learned from one image, as LoRA adapters on a pretrained aMUSEd.

`finetune_style` is the whole flow, and what `amused finetune-style` calls:

    OUTPUT/styledrop.yaml   the resolved config (configs/styledrop.yaml + the call's keys)
    OUTPUT/data/            the image's token dataset (pipeline/style_data.py): the image
                            tokenized once, each caption embedded once; plus the rows of
                            `style.feedback` (a feedback round's accepted samples), if given
    OUTPUT/train/           the LoRA run (training/uvit/task.py `train`): adapters-only checkpoints
    OUTPUT/samples/         grid.png (the style image, then the prompts' samples) and result.json

Each step counts only once its marker exists (the dataset's shard marker, the run's
checkpoint markers, result.json for the latest checkpoint), so a rerun after a crash
continues where the last one stopped: the dataset is not encoded again and training
resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from amused.demo.styles import held_out_prompts, measure_style, outline_image, seeded_samples, select_feedback
from amused.orchestration.run_config import derive_section
from amused.pipeline.style_data import build_style_dataset, fill_template
from amused.plumbing.config import dotted_parent, from_mapping, opt, read_yaml
from amused.plumbing.fsio import atomic_writer, file_exists, read_bytes, read_json, write_json_atomic
from amused.plumbing.plots import image_grid, save_png
from amused.plumbing.storage import join
from amused.tokenizer.image import fit_image
from amused.training.checkpoint import Checkpoint
from amused.training.config import SampleConfig, TrainConfig, dump_config
from amused.training.inference.sample import Sampler, load_pretrained_model, load_trained_model
from amused.training.uvit.task import train

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "styledrop.yaml")


@dataclass
class StyleConfig:
    image: str = opt(help="the style image (a local path or any fsspec URL)")
    subjects: tuple[str, ...] = opt(help="what the image shows, in one or more wordings: one caption, and one "
                                         "training row, each")
    prompt: str = opt("A {} in [V] style", "caption template: '{}' takes each subject")
    resolution: int = opt(256, "image side in pixels (centre crop): the base model's")
    prompts: tuple[str, ...] = opt((), "the sample grid's prompts (default: the captions)")
    per_prompt: int = opt(4, "sample grid: images per prompt")
    lora_scale: float = opt(1.0, "the adapters' weight in the sample grid (0 = the base alone)")
    seed: int = opt(0, "sample grid: image i of prompt p is drawn from the generator (seed, p, i)")
    feedback: str = opt("", "StyleDrop's iterative training: an .npz (write_feedback) of an earlier round's "
                            "samples a feedback signal accepted, trained on beside the image")

    def __post_init__(self):
        fill_template(self.prompt, list(self.subjects))  # raises on a bad template or subjects
        if self.resolution < 8 or self.per_prompt < 1 or self.lora_scale < 0 or self.seed < 0:
            raise ValueError("style.resolution must be >= 8, per_prompt >= 1, lora_scale and seed >= 0")

    @property
    def captions(self) -> list[str]:
        return fill_template(self.prompt, list(self.subjects))


@dataclass
class StyleDropConfig:
    output: str = opt(help="the fine-tune's folder: data/, train/, samples/ (local or any fsspec URL)")
    pretrained: str = opt(help="the base: an exported or released aMUSEd pipeline folder (its VQ-GAN and text "
                               "encoder make the dataset; its U-ViT gets the adapters)")
    style: StyleConfig = opt(help="the image and its captions")
    train: TrainConfig = opt(help="the LoRA run (run_dir, data.dataset and model.* are set from output/pretrained)")
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def dataset(self) -> str:
        return join(self.output, "data")

    def to_json(self) -> dict:
        return {"output": self.output, "pretrained": self.pretrained, "style": vars(self.style),
                "train": self.train.to_json(), "sample": vars(self.sample)}


def parse_styledrop_config(data: dict) -> StyleDropConfig:
    """The config from a mapping (configs/styledrop.yaml's keys plus output, pretrained,
    style.image, style.subjects); the keys that tie the run to the output and the base are set here."""
    if not isinstance(data, dict):
        raise ValueError(f"styledrop config: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - {"output", "pretrained", "style", "train", "sample"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; allowed here: output, pretrained, style, train, sample")
    for key in ("output", "pretrained"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ValueError(f"{key}: expected a folder path, got {data.get(key)!r}")
    output, pretrained = data["output"], data["pretrained"]
    train_cfg = derive_section(TrainConfig, "train", data.get("train") or {}, {
        "run_dir": join(output, "train"), "data.dataset": join(output, "data"), "model.pretrained": pretrained,
        "model.vqgan": pretrained, "model.text_encoder": pretrained})
    if not train_cfg.lora.enabled:
        raise ValueError("train.lora.enabled: false would fine-tune every weight of the base on one image; a style "
                         "fine-tune trains LoRA adapters")
    return StyleDropConfig(output=output, pretrained=pretrained,
                           style=from_mapping(StyleConfig, data.get("style") or {}, "style"), train=train_cfg,
                           sample=from_mapping(SampleConfig, data.get("sample") or {}, "sample"))


def with_keys(data: dict, keys: dict) -> dict:
    """`data` with each dotted key of `keys` ("train.optim.lr": 0.001) set (a copy)."""
    out = copy.deepcopy(data)
    for dotted, value in keys.items():
        node, leaf = dotted_parent(out, dotted, "styledrop config")
        node[leaf] = value
    return out


def parse_keys(pairs: list[str]) -> dict:
    """Command-line KEY=VALUE pairs (`--set train.optim.lr=1e-3`) as dotted keys, each value read as YAML."""
    keys = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.checkpoint.every=100")
        keys[key.strip()] = yaml.safe_load(value)
    return keys


def finetune_style(image: str, pretrained: str, output: str, subjects: list[str], prompt: str | None = None,
                   steps: int | None = None, lr: float | None = None, config: str = DEFAULT_CONFIG,
                   keys: dict | None = None, progress: bool = True) -> dict:
    """Fine-tunes `pretrained` on the style of `image` (configs/styledrop.yaml unless `config`,
    `keys` as dotted overrides, e.g. {"train.checkpoint.every": 100}) and writes a sample
    grid; returns the grid's result (paths, step, captions). Reruns continue."""
    given = {"output": output, "pretrained": pretrained, "style.image": image, "style.subjects": list(subjects),
             **({"style.prompt": prompt} if prompt is not None else {}),
             **({"train.steps": steps} if steps is not None else {}),
             **({"train.optim.lr": lr} if lr is not None else {}),
             "train.log.progress": progress, **(keys or {})}
    cfg = parse_styledrop_config(with_keys(read_yaml(config), given))
    return run_styledrop(cfg)


def run_styledrop(cfg: StyleDropConfig) -> dict:
    # The dataset first: it refuses another image or other captions before the record is replaced.
    build_style_dataset(cfg.style.image, cfg.style.captions, cfg.pretrained, cfg.pretrained, cfg.dataset,
                        cfg.style.resolution, feedback=read_feedback(cfg.style.feedback) if cfg.style.feedback else None)
    with atomic_writer(join(cfg.output, "styledrop.yaml")) as fh:
        fh.write(dump_config(cfg).encode())
    result = train(cfg.train)
    return sample_style(cfg, result.checkpoint)


def write_feedback(url: str, tokens: np.ndarray, captions: list[str]) -> str:
    """A feedback round's accepted samples: their token grids and the caption each was drawn from."""
    buf = io.BytesIO()
    np.savez(buf, tokens=np.asarray(tokens, dtype="<u2"), captions=np.asarray(captions, dtype=str))
    with atomic_writer(url) as fh:
        fh.write(buf.getvalue())
    return url


def read_feedback(url: str) -> tuple[np.ndarray, list[str]]:
    data = np.load(io.BytesIO(read_bytes(url)))
    return data["tokens"], [str(c) for c in data["captions"]]


def sample_style(cfg: StyleDropConfig, checkpoint: str) -> dict:
    """OUTPUT/samples/grid.png: the style image, then `per_prompt` samples of each prompt
    with the adapters at `lora_scale`; a no-op when result.json names this checkpoint."""
    out = join(cfg.output, "samples")
    result_url = join(out, "result.json")
    if file_exists(result_url) and read_json(result_url).get("checkpoint") == checkpoint:
        return read_json(result_url)
    prompts = list(cfg.style.prompts) or cfg.style.captions
    sampler = Sampler.from_folders(load_trained_model(checkpoint), cfg.pretrained,
                                   cfg.pretrained, lora_scale=cfg.style.lora_scale)
    images, expanded = seeded_samples(sampler, prompts, cfg.sample, cfg.style.per_prompt, cfg.style.seed)
    style = style_pixels(cfg.style.image, sampler.side)
    grid = save_png(image_grid(np.concatenate([style[None], images]), ["the style image", *expanded],
                               columns=cfg.style.per_prompt + 1, cell=max(96, sampler.side)), join(out, "grid.png"))
    result = {"checkpoint": checkpoint, "step": Checkpoint.at(checkpoint).step, "grid": grid,
              "prompts": prompts, "per_prompt": cfg.style.per_prompt, "lora_scale": cfg.style.lora_scale}
    write_json_atomic(result_url, result)
    return result


def style_pixels(image: str, side: int) -> np.ndarray:
    """The style image as the grid shows it: centre-cropped to `side` pixels."""
    return fit_image(Image.open(io.BytesIO(read_bytes(image))).convert("RGB"), side)


# The proof's style image: a shape the demo data has, in a style it never had (demo/styles.py).
PROOF_IMAGE = ("red", "circle", "white")
# The proof's feedback prompts: each colour once, each shape about as often; the figures are
# measured on the pairs in neither these nor the style image.
FEEDBACK_PAIRS = (("red", "square"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square"),
                  ("purple", "triangle"), ("orange", "circle"), ("white", "square"), ("black", "triangle"))


def style_proof(pretrained: str, output: str, sample: SampleConfig, plain_prompts: list[str],
                subjects: tuple[str, ...] = ("red circle", "circle", "red shape", "shape",
                                             "red circle on a white background"),
                prompt: str = "a {} in [V] style", steps: int = 100, lr: float = 1e-3, per_prompt: int = 2,
                feedback_pairs: tuple[tuple[str, str], ...] = FEEDBACK_PAIRS, feedback_per_prompt: int = 16,
                feedback_guidance: float = 1.0, keys: dict | None = None) -> dict:
    """The learning proof on the demo's model (`pretrained`, its exported pipeline): one
    outline image, `finetune_style` on it; with `feedback_pairs`, StyleDrop's second round:
    `feedback_per_prompt` samples of each pair's [V] prompt by round 1's adapters (at
    `feedback_guidance`), those `shows_style` accepts (an outline of the prompt's colour and
    shape) added to the image's rows, and a fresh fine-tune on them. Then `measure_style`:
    outlines in samples of every "a [colour] [shape] in [V] style" whose pair is in neither the
    image nor the feedback set, prompt following of `plain_prompts` (no [V]) with the adapters
    at scale 0 and 1 and with the base. Writes OUTPUT/proof.json and OUTPUT/proof.png (the
    style image, then [V] samples, then no-[V] samples at scale 0 and 1).

    The defaults are the best of the CPU attempts (/tmp/results/styledrop*.md); a CPU proof
    overrides the recipe's steps and lr (configs/styledrop.yaml) with these keys."""
    image = join(output, "style.png")
    if not file_exists(image):
        save_png(outline_image(*PROOF_IMAGE), image)
    keys = {"style.resolution": 32, "sample": vars(sample), **(keys or {})}
    tuned_result = finetune_style(image, pretrained, join(output, "styledrop"), list(subjects), prompt=prompt,
                                  steps=steps, lr=lr, progress=False, keys=keys)
    feedback = {}
    if feedback_pairs:
        rows = join(output, "feedback.npz")
        if not file_exists(rows):  # the round's samples are drawn once; a rerun trains on the same rows
            round1 = Sampler.from_folders(load_trained_model(tuned_result["checkpoint"]), pretrained,
                                          pretrained)
            tokens, captions, drawn = select_feedback(
                round1, prompt, list(feedback_pairs), dataclasses.replace(sample, guidance_scale=feedback_guidance),
                feedback_per_prompt, seed=1)
            write_feedback(rows, tokens, captions)
            write_json_atomic(join(output, "feedback.json"), {"accepted": len(captions), "drawn": drawn})
        feedback = read_json(join(output, "feedback.json"))
        print(f"style proof: feedback round: {feedback['accepted']}/{feedback['drawn']} samples accepted", flush=True)
        tuned_result = finetune_style(image, pretrained, join(output, "round2"), list(subjects), prompt=prompt,
                                      steps=steps, lr=lr, progress=False, keys={**keys, "style.feedback": rows})
    checkpoint = tuned_result["checkpoint"]
    tuned = Sampler.from_folders(load_trained_model(checkpoint), pretrained, pretrained)
    base = Sampler.from_folders(load_pretrained_model(pretrained), pretrained, pretrained)
    style_prompts = held_out_prompts(prompt, {PROOF_IMAGE[:2], *feedback_pairs})
    figures, images = measure_style(tuned, base, style_prompts, plain_prompts, sample, per_prompt)
    grid = save_png(proof_grid(style_pixels(image, tuned.side), images, style_prompts, plain_prompts, per_prompt),
                    join(output, "proof.png"))
    proof = {"checkpoint": checkpoint, "steps": steps, "lr": lr, "subjects": list(subjects), "prompt": prompt,
             "style_image": "outline: " + " ".join(PROOF_IMAGE), "feedback": feedback,
             "feedback_pairs": [list(p) for p in feedback_pairs], "figures": figures, "grid": grid,
             "style_prompts": style_prompts, "per_prompt": per_prompt}
    write_json_atomic(join(output, "proof.json"), proof)
    return proof


def proof_grid(style: np.ndarray, images: dict[str, np.ndarray], style_prompts: list[str], plain_prompts: list[str],
               per_prompt: int, columns: int = 8) -> Image.Image:
    """Rows of `columns` + 1 cells: the style image, then two rows of [V] samples (the first image
    of each held-out prompt), then a row of no-[V] samples with the adapters at scale 0 and one at 1."""
    blank = np.full_like(style, 255)
    cells, captions = [], []
    firsts = slice(0, columns * 2 * per_prompt, per_prompt)
    rows = [(images["style_tuned"][firsts], [p.replace(" style", "") for p in style_prompts[:columns * 2]]),
            (images["plain_scale0"][firsts], [f"{p.split(' on ')[0]} (LoRA 0)" for p in plain_prompts]),
            (images["plain_scale1"][firsts], [f"{p.split(' on ')[0]} (LoRA 1)" for p in plain_prompts])]
    for r, (row_images, row_captions) in enumerate(rows):
        for start in range(0, min(len(row_images), columns * (2 if r == 0 else 1)), columns):
            first = not cells
            cells += [style if first else blank, *row_images[start:start + columns]]
            captions += ["the style image" if first else "", *row_captions[start:start + columns]]
    return image_grid(np.stack(cells), captions, columns=columns + 1, cell=96)
