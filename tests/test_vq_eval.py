"""`amused vqgan evaluate`: PSNR, codebook usage, rFID and the reconstruction PNG."""

import json

import numpy as np
import pytest
from PIL import Image

from amused.demo.datasets import sample_members, write_shape_shards
from amused.orchestration.cli import main
from amused.pipeline.wds import tar_bytes
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.inception import write_random_inception
from amused.training.vqgan.data import held_out_batches


def test_vqgan_evaluate_reports_what_the_reconstructions_show(tmp_path, tiny_models):
    images = tmp_path / "held-out"
    write_shape_shards(str(images), shards=2, per_shard=5, min_size=48, max_size=96)
    (images / "00002.tar").write_bytes(tar_bytes(sample_members("bad", b"nope", "x", None)))
    inception = write_random_inception(tmp_path / "inception.pth")
    out = tmp_path / "eval"
    assert main(["vqgan", "evaluate", "--vqgan", str(tiny_models / "vqgan"), "--images", str(images),
                 "--output", str(out), "--resolution", "64", "--batch-size", "4",
                 "--inception", str(inception)]) == 0
    result = json.loads((out / "vqgan_eval.json").read_text())
    assert result["images"] == 10 and result["skipped"] == {"not_an_image": 1}

    # the same figures computed by hand from the same centre crops
    tok = ImageTokenizer.from_pretrained(str(tiny_models / "vqgan"), device="cpu")
    batch = np.concatenate(list(held_out_batches(str(images), 64, 16)))
    ids = tok.encode(batch)
    recon = tok.decode(ids).astype(np.float64) / 255
    mse = ((batch.astype(np.float64) / 255 - recon) ** 2).reshape(10, -1).mean(1)
    assert result["psnr_db"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), rel=1e-4)
    assert result["codebook_usage"] == pytest.approx(len(np.unique(ids)) / tok.codebook_size)
    assert 1 <= result["codebook_perplexity"] <= len(np.unique(ids))
    assert result["rfid"] > 0 and "clean-fid" in result["fid_protocol"]  # a random VQ-GAN reconstructs badly
    grid = Image.open(out / "reconstructions.png")
    assert grid.size == (8 * 128, 2 * (128 + 36))  # 8 originals above their 8 reconstructions

    assert main(["vqgan", "evaluate", "--vqgan", str(tiny_models / "vqgan"), "--images", str(images / "00002.tar"),
                 "--output", str(tmp_path / "none"), "--resolution", "64"]) == 1  # no usable image: an error
