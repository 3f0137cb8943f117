"""The prompt-following score: the shape classifier reads generated images right, also
through JPEG, blur and stray pixels, and a wrong prompt scores no better than chance."""

import io

import numpy as np
from PIL import Image, ImageFilter

from amused.demo.shapes import caption_parts, classify_shape_image, shape_image
from amused.demo.showcase import prompt_following
from amused.tokenizer.image import fit_image


def _images(n: int, side: int, seed: int = 7) -> tuple[np.ndarray, list[str]]:
    images, captions = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        w, h = (int(v) for v in rng.integers(40, 81, size=2))
        # Anywhere in the centred square at any size: harder than the demo's default.
        img, caption = shape_image(rng, w, h, size=(0.4, 0.8), spread=1.0)
        images.append(fit_image(img, side))
        captions.append(caption)
    return np.stack(images), captions


def _degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a decoder does to an image: JPEG, a soft edge and a few stray pixels."""
    buf = io.BytesIO()
    Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.7)).save(buf, "JPEG", quality=75)
    out = np.array(Image.open(buf))
    for _ in range(4):
        y, x = rng.integers(0, out.shape[0], size=2)
        out[y, x] = rng.integers(0, 256, size=3)
    return out


def test_classifier_reads_generated_images():
    for side in (32, 64):
        images, captions = _images(200, side)
        assert prompt_following(images, captions)["score"] == 1.0
        backgrounds = [classify_shape_image(Image.fromarray(im))[2] for im in images]
        assert backgrounds == [caption_parts(c)[2] for c in captions]


def test_classifier_survives_decoder_noise():
    images, captions = _images(200, 32, seed=8)
    rng = np.random.default_rng(0)
    degraded = np.stack([_degrade(im, rng) for im in images])
    assert prompt_following(degraded, captions)["score"] >= 0.95


def test_wrong_prompts_score_near_chance():
    images, captions = _images(300, 32, seed=9)
    shifted = captions[1:] + captions[:1]
    # Chance of matching colour (1 in 8) and shape (1 in 3) is about 4%.
    assert prompt_following(images, shifted)["score"] < 0.1
    plain = np.full((32, 32, 3), 128, np.uint8)
    assert classify_shape_image(Image.fromarray(plain))[:2] == ("none", "none")
