"""VQ-GAN image tokenizer over diffusers' `VQModel`.

The aMUSEd VQ-GAN reads pixels in [0, 1] (not [-1, 1]) and its decoder overflows to
NaN in fp16, so only fp32 and bf16 are accepted and every output is checked for
non-finite values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel
from PIL import Image

from amused.plumbing.runtime import resolve_device, resolve_dtype
from amused.plumbing.storage import VQGAN_SUBFOLDERS, local_folder, resolve_subfolder
from amused.tokenizer.presets import VQGAN_CONFIGS, downsample_of, preset

# Rows of latents compared against the codebook at once: bounds the distance matrix
# to CHUNK x codebook_size floats (64 MiB at 8192 codes) whatever the batch size.
_NEAREST_CHUNK = 2048


def build_vqgan(name: str = "tiny") -> VQModel:
    """Random weights of a VQ-GAN preset, in aMUSEd's layout (no attention in the middle
    block, decoding looks token ids up in the codebook)."""
    cfg = preset(VQGAN_CONFIGS, "VQ-GAN", name)
    n = len(cfg["block_out_channels"])
    return VQModel(
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        force_upcast=True,
        **cfg,
    )


class ImageTokenizer:
    """Encodes uint8 RGB batches to uint16 token grids and decodes them back."""

    def __init__(self, model: VQModel, device: str | torch.device = "auto", dtype: str | torch.dtype = "fp32"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if self.dtype == torch.float16:
            raise ValueError(
                "the aMUSEd VQ-GAN overflows to NaN in float16; use fp32 or bf16"
            )
        if model.quantize.remap is not None:
            raise ValueError("VQ models with an index remap are not supported: token ids would not be codebook rows")
        if model.dtype != self.dtype:
            model = model.to(dtype=self.dtype)
        if self.device.type == "cuda":
            # NHWC uint8 batches permuted to NCHW are already channels-last: no copy, faster convs.
            model = model.to(memory_format=torch.channels_last)
            # Autotuning picks kernels by timing them, so two runs may convolve differently:
            # not where the process asked for deterministic algorithms (plumbing/determinism.py).
            if not torch.are_deterministic_algorithms_enabled():
                torch.backends.cudnn.benchmark = True
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.downsample = downsample_of(model.config.block_out_channels)
        self.codebook_size = int(model.config.num_vq_embeddings)
        if self.codebook_size > np.iinfo(np.uint16).max + 1:
            raise ValueError(f"codebook of {self.codebook_size} codes does not fit uint16 token ids")

    @classmethod
    def from_pretrained(
        cls, url: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "fp32"
    ) -> "ImageTokenizer":
        """Load from a VQModel folder, or a diffusers pipeline folder with `vqvae/` (local or fsspec URL)."""
        folder = local_folder(resolve_subfolder(str(url), VQGAN_SUBFOLDERS))
        return cls(VQModel.from_pretrained(folder), device=device, dtype=dtype)

    def grid(self, resolution: int) -> tuple[int, int]:
        if resolution % self.downsample:
            raise ValueError(f"resolution {resolution} is not a multiple of the VQ-GAN downsampling {self.downsample}")
        side = resolution // self.downsample
        return side, side

    def _pixels(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        batch = torch.as_tensor(images)
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {tuple(batch.shape)} {batch.dtype}")
        batch = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return batch.to(self.dtype).div_(255.0)

    @torch.no_grad()
    def encode_with_mask(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (N, h, w) uint16 and a bool mask of the rows whose latents were finite.

        Rows with non-finite latents get id 0 everywhere; the caller decides what to do.
        """
        if len(images) == 0:
            return np.zeros((0, 0, 0), np.uint16), np.zeros(0, bool)
        latents = self.model.encode(self._pixels(images)).latents.float()
        n, c, h, w = latents.shape
        finite = torch.isfinite(latents).flatten(1).all(dim=1)
        flat = torch.where(finite[:, None, None, None], latents, 0.0).permute(0, 2, 3, 1).reshape(-1, c)
        ids = nearest_codes(flat, self.model.quantize.embedding.weight.float())
        return ids.reshape(n, h, w).to(torch.int32).cpu().numpy().astype(np.uint16), finite.cpu().numpy()

    def encode(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Token ids (N, h, w) uint16; raises FloatingPointError on non-finite latents."""
        ids, finite = self.encode_with_mask(images)
        if not finite.all():
            raise FloatingPointError(f"non-finite VQ-GAN latents for rows {np.flatnonzero(~finite).tolist()}")
        return ids

    @torch.no_grad()
    def decode(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 RGB images (N, H, W, 3) for token ids (N, h, w)."""
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64) if isinstance(ids, np.ndarray) else ids)
        ids = ids.to(self.device, torch.long)
        n, h, w = ids.shape
        shape = (n, h, w, self.model.config.latent_channels)
        if self.model.config.lookup_from_codebook:
            out = self.model.decode(ids, force_not_quantize=True, shape=shape).sample
        else:
            quant = self.model.quantize.get_codebook_entry(ids.flatten(), shape).to(self.dtype)
            out = self.model.decode(quant, force_not_quantize=True).sample
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"VQ-GAN decoder produced non-finite pixels in {self.dtype}")
        pixels = out.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()


def nearest_codes(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (Euclidean) for each latent row.

    argmin ||z - e||^2 = argmin (||e||^2 - 2 z.e): one matmul per chunk instead of
    `torch.cdist` over the whole batch, so memory stays bounded at any batch size.
    """
    sq_norms = codebook.pow(2).sum(dim=1)
    out = torch.empty(latents.shape[0], dtype=torch.long, device=latents.device)
    for start in range(0, latents.shape[0], _NEAREST_CHUNK):
        chunk = latents[start : start + _NEAREST_CHUNK]
        out[start : start + len(chunk)] = torch.addmm(sq_norms, chunk, codebook.T, alpha=-2.0).argmin(dim=1)
    return out


def fit_image(image: Image.Image, side: int, resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """Resize the shorter side to `side` and centre-crop: (side, side, C) uint8."""
    w, h = image.size
    scale = side / min(w, h)
    image = image.resize((max(side, round(w * scale)), max(side, round(h * scale))), resample)
    left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
    return np.array(image.crop((left, top, left + side, top + side)))
