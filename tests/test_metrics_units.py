"""The metrics table and its protocol, and the Fréchet distance on values worked out by
hand: no model is loaded, no Ray (the driver-side summaries run on small arrays)."""

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import scipy.linalg

from amused.training.config import EvalConfig
from amused.training.evaluation.metrics import (
    CLIP_SCORE_SCALE,
    METRICS,
    RESIZE_PROTOCOL,
    ClipScore,
    FeatureStats,
    Fid,
    Metric,
    frechet_distance,
    summarise_all,
)

pytestmark = pytest.mark.unit


def test_identical_statistics_are_at_distance_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    mu, sigma = rng.normal(size=5), a @ a.T + np.eye(5)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_of_hand_computed_gaussians():
    # 1-d: (0 - 3)^2 + 1 + 4 - 2 sqrt(1 * 4) = 9 + 5 - 4
    assert frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([3.0]), np.array([[4.0]])) == \
        pytest.approx(10.0)
    # 2-d, diagonal: |(1, 2) - (1, 0)|^2 + (sqrt(4) - sqrt(1))^2 + (sqrt(9) - sqrt(9))^2 = 4 + 1 + 0
    assert frechet_distance(np.array([1.0, 2.0]), np.diag([4.0, 9.0]), np.array([1.0, 0.0]), np.diag([1.0, 9.0])) \
        == pytest.approx(5.0)


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _scipy_frechet(mu1, s1, mu2, s2):
    """pytorch-fid's formulation: an independent computation through scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_equals_the_closed_form_and_an_independent_implementation():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())  # diagonal Gaussians
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    s = _spd(rng, d)
    c = 2.5  # S2 = c S1: FD = tr(S1) (1 + c - 2 sqrt(c))
    assert frechet_distance(mu1, s, mu1, c * s) == pytest.approx(np.trace(s) * (1 + c - 2 * np.sqrt(c)), rel=1e-9)
    for seed in range(3):  # general, non-commuting covariances
        r = np.random.default_rng(seed + 1)
        s1, s2 = _spd(r, 32), _spd(r, 32)
        m1, m2 = r.normal(size=32), r.normal(size=32)
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(_scipy_frechet(m1, s1, m2, s2), rel=1e-8)


def test_fid_of_a_feature_set_against_itself_is_zero_and_mismatched_protocols_are_refused():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, 64))  # fewer samples than dimensions: a singular covariance, as in practice
    stats = FeatureStats.of(features, weights_sha256="abc")
    assert abs(stats.fid(stats)) < 1e-5  # ~1e-6: rounding under the square roots of the zero eigenvalues (trace 64)
    other = FeatureStats.of(features + 0.5, weights_sha256="abc")
    assert other.fid(stats) == pytest.approx(64 * 0.25, rel=1e-6)  # a mean shift only
    with pytest.raises(ValueError, match="another resize protocol or Inception weights"):
        stats.fid(replace(stats, weights_sha256="def"))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.of(features[:1])


def test_the_table_names_each_metric_once_with_what_the_results_and_plots_need():
    assert [m.name for m in METRICS] == ["fid", "clip_score"]
    for m in METRICS:
        assert issubclass(m, Metric) and m.label and m.title and m.numbers[0] == m.name
        assert m.fields == m.numbers + m.provenance
    assert len({m.title for m in METRICS}) == len(METRICS)
    fields = [f for m in METRICS for f in m.fields]
    assert len(set(fields)) == len(fields)


WEIGHTS = b"inception weights"


def _config(tmp_path, clip: str = "", protocol: str = RESIZE_PROTOCOL) -> EvalConfig:
    """A reference of 4 two-dimensional features from the `WEIGHTS` file."""
    inception = tmp_path / "inception.pth"
    inception.write_bytes(WEIGHTS)
    features = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    reference = FeatureStats.of(features, weights_sha256=hashlib.sha256(WEIGHTS).hexdigest())
    reference.protocol = protocol
    reference.save(tmp_path / "ref.npz")
    return EvalConfig(prompts="p.txt", reference=str(tmp_path / "ref.npz"), inception=str(inception), clip=clip)


def test_clip_score_is_wanted_only_with_a_clip_folder(tmp_path):
    assert ClipScore.wanted(_config(tmp_path, clip="clip/")) and not ClipScore.wanted(_config(tmp_path))
    assert Fid.wanted(_config(tmp_path))


def test_fid_summary_compares_with_the_reference_and_names_what_produced_it(tmp_path):
    cfg = _config(tmp_path)
    rows = np.array([[1.0, 1.0], [3.0, 1.0], [1.0, 3.0], [3.0, 3.0]])  # the reference shifted by (1, 1)
    result = Fid(cfg).summarise(rows)
    assert result["fid"] == pytest.approx(2.0)  # a mean shift only: |(1, 1)|^2
    assert result["inception_sha256"] == hashlib.sha256(WEIGHTS).hexdigest() and result["fid_reference_images"] == 4
    assert result["fid_protocol"] == RESIZE_PROTOCOL and result["fid_reference"] == cfg.reference


def test_fid_refuses_a_reference_of_another_protocol_before_any_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="was computed with 'nearest'"):
        Fid(_config(tmp_path, protocol="nearest"))


def test_clip_score_summary_is_floored_at_zero(tmp_path):
    result = ClipScore(_config(tmp_path, clip="clip/")).summarise(np.array([-5.0, 1.0]))
    assert result == {"clip_score": 0.0, "clip_score_unfloored": -2.0, "clip_score_scale": CLIP_SCORE_SCALE,
                      "clip": "clip/"}


def test_summaries_write_every_declared_field_and_none_for_a_metric_not_measured(tmp_path):
    # The fields of eval/step_N.json since the first release, in the order the result dict has
    # always listed them: the numbers, then (after "images") what they were measured with;
    # without CLIP its fields are null.
    cfg = _config(tmp_path)
    numbers, provenance = summarise_all([Fid(cfg)], {"fid": np.array([[1.0, 1.0], [3.0, 1.0], [1.0, 3.0]])})
    assert list(numbers) == ["fid", "clip_score", "clip_score_unfloored"]
    assert list(provenance) == ["fid_protocol", "fid_features", "fid_reference", "fid_reference_images",
                                "inception_sha256", "clip_score_scale", "clip"]
    assert numbers["fid"] is not None and provenance["fid_reference_images"] == 4
    assert (numbers["clip_score"], numbers["clip_score_unfloored"], provenance["clip_score_scale"],
            provenance["clip"]) == (None, None, None, None)
    clip = ClipScore(_config(tmp_path, clip="clip/"))
    numbers, provenance = summarise_all([clip], {"clip_score": np.array([1.0, 3.0])})
    assert numbers == {"fid": None, "clip_score": 2.0, "clip_score_unfloored": 2.0}
    assert provenance["clip"] == "clip/" and provenance["fid_protocol"] is None


def test_a_summary_must_write_exactly_its_declared_fields(tmp_path):
    class Undeclared(ClipScore):
        def summarise(self, rows):
            return {**super().summarise(rows), "extra": 1}

    with pytest.raises(ValueError, match="metric clip_score wrote .* not its declared fields"):
        summarise_all([Undeclared(_config(tmp_path, clip="clip/"))], {"clip_score": np.array([1.0])})


def test_show_is_one_phrase_per_metric_and_says_what_was_not_measured():
    result = {"fid": 12.34567, "clip_score": None, "images": 6, "fid_reference_images": 10}
    assert [m.show(result) for m in METRICS] == ["FID 12.346 (6 images vs 10 reference)", "CLIP score n/a"]


def test_a_new_metric_is_a_subclass_with_a_name_a_measurer_and_a_summary():
    class Brightness(Metric):
        name, label, title = "brightness", "brightness", "mean pixel value"
        numbers = ("brightness",)

        @staticmethod
        def measurer(cfg, device):
            return lambda images, prompts: images.reshape(len(images), -1).mean(1)

        def summarise(self, rows):
            return {"brightness": float(rows.mean())}

    images = np.stack([np.full((2, 2, 3), 10, np.uint8), np.full((2, 2, 3), 30, np.uint8)])
    rows = Brightness.measurer(None, "cpu")(images, ["a", "b"])
    assert Brightness.show(Brightness(None).summarise(rows)) == "brightness 20.00"
    assert Brightness.fields == ("brightness",)
