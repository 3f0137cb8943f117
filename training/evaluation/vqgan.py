"""How well a VQ-GAN reconstructs held-out images: PSNR, codebook usage and perplexity,
reconstruction FID (when FID Inception weights are given) and a PNG of originals above
their reconstructions. Reconstructions take the inference path the rest of the
pipeline uses (ImageTokenizer: encode to ids, decode to uint8), so the numbers describe
the tokens training will see."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from amused.plumbing.fsio import sha256_of, write_json_atomic
from amused.plumbing.plots import image_grid, save_png
from amused.plumbing.storage import join
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.inception import load_inception
from amused.tokenizer.vq_objective import CodebookHealth, psnr
from amused.training.evaluation.metrics import FeatureStats, inception_features
from amused.training.vqgan.data import held_out_batches


def evaluate_vqgan(vqgan: str | ImageTokenizer, images: str, output: str, resolution: int = 256,
                   batch_size: int = 16, max_images: int = 0, inception: str = "", grid: int = 8,
                   device: str = "cpu") -> dict:
    """Writes OUTPUT/vqgan_eval.json and OUTPUT/reconstructions.png; returns the metrics."""
    tok = vqgan if isinstance(vqgan, ImageTokenizer) else ImageTokenizer.from_pretrained(vqgan, device=device)
    net = load_inception(inception, device) if inception else None
    health = CodebookHealth(tok.codebook_size, window=1 << 30)  # every batch counts
    skipped: Counter = Counter()
    psnrs, real_feats, fake_feats, shown = [], [], [], []
    with tqdm(desc="reconstruct", unit="img", total=max_images or None) as bar:
        for batch in held_out_batches(images, resolution, batch_size, max_images, skipped):
            ids = tok.encode(batch)
            recon = tok.decode(ids)
            health.update(torch.from_numpy(ids.astype(np.int64)))
            psnrs.append(psnr(torch.from_numpy(batch).float() / 255, torch.from_numpy(recon).float() / 255))
            if net is not None:
                real_feats.append(inception_features(net, batch))
                fake_feats.append(inception_features(net, recon))
            if len(shown) < grid:
                shown += list(zip(batch, recon))[:grid - len(shown)]
            bar.update(len(batch))
    if not psnrs:
        raise ValueError(f"no usable held-out image in {images} (skipped: {dict(skipped)})")
    per_image = torch.cat(psnrs)
    result = {
        "vqgan": vqgan if isinstance(vqgan, str) else None, "images": len(per_image), "resolution": resolution,
        "psnr_db": float(per_image.mean()), "psnr_db_min": float(per_image.min()),
        "codebook_usage": health.usage(), "codebook_perplexity": health.perplexity(),
        "codebook_size": tok.codebook_size, "skipped": dict(skipped), "rfid": None,
    }
    if net is not None:
        sha = sha256_of(inception)
        real = FeatureStats.of(np.concatenate(real_feats), weights_sha256=sha)
        result["rfid"] = FeatureStats.of(np.concatenate(fake_feats), weights_sha256=sha).fid(real)
        result["fid_protocol"] = real.protocol
    pictures = np.stack([o for o, _ in shown] + [r for _, r in shown])
    captions = ["original"] * len(shown) + ["reconstruction"] * len(shown)
    save_png(image_grid(pictures, captions, columns=len(shown), cell=max(128, resolution)),
             join(output, "reconstructions.png"))
    write_json_atomic(join(output, "vqgan_eval.json"), result)
    return result
