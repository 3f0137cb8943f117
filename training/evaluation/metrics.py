"""The evaluation's measurements and the table of metrics `amused evaluate`, `amused
status` and the CLI loop over.

FID: 2048-d pool features of the FID Inception-v3 (`amused.tokenizer.inception`). FID
implementations disagree mostly through the resize to 299 px, so ours is fixed and named
in every result (RESIZE_PROTOCOL): the clean-fid protocol, each channel resized as
float32 with PIL bicubic, no rounding back to uint8. Reference statistics record the
protocol and the weights' hash; mixing them with another protocol or network is refused.
The Fréchet distance uses symmetric eigendecompositions (no scipy sqrtm, whose `disp`
argument scipy 1.18 removed).

CLIP score: 100 x cosine(image embedding, text embedding) per image, averaged and then
floored at 0, as torchmetrics' CLIPScore.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from amused.plumbing.fsio import atomic_writer, sha256_of
from amused.plumbing.storage import local_folder, resolve_subfolder, url_to_fs
from amused.tokenizer.image import fit_image
from amused.tokenizer.inception import FIDInception, load_inception
from amused.training.config import EvalConfig

RESIZE_PROTOCOL = "clean-fid: per-channel float32 PIL bicubic resize to 299x299, no uint8 re-quantisation"
FEATURES = "inception-v3 (TF FID graph) pool3, 2048-d"
CLIP_SCORE_SCALE = "mean over images of 100 x cosine(image, text), floored at 0 (torchmetrics CLIPScore)"
# OpenAI CLIP's pixel normalisation (every released CLIP checkpoint uses it).
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def resize_for_inception(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, 299, 299) in [0, 255] by RESIZE_PROTOCOL."""
    out = np.empty((len(images), 3, 299, 299), np.float32)
    for i, image in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(channel.resize((299, 299), Image.Resampling.BICUBIC))
    return torch.from_numpy(out)


@torch.no_grad()
def inception_features(net: FIDInception, images: np.ndarray) -> np.ndarray:
    device = next(net.parameters()).device
    return net(resize_for_inception(images).to(device)).double().cpu().numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

    tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2): both square roots are of symmetric PSD
    matrices, so symmetric eigendecompositions give them, eigenvalues clipped at 0 (they
    dip below it only by rounding)."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


