"""Fast checks of the stage table and the filter's rule table, without Ray: fingerprints
follow what each setting declares (how a job runs vs what it writes), stage sections and
their derived keys come from STAGES, and each filter rule rejects what it says under
its own name."""

import copy
import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amused.orchestration.run import plan
from amused.orchestration.run_config import SECTIONS, RunConfig, parse_run_config
from amused.orchestration.stages import STAGES
from amused.pipeline.filter import RULES, FilterConfig, _job_fingerprint, filter_file
from amused.plumbing.config import output_settings
from amused.plumbing.fsio import read_json

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def edited(cfg: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(cfg)
    *parents, leaf = dotted.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


def changed_stages(base: dict, dotted: str, value) -> set[str]:
    before, after = plan(parse_run_config(base)), plan(parse_run_config(edited(base, dotted, value)))
    return {name for name in before if before[name][0] != after[name][0]}


# A setting declared output=False per stage section: changing it reruns nothing.
HOW = [("filter.workers", 3), ("filter.partition_rows", 7), ("filter.progress", False), ("download.processes", 5),
       ("download.threads", 3), ("pretokenize.encoders", 2), ("pretokenize.device", "cpu"),
       ("pretokenize.decode_cpus", 1.5), ("vqgan.log", {"every": 7}), ("train.log", {"every": 7}),
       ("evaluate.watch", False), ("ray.address", "ray://elsewhere:10001")]


@pytest.mark.parametrize("dotted,value", HOW, ids=[h[0] for h in HOW])
def test_a_how_setting_keeps_every_fingerprint(demo, dotted, value):
    assert changed_stages(demo, dotted, value) == set()


# A setting that changes what a stage writes: that stage and everything after it rerun.
WHAT = [("filter.seed", 1, {"filter", "download", "vqgan", "pretokenize", "train", "evaluate", "samples"}),
        ("download.image_size", 48, {"download", "vqgan", "pretokenize", "train", "evaluate", "samples"}),
        ("pretokenize.batch_size", 32, {"pretokenize", "train", "evaluate", "samples"}),
        ("train.steps", 1200, {"train", "evaluate", "samples"}),
        ("ray.gpus_per_worker", 1.0, {"train", "evaluate", "samples"}),
        ("evaluate.max_prompts", 8, {"evaluate"}),
        ("sample.steps", 4, {"evaluate", "samples"})]


@pytest.mark.parametrize("dotted,value,stages", WHAT, ids=[w[0] for w in WHAT])
def test_a_what_setting_reruns_its_stage_and_those_after(demo, dotted, value, stages):
    assert changed_stages(demo, dotted, value) == stages


def test_stage_settings_are_the_sections_output_settings(demo):
    cfg = parse_run_config(demo)
    settings = {name: s for name, (_, s) in plan(cfg).items()}
    assert settings["filter"] == output_settings(cfg.filter)
    assert "workers" not in settings["filter"] and "seed" in settings["filter"]
    assert "log" not in settings["train"] and settings["train"]["ray"] == {"train_workers": 1, "gpus_per_worker": 0.0,
                                                                          "cpus_per_worker": 2.0}


def test_the_filter_job_hash_ignores_how_settings_and_the_folders():
    def job(**kw):
        return _job_fingerprint(FilterConfig(**{"input": "/in", "output": "/out", **kw}), ["/in/a.parquet"], {})

    same = job()["sha256"]
    assert job(workers=4, partition_rows=9, progress=False, ray_address="auto")["sha256"] == same
    assert job(input="/moved", output="/elsewhere")["sha256"] == same  # the files listed are what counts
    assert job(seed=1)["sha256"] != same and job(max_nsfw=0.5)["sha256"] != same


def test_stage_sections_are_run_config_fields_and_top_keys():
    sections = [s.section for s in STAGES if s.section]
    fields = [f.name for f in dataclasses.fields(RunConfig)]
    assert [f for f in fields if f in sections] == sections
    assert all(s.config is not None for s in STAGES if s.section)
    assert [k for k in SECTIONS if k in sections] == sections


def test_derived_keys_chain_each_stage_to_the_one_before(demo):
    cfg = parse_run_config(demo)
    assert cfg.download.input == cfg.filter.output
    assert cfg.vqgan.data.images == cfg.pretokenize.input == cfg.download.output
    assert cfg.train.data.dataset == cfg.pretokenize.output
    assert cfg.pretokenize.vqgan == cfg.train.model.vqgan == cfg.evaluate.vqgan
    with pytest.raises(ValueError, match=r"download\.input is set by the run"):
        parse_run_config(edited(demo, "download.input", "/elsewhere"))


# ----- the filter's rule table ----------------------------------------------------------------

GOOD = dict(URL="https://example.com/{i}.jpg", TEXT="a red circle", WIDTH=512.0, HEIGHT=384.0, similarity=0.33,
            punsafe=0.01, pwatermark=0.1, AESTHETIC_SCORE=5.5, LANGUAGE="en")
# One row per rule, failing it alone (by the settings below); the last passes all.
FAILS = {"url_scheme": {"URL": "ftp://example.com/x.jpg"}, "url_address": {"URL": "http://10.0.0.5/x.jpg"},
         "caption_chars": {"TEXT": "x" * 300}, "caption_words": {"TEXT": "one"},
         "language": {"LANGUAGE": "fr"}, "invalid_size": {"WIDTH": -1.0}, "image_size": {"HEIGHT": 10.0},
         "aspect_ratio": {"WIDTH": 4000.0, "HEIGHT": 400.0}, "similarity": {"similarity": 0.1},
         "nsfw": {"punsafe": 0.9}, "watermark": {"pwatermark": 0.8}, "aesthetic": {"AESTHETIC_SCORE": 3.0},
         None: {}}
SETTINGS = dict(min_width=64, min_height=64, max_aspect_ratio=3.0, min_similarity=0.28, max_nsfw=0.5,
                max_watermark=0.5, min_aesthetic=4.5, max_caption_chars=200, min_caption_words=2, languages="en,de")


def test_every_rule_is_in_the_table_and_reads_config_fields():
    assert [r.name for r in RULES] == [name for name in FAILS if name]
    fields = {f.name for f in dataclasses.fields(FilterConfig)}
    assert all(set(r.settings) <= fields for r in RULES)


def test_each_rule_rejects_its_row_under_its_own_name(tmp_path):
    rows = [{**GOOD, "URL": GOOD["URL"].format(i=i), **fail} for i, fail in enumerate(FAILS.values())]
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = FilterConfig(input=str(path), output=str(tmp_path / "out"), **SETTINGS)
    mapping = {"url": "URL", "caption": "TEXT", "width": "WIDTH", "height": "HEIGHT", "similarity": "similarity",
               "nsfw": "punsafe", "watermark": "pwatermark", "aesthetic_score": "AESTHETIC_SCORE",
               "language": "LANGUAGE"}
    counts = filter_file({"index": 0, "path": str(path)}, cfg.output, mapping, cfg.rules(), cfg.seed)
    assert counts["rejected"] == {name: 1 for name in FAILS if name}
    assert counts["rows_kept"] == 1
    assert read_json(str(tmp_path / "out/_work/files/00000.json")) == counts


def test_a_rule_is_off_until_one_of_its_settings_is_set():
    names = FilterConfig(input="i", output="o").rules().names()
    assert names == ["url_scheme", "url_address", "caption_chars", "invalid_size", "duplicate_url"]
    off = FilterConfig(input="i", output="o", min_caption_chars=None, drop_invalid_sizes=False, languages=" , ")
    assert off.rules().names() == ["url_scheme", "url_address", "duplicate_url"]


@pytest.mark.parametrize("rule", [r for r in RULES if any(b and b[0] is not None for b in r.settings.values())],
                         ids=lambda r: r.name)
def test_each_bounded_rule_setting_is_checked(rule):
    for name, bounds in rule.settings.items():
        if bounds and bounds[0] is not None:
            with pytest.raises(ValueError, match=f"^{name} must be"):
                FilterConfig(input="i", output="o", **{name: bounds[0] - 1})


def test_min_above_max_and_a_bad_allow_list_are_refused_at_construction():
    with pytest.raises(ValueError, match="min_caption_words 5 is above max_caption_words 2: no caption passes"):
        FilterConfig(input="i", output="o", min_caption_words=5, max_caption_words=2)
    with pytest.raises(ValueError, match="allow_hosts: 'localhost:8000' is neither"):
        FilterConfig(input="i", output="o", allow_hosts="localhost:8000")


def test_a_file_whose_every_row_is_rejected_keeps_nothing_without_failing(tmp_path):
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.Table.from_pylist([{**GOOD, "URL": f"ftp://example.com/{i}.jpg"} for i in range(2)]), path)
    cfg = FilterConfig(input=str(path), output=str(tmp_path / "out"))
    counts = filter_file({"index": 0, "path": str(path)}, cfg.output, {"url": "URL", "caption": "TEXT"}, cfg.rules(),
                         cfg.seed)
    assert (counts["rows_kept"], counts["rejected"]["url_scheme"]) == (0, 2)


def test_progress_is_read_from_each_stages_outputs(demo):
    cfg = parse_run_config(demo)
    Path(cfg.filter.output).mkdir(parents=True)
    for name in ("00000.parquet", "00001.parquet"):
        (Path(cfg.filter.output) / name).write_bytes(b"")
    progress = {s.name: s.progress(cfg) for s in STAGES if s.enabled(cfg)}  # as `amused status` shows them
    assert progress == {"source": "", "models": "", "filter": "2 shards", "download": "0 shards",
                        "vqgan": "step 0/600", "pretokenize": "0 shards", "train": "step 0/1600", "evaluate": "",
                        "samples": ""}
