"""Sampling settings and `amused sample --output-dir`'s folder rule, without models."""

import dataclasses
from typing import Literal

import numpy as np
import pytest

from amused.plumbing.config import check_choices
from amused.training.config import SampleConfig
from amused.training.inference.sample import earlier_samples, save_images

pytestmark = pytest.mark.unit


def test_a_sample_config_built_in_python_refuses_an_unknown_schedule():
    assert SampleConfig(schedule="linear").schedule == "linear"
    with pytest.raises(ValueError, match="schedule: 'Cosine' is not one of 'cosine', 'linear'"):
        SampleConfig(schedule="Cosine")  # would sample with the linear schedule
    with pytest.raises(ValueError, match="schedule: 'cosine ' is not one of"):
        dataclasses.replace(SampleConfig(), schedule="cosine ")


@dataclasses.dataclass
class _Choices:
    mode: Literal["a", "b"] = "a"
    maybe: Literal["x"] | None = None
    name: str = "free text"


def test_check_choices_allows_none_for_an_optional_choice_only():
    check_choices(_Choices())
    check_choices(_Choices(mode="b", maybe="x"))
    with pytest.raises(ValueError, match="maybe: 'y' is not one of 'x'"):
        check_choices(_Choices(maybe="y"))
    with pytest.raises(ValueError, match="mode: None is not one of"):
        check_choices(_Choices(mode=None))


def test_a_folder_with_an_earlier_samples_images_is_refused(tmp_path):
    images, cfg = np.zeros((2, 8, 8, 3), np.uint8), SampleConfig(steps=2)
    out = tmp_path / "samples"
    assert earlier_samples(str(out)) == []  # no folder yet
    save_images(images, ["a", "b"], str(out), cfg, seed=0)
    assert earlier_samples(str(out)) == ["000-a.png", "001-b.png"]
    # a second run, another seed and a shorter batch: it would replace 000 and leave run 1's 001 beside it
    with pytest.raises(FileExistsError, match=r"already holds an earlier sample's images \(000-a.png, 001-b.png\)"):
        save_images(images[:1], ["c"], str(out), cfg, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["000-a.png", "001-b.png"]
    # a grid alone counts too; other PNGs (the user's) do not
    other = tmp_path / "other"
    other.mkdir()
    (other / "photo.png").write_bytes(b"")
    assert earlier_samples(str(other)) == []
    (other / "grid.png").write_bytes(b"")
    assert earlier_samples(str(other)) == ["grid.png"]
