"""FID and CLIP score for generated images, from local weights only.

FID: the Inception-v3 of the TensorFlow FID graph (the architecture of pytorch-fid /
torch-fidelity, whose `pt_inception-2015-12-05-6726825d.pth` / torch-fidelity
`weights-inception-2015-12-05-6726825d.pth` state dicts it loads with
`weights_only=True`), 2048-d pool features. FID implementations disagree mostly through
the resize to 299 px, so ours is fixed and named in every result (RESIZE_PROTOCOL): the
clean-fid protocol, each channel resized as float32 with PIL bicubic, no rounding back to
uint8. Reference statistics record the protocol and the weights' hash; mixing them with
another protocol or network is refused. The Fréchet distance uses symmetric
eigendecompositions (no scipy sqrtm, whose `disp` argument scipy 1.18 removed).

CLIP score: 100 x cosine(image embedding, text embedding) per image, averaged and then
floored at 0, as torchmetrics' CLIPScore.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

RESIZE_PROTOCOL = "clean-fid: per-channel float32 PIL bicubic resize to 299x299, no uint8 re-quantisation"
FEATURES = "inception-v3 (TF FID graph) pool3, 2048-d"
CLIP_SCORE_SCALE = "mean over images of 100 x cosine(image, text), floored at 0 (torchmetrics CLIPScore)"
# OpenAI CLIP's pixel normalisation (every released CLIP checkpoint uses it).
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TensorFlow's average pool leaves the zero padding out of the mean.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _BlockB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _Conv(cin, c7, 1), _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            dbl = conv(dbl)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(_avg3(x))], 1)


class _BlockD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the FID graph's last block max-pools its pool branch
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Inception-v3 as in the TensorFlow FID graph; forward takes (N, 3, 299, 299) float
    pixels in [0, 255] and returns the 2048-d pool features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weights file; the features are taken before it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_inception(path: str | Path, device: str = "cpu") -> FIDInception:
    """The FID network from a local state-dict file (never fetched)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"FID Inception weights {path} not found (pt_inception-2015-12-05-6726825d.pth)")
    net = FIDInception()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net.to(device).eval().requires_grad_(False)


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

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, mu=self.mu, sigma=self.sigma, count=self.count, protocol=self.protocol,
                     weights_sha256=self.weights_sha256)
        tmp.rename(path)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], int(z["count"]), str(z["protocol"]), str(z["weights_sha256"]))


class ClipScorer:
    """Image-text cosine similarities from a local CLIP folder (CLIPModel + its tokenizer)."""

    def __init__(self, folder: str, device: str = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        from amused.plumbing.storage import local_folder, resolve_subfolder

        path = local_folder(folder)
        self.model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(local_folder(resolve_subfolder(folder, ("tokenizer",))))
        self.size = self.model.config.vision_config.image_size
        self.device = device

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        from amused.training.inference.sample import fit_image

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


def write_random_inception(path: str | Path, seed: int = 0) -> Path:
    """A weights file in the real one's format with random weights, for tests and the
    demo (the real file cannot be fetched here). He-initialised so features stay spread
    through the 94 layers instead of vanishing."""
    torch.manual_seed(seed)
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
