"""Sampling settings, without models."""

import dataclasses
from typing import Literal

import pytest

from amused.plumbing.config import check_choices
from amused.training.config import SampleConfig

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
