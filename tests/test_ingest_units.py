"""Fast checks of the ingest settings, without Ray: IngestConfig and a run's `source`
refuse what cannot work before any work, with one line naming the key; the ingest stage
replaces filter and download for a folder of images; its settings reach the fingerprints
of the stages after it, while a fetched source's runs keep the fingerprints they had."""

import pytest

from amused.orchestration.run import _fingerprint, plan
from amused.orchestration.run_config import parse_run_config
from amused.orchestration.stages import STAGES
from amused.pipeline.ingest import IngestConfig
from tests.ingest_samples import images_run
from tests.samples import demo_config

pytestmark = pytest.mark.unit


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "t.csv").write_text("file,caption\n")
    return tmp_path


@pytest.mark.parametrize("kw,message", [
    ({}, "give exactly one of images"),
    ({"images": "IN", "hf_dataset": "IN"}, "give exactly one of images"),
    ({"images": "NO"}, "ingest.images: no folder at "),
    ({"hf_dataset": "NO"}, "ingest.hf_dataset: no dataset at "),
    ({"hf_dataset": "IN", "captions": "CSV"}, "captions: a caption table goes with images"),
    ({"images": "IN", "captions": "IN/c.txt"}, r"captions: .* is not a \.csv, \.jsonl, \.json, \.parquet file"),
    ({"images": "IN", "captions": "IN/c.csv"}, "ingest.captions: no file at "),
    ({"images": "IN", "samples_per_shard": 0}, "samples_per_shard: 0 must be >= 1"),
    ({"images": "IN", "encode_quality": 0}, "encode_quality: 0 must be a JPEG quality"),
    ({"images": "IN", "caption_column": " "}, "caption_column: empty name"),
])
def test_ingest_config_refuses_with_one_line(folder, kw, message):
    paths = {"IN": str(folder / "in"), "NO": str(folder / "missing"), "CSV": str(folder / "t.csv")}
    kw = {k: paths.get(v, v.replace("IN", paths["IN"])) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=message):
        IngestConfig(output=str(folder / "out"), **kw)


def test_source_errors_at_parse_time(folder):
    cfg = images_run(folder)
    with pytest.raises(ValueError, match="source.images: no folder at .*/nowhere"):
        parse_run_config({**cfg, "source": {"images": str(folder / "nowhere")}})
    with pytest.raises(ValueError, match="give exactly one of .*; got metadata, images"):
        parse_run_config({**cfg, "source": {"images": str(folder / "in"), "metadata": "m.parquet"}})
    with pytest.raises(ValueError, match="source.captions: goes with images or hf_dataset, not metadata"):
        parse_run_config({**cfg, "source": {"metadata": "m.parquet", "captions": "c.csv"}})
    with pytest.raises(ValueError, match="filter: the filter stage does not run for source.images; remove"):
        parse_run_config({**cfg, "filter": {"min_width": 32}})
    with pytest.raises(ValueError, match="ingest.images is set by the run"):
        parse_run_config({**cfg, "ingest": {"images": "x"}})
    with pytest.raises(ValueError, match="ingest: the ingest stage does not run for source.synthetic"):
        parse_run_config({**demo_config(folder / "r", port=8765), "ingest": {"min_side": 8}})


def test_an_images_source_runs_ingest_instead_of_filter_and_download(folder, monkeypatch):
    monkeypatch.chdir(folder)
    cfg = parse_run_config(images_run(folder, captions="t.csv", caption_column="text"))
    on = {s.name for s in STAGES if s.enabled(cfg)}
    assert on == {"models", "ingest", "pretokenize", "train"}
    assert cfg.ingest.captions == str(folder / "t.csv") and cfg.ingest.caption_column == "text"
    assert cfg.ingest.output == cfg.pretokenize.input == str(folder / "run/data/images")
    hf = images_run(folder)
    hf["source"] = {"hf_dataset": "in", "image_column": "picture", "caption_column": "text"}
    cfg = parse_run_config(hf)
    assert (cfg.ingest.hf_dataset, cfg.ingest.images) == (str(folder / "in"), None)
    assert (cfg.ingest.image_column, cfg.ingest.caption_column) == ("picture", "text")


def _changed(base: dict, **edits) -> set[str]:
    new = {**base, **{k: {**base.get(k, {}), **v} for k, v in edits.items()}}
    before, after = plan(parse_run_config(base)), plan(parse_run_config(new))
    return {name for name in before if before[name][0] != after[name][0]}


def test_what_changes_the_shards_reruns_ingest_and_what_follows(folder):
    base = images_run(folder)
    after_ingest = {"ingest", "pretokenize", "train"}
    assert _changed(base, source={"caption_column": "text"}) == after_ingest
    assert _changed(base, ingest={"image_size": 256}) == after_ingest
    assert _changed(base, ingest={"samples_per_shard": 7}) == after_ingest
    assert _changed(base, ingest={"workers": 3, "progress": False}) == set()


def test_a_fetched_source_keeps_the_fingerprints_it_had(folder):
    """The ingest input was added to vqgan and pretokenize later: where it is off it adds
    nothing, so existing runs do not redo their finished stages."""
    planned = plan(parse_run_config(demo_config(folder / "r", port=8765)))
    assert planned["ingest"] == ("off", None)
    for name in ("vqgan", "pretokenize"):
        stage = next(s for s in STAGES if s.name == name)
        assert planned[name][0] == _fingerprint(planned[name][1], [planned[a][0] for a in stage.after])
