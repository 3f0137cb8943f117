"""Image decoding for pre-tokenization: bad images rejected with their reason, EXIF
orientation, transparency, 16-bit, CMYK and GIF frames, crop geometry and views, and
which formats decode at all."""

import numpy as np
import pytest

from amused.pipeline.images import crop_offsets, decode_views, open_image
from amused.pipeline.wds import BadSample
from tests import samples

pytestmark = pytest.mark.unit


def decode(data: bytes, size: int = 64):
    return decode_views(data, size, "center", 1, 0, "k", min_side=32, max_pixels=64_000_000)


@pytest.mark.parametrize("name", [n for n, (_, _, reason) in samples.awkward_samples().items()
                                  if reason and reason not in ("missing_caption", "caption_not_utf8")])
def test_bad_images_are_rejected_with_their_reason(name):
    data, _, reason = samples.awkward_samples()[name]
    with pytest.raises(BadSample) as err:
        decode(data)
    assert err.value.reason == reason


def test_exif_orientation_is_applied_and_original_size_is_the_displayed_one():
    orig, _, crops = decode(samples.exif_rotated_jpeg())
    assert orig == (120, 160)  # stored 160x120 landscape, displayed portrait
    img, _ = open_image(samples.exif_rotated_jpeg(), 32, 10**8)
    arr = np.asarray(img)
    # Orientation 6 turns the stored top-left red block to the top-right corner.
    assert arr[5, -5, 0] > 200 and arr[5, -5, 1] < 60
    assert arr[5, 5, 0] < 100


def test_palette_transparency_is_composited_on_white():
    img, _ = open_image(samples.palette_png_with_transparency(), 32, 10**8)
    arr = np.asarray(img)
    assert img.mode == "RGB"
    assert tuple(arr[10, 10]) == (200, 30, 30)
    assert tuple(arr[10, 90]) == (255, 255, 255)


def test_16_bit_png_is_scaled_not_clipped():
    img, _ = open_image(samples.png16(), 32, 10**8)
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255
    assert 100 < arr[40, 48, 0] < 156  # mid-ramp stays mid-grey


def test_cmyk_is_converted_close_to_the_rgb_original():
    rgb, _ = open_image(samples.save(samples.photo(), "JPEG", quality=95), 32, 10**8)
    cmyk, _ = open_image(samples.awkward_samples()["cmyk"][0], 32, 10**8)
    diff = np.abs(np.asarray(rgb, float) - np.asarray(cmyk, float)).mean()
    assert cmyk.mode == "RGB" and diff < 20


def test_animated_gif_uses_the_first_frame():
    _, _, crops = decode(samples.animated_gif())
    assert tuple(crops[0, 30, 30]) == (0, 200, 0)


def test_center_crop_geometry():
    orig, offsets, crops = decode(samples.save(samples.photo(200, 100), "PNG"), size=64)
    assert orig == (200, 100)
    assert offsets == [(0, (128 - 64) // 2)]  # resized to 128x64, centred horizontally
    assert crops.shape == (1, 64, 64, 3)


def test_random_views_are_deterministic_and_distinct():
    a = crop_offsets(300, 64, 64, "random", 4, seed=3, key="x/1")
    assert a == crop_offsets(300, 64, 64, "random", 4, seed=3, key="x/1")
    assert a != crop_offsets(300, 64, 64, "random", 4, seed=4, key="x/1")
    assert len(set(a)) > 1 and all(0 <= left <= 300 - 64 and top == 0 for top, left in a)


def test_formats_outside_the_web_ones_are_not_decoded():
    # EPS would be rendered by Ghostscript, whatever the member's extension says.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n%%EOF\n"
    with pytest.raises(BadSample) as err:
        decode(eps)
    assert err.value.reason == "not_an_image" and "JPEG, PNG, WEBP" in err.value.detail


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP", "AVIF"])
def test_web_formats_decode_close_to_the_original(fmt):
    rgb, _ = open_image(samples.save(samples.photo(), "PNG"), 32, 10**8)
    other, _ = open_image(samples.save(samples.photo(), fmt), 32, 10**8)
    assert other.mode == "RGB" and np.abs(np.asarray(rgb, float) - np.asarray(other, float)).mean() < 20