@dataclass
class FeatureStats:
    """Mean and covariance of Inception features, with what produced them."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    protocol: str = RESIZE_PROTOCOL
    weights_sha256: str = ""

    @classmethod
    def of(cls, features: np.ndarray, weights_sha256: str = "") -> "FeatureStats":
        if len(features) < 2:
            raise ValueError(f"FID needs at least 2 images, got {len(features)}")
        features = np.asarray(features, np.float64)
        return cls(features.mean(0), np.cov(features, rowvar=False), len(features), weights_sha256=weights_sha256)

    def fid(self, reference: "FeatureStats") -> float:
        if (self.protocol, self.weights_sha256) != (reference.protocol, reference.weights_sha256):
            raise ValueError(
                "reference statistics were computed with another resize protocol or Inception weights "
                f"({reference.protocol!r}, {reference.weights_sha256[:12]}) than these "
                f"({self.protocol!r}, {self.weights_sha256[:12]}): recompute them with `amused fid-stats`")
        return frechet_distance(self.mu, self.sigma, reference.mu, reference.sigma)

    def save(self, url: str) -> None:
        # Whole in memory first: numpy's zip writer seeks, an upload stream cannot (2048^2 doubles: 32 MB).
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, count=self.count, protocol=self.protocol,
                 weights_sha256=self.weights_sha256)
        with atomic_writer(str(url)) as fh:
            fh.write(buf.getvalue())

    @classmethod
    def load(cls, url: str) -> "FeatureStats":
        fs, path = url_to_fs(str(url))
        with fs.open(path, "rb") as fh, np.load(io.BytesIO(fh.read()), allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], int(z["count"]), str(z["protocol"]), str(z["weights_sha256"]))


class ClipScorer:
    """Image-text cosine similarities from a local CLIP folder (CLIPModel + its tokenizer)."""

    def __init__(self, folder: str, device: str = "cpu"):
        path = local_folder(folder)
        self.model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(local_folder(resolve_subfolder(folder, ("tokenizer",))))
        self.size = self.model.config.vision_config.image_size
        self.device = device

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        batch = np.stack([fit_image(Image.fromarray(im), self.size) for im in images]).astype(np.float32) / 255
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2)
        mean, std = torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(_CLIP_STD).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(self.device)

    @torch.no_grad()
    def scores(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """100 x cosine per (image, prompt) pair, float64."""
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings,
                             return_tensors="pt").input_ids.to(self.device)
        image = F.normalize(_projected(self.model.get_image_features(pixel_values=self._pixels(images))), dim=-1)
        text = F.normalize(_projected(self.model.get_text_features(input_ids=ids)), dim=-1)
        return (100 * (image * text).sum(-1)).double().cpu().numpy()


def _projected(out) -> torch.Tensor:
    # transformers 5 returns the projected embedding as `pooler_output` of an output object; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_score(per_image: np.ndarray) -> float:
    return max(float(np.mean(per_image)), 0.0)


# ----- the metrics table --------------------------------------------------------------------

Measure = Callable[[np.ndarray, list[str]], np.ndarray]


class Metric(ABC):
    """One number per checkpoint, from the images generated for the prompt set.

    It is measured in two places: on each evaluation actor, `measurer` loads what the
    metric needs once and then turns every batch (uint8 images (N, H, W, 3) and their
    prompts) into one row per image; on the driver, an instance made before the first
    checkpoint (it checks what the summary compares against) summarises all rows, in
    prompt order, into its `fields` of eval/step_N.json. A metric that is not `wanted`
    writes each of its fields as None, so every result file has the same keys."""

    name: ClassVar[str]  # its headline field in eval/step_N.json
    numbers: ClassVar[tuple[str, ...]]  # the fields it measures, `name` first
    provenance: ClassVar[tuple[str, ...]] = ()  # the fields saying what the numbers were measured with
    fields: ClassVar[tuple[str, ...]]  # every field `summarise` writes (numbers, then provenance)
    label: ClassVar[str]  # how the CLI and `amused status` name it
    title: ClassVar[str]  # its panel in eval/metrics.png
    digits: ClassVar[int] = 2  # decimals shown

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.fields = cls.numbers + cls.provenance

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg

    @staticmethod
    def wanted(cfg: EvalConfig) -> bool:
        """Whether this evaluation measures it (what it needs is configured)."""
        return True

    @staticmethod
    @abstractmethod
    def measurer(cfg: EvalConfig, device: str) -> Measure: ...

    @abstractmethod
    def summarise(self, rows: np.ndarray) -> dict: ...

    @classmethod
    def show(cls, result: dict) -> str:
        value = result.get(cls.name)
        shown = "n/a" if value is None else f"{value:.{cls.digits}f}"
        return f"{cls.label} {shown}"


class Fid(Metric):
    name, label, title, digits = "fid", "FID", "FID (lower is better)", 3
    numbers = ("fid",)
    provenance = ("fid_protocol", "fid_features", "fid_reference", "fid_reference_images", "inception_sha256")

    def __init__(self, cfg: EvalConfig):
        super().__init__(cfg)
        self.reference = FeatureStats.load(cfg.reference)
        if self.reference.protocol != RESIZE_PROTOCOL:
            raise ValueError(f"{cfg.reference} was computed with {self.reference.protocol!r}, not "
                             f"{RESIZE_PROTOCOL!r}")

    @staticmethod
    def measurer(cfg: EvalConfig, device: str) -> Measure:
        net = load_inception(cfg.inception, device)
        return lambda images, prompts: inception_features(net, images)

    def summarise(self, rows: np.ndarray) -> dict:
        sha = sha256_of(self.cfg.inception)
        return {"fid": FeatureStats.of(rows, weights_sha256=sha).fid(self.reference), "fid_protocol": RESIZE_PROTOCOL,
                "fid_features": FEATURES, "fid_reference": self.cfg.reference,
                "fid_reference_images": self.reference.count, "inception_sha256": sha}

    @classmethod
    def show(cls, result: dict) -> str:
        return f"{super().show(result)} ({result['images']} images vs {result['fid_reference_images']} reference)"


class ClipScore(Metric):
    name, label, title = "clip_score", "CLIP score", "CLIP score (100 x cosine)"
    numbers = ("clip_score", "clip_score_unfloored")
    provenance = ("clip_score_scale", "clip")

    @staticmethod
    def wanted(cfg: EvalConfig) -> bool:
        return bool(cfg.clip)

    @staticmethod
    def measurer(cfg: EvalConfig, device: str) -> Measure:
        return ClipScorer(cfg.clip, device).scores

    def summarise(self, rows: np.ndarray) -> dict:
        return {"clip_score": clip_score(rows), "clip_score_unfloored": float(np.mean(rows)),
                "clip_score_scale": CLIP_SCORE_SCALE, "clip": self.cfg.clip}


# What every evaluation measures, in the order results, plots and the CLI show them.
METRICS: tuple[type[Metric], ...] = (Fid, ClipScore)


def summarise_all(metrics: list[Metric], rows: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The numbers and the provenance fields of every metric of METRICS, each in table
    order: `metrics` (the wanted ones) summarise their `rows`, the others write None."""
    written = {}
    for metric in metrics:
        summary = metric.summarise(rows[metric.name])
        if set(summary) != set(metric.fields):
            raise ValueError(f"metric {metric.name} wrote {sorted(summary)}, not its declared fields "
                             f"{sorted(metric.fields)}")
        written.update(summary)
    return ({f: written.get(f) for m in METRICS for f in m.numbers},
            {f: written.get(f) for m in METRICS for f in m.provenance})
