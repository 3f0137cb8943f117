"""`amused sample --output-dir`: each image as its own PNG, what made it in the PNG's text
chunks (training/inference/sample.py `save_images`), local or on S3."""

import dataclasses
import io

import numpy as np
import pytest
import s3fs
import torch
from PIL import Image

from amused.training.config import SampleConfig
from amused.training.inference.sample import Sampler, save_images
from amused.training.uvit.model import build_model

PROMPTS = ["a red circle on a grey background", "a red circle on a grey background", "café au lait, s'il vous plaît ☕"]
CFG = SampleConfig(steps=3, guidance_scale=4.0, schedule="linear", negative_prompt="blurry")


@pytest.fixture(scope="module")
def images(tiny_models) -> np.ndarray:
    torch.manual_seed(0)
    sampler = Sampler.from_folders(build_model("tiny"), str(tiny_models / "vqgan"), str(tiny_models))
    return sampler.decode(sampler.generate(PROMPTS, CFG, torch.Generator().manual_seed(7)))


def check(files: dict[str, bytes], images: np.ndarray) -> None:
    assert sorted(files) == ["000-a-red-circle-on-a-grey-background.png", "001-a-red-circle-on-a-grey-background.png",
                             "002-caf-au-lait-s-il-vous-pla-t.png"]
    for index, (name, data) in enumerate(sorted(files.items())):
        png = Image.open(io.BytesIO(data))
        assert np.array_equal(np.asarray(png.convert("RGB")), images[index])  # the pixels, losslessly
        meta = png.text
        assert meta["prompt"] == PROMPTS[index] and meta["index"] == str(index)
        assert meta["seed"] == "7" and meta["batch_size"] == "3" and meta["model"] == "tiny-random"
        assert {k: meta[k] for k in ("steps", "guidance_scale", "schedule", "negative_prompt")} == {
            "steps": "3", "guidance_scale": "4.0", "schedule": "linear", "negative_prompt": "blurry"}
        assert set(dataclasses.asdict(CFG)) <= set(meta)  # every sampler setting


def test_each_image_is_a_png_with_its_prompt_seed_and_settings(images, tmp_path):
    out = tmp_path / "images"
    urls = save_images(images, PROMPTS, str(out), CFG, seed=7, extra={"model": "tiny-random"})
    assert urls == [str(out / n) for n in sorted(p.name for p in out.iterdir())]
    check({p.name: p.read_bytes() for p in out.iterdir()}, images)
    raw = (out / "000-a-red-circle-on-a-grey-background.png").read_bytes()
    assert b"tEXt" in raw and b"iTXt" in (out / "002-caf-au-lait-s-il-vous-pla-t.png").read_bytes()  # UTF-8 prompt
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        save_images(images, PROMPTS[:2], str(tmp_path / "other"), CFG, seed=7)


def test_images_to_s3(images, s3_bucket):
    url = f"{s3_bucket}/samples/run1"
    save_images(images, PROMPTS, url, CFG, seed=7, extra={"model": "tiny-random"})
    fs = s3fs.S3FileSystem()
    check({p.rpartition("/")[2]: fs.cat_file(p) for p in fs.ls(url)}, images)
