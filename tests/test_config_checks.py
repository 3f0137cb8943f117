"""Settings that would fail a stage hours later are refused when the config is read: by
`amused config validate`, `amused run` and the stage commands alike (one check per fact,
in the stage's own config class or the shared coercion), each with one line naming the
key; YAML syntax errors and repeated keys name the file, line and column."""

import copy
import math
import re
from pathlib import Path

import pytest
import yaml

from amused.orchestration.cli import main
from amused.orchestration.run_config import parse_run_config
from amused.plumbing.config import read_yaml

# Unit tier: every test is well under a second, except that the first `amused evaluate`
# call imports its module (ray, ~2 s once per session).
pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = math.nan, math.inf


def shipped(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def changed(cfg: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(cfg)
    *parents, leaf = dotted.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[leaf] = value
    return out


# (dotted key, bad value, the error's text): on configs/laion-256.yaml, whose models are
# folders, so no check of the token grid stands in for the one meant.
LAION_CASES = [
    ("train.optim.lr", NAN, "train.optim.lr: expected a finite number, got nan"),
    ("train.optim.lr", INF, "train.optim.lr: expected a finite number, got inf"),
    ("train.optim.eps", 0, "optim.eps must be > 0"),
    ("train.optim.betas", [0.9, NAN], "train.optim.betas[1]: expected a finite number"),
    ("train.objective", {"label_smoothing": 10**400}, "train.objective.label_smoothing: expected a finite number"),
    ("train.data.default_aesthetic", -INF, "train.data.default_aesthetic: expected a finite number"),
    ("train.data.seed", -1, "data.seed must be >= 0"),
    ("train.data", {"global_batch_size": 500, "micro_batch_size": 8},
     "train.data.global_batch_size=500 must be a multiple of micro_batch_size x ranks (8 x 64) "
     "(ray.train_workers: 64)"),
    ("train.data", {"global_batch_size": 512, "micro_batch_size": 8, "lanes": 96},
     "train.data.lanes=96 must be a multiple of the number of ranks (64)"),
    ("ray.gpus_per_worker", INF, "ray.gpus_per_worker: expected a finite number"),
    ("filter.max_nsfw", 2, "filter: max_nsfw must be in [0, 1], got 2"),
    ("filter.max_watermark", -0.5, "filter: max_watermark must be in [0, 1], got -0.5"),
    ("filter.min_similarity", 1.5, "filter: min_similarity must be in [-1, 1], got 1.5"),
    ("filter.min_aesthetic", NAN, "filter.min_aesthetic: expected a finite number"),
    ("filter.min_width", -256, "filter: min_width must be >= 0, got -256"),
    ("filter.max_caption_chars", 0, "min_caption_chars 1 is above max_caption_chars 0"),
    ("sample", {"guidance_scale": -3}, "sample: guidance_scale must be >= 1 (1 = off), got -3"),
    ("sample", {"temperature_start": -1}, "sample: temperature_start must be >= 0"),
    ("evaluate.seed", -1, "evaluate: seed must be in [0, 2^32), got -1"),
    ("evaluate.gpus_per_actor", -1, "evaluate: gpus_per_actor must be >= 0"),
    ("data_dir", 5, "data_dir: expected a folder path, got 5"),
    ("ray", 0, "ray: expected a mapping, got int 0"),
    ("download", [], "download: expected a mapping, got list []"),
    ("evaluate", "yes", "evaluate: expected a mapping, got str 'yes'"),
    ("source.metadata", "", "source.metadata: expected a Parquet URL"),
    ("models.vqgan", "", "models: vqgan must not be empty"),
    ("prompts", 0, "prompts: expected a list of non-empty strings (the sample grid's prompts), got 0"),
]

# The demo trains its own VQ-GAN in the run's process (one rank).
DEMO_CASES = [
    ("vqgan.data", {"resolution": 32, "global_batch_size": 24, "micro_batch_size": 16},
     "vqgan.data.global_batch_size=24 must be a multiple of micro_batch_size x ranks (16 x 1) "
     "(the vqgan stage trains on 1 rank)"),
    ("vqgan.data.resolution", 33, "data.resolution 33 must be a multiple of 2, the downsampling of "
                                  "model.preset 'small'"),
    ("vqgan.data.seed", -2, "data.seed must be >= 0"),
    ("vqgan.discriminator", {"lr_ratio": 0}, "discriminator.lr_ratio must be > 0"),
    ("vqgan.optim.lr", INF, "vqgan.optim.lr: expected a finite number"),
    ("source.synthetic.seed", -1, "seed >= 0"),
]

# Checks of the download and pretokenize config classes (pipeline/download.py,
# pipeline/pretokenize.py), reached through the same parse; matched by the key's name.
STAGE_CLASS_CASES = [
    ("download.timeout", -1, r"download\b.*\btimeout"),
    ("download.encode_quality", 500, r"download\b.*\bencode_quality"),
    ("pretokenize.resolution", 30, r"pretokenize\b.*\bresolution"),
    ("pretokenize.batch_size", 0, r"pretokenize\b.*\bbatch_size"),
    ("pretokenize.crop", "diagonal", r"pretokenize\b.*\bcrop"),
    ("pretokenize", {"crop": "center", "views": 2}, r"pretokenize\b.*\bviews"),
    ("pretokenize.dtype", "fp16", r"pretokenize\b.*\bdtype"),
    ("pretokenize.device", "tpu", r"pretokenize\b.*\bdevice"),
]


def test_shipped_configs_pass_and_stay_unchanged_by_the_checks():
    for name in ("laion-256.yaml", "demo.yaml"):
        parse_run_config(shipped(name))


@pytest.mark.parametrize("key,value,message", LAION_CASES, ids=[c[0] for c in LAION_CASES])
def test_run_config_refuses_at_parse_time(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_run_config(changed(shipped("laion-256.yaml"), key, value))


@pytest.mark.parametrize("key,value,message", DEMO_CASES, ids=[c[0] for c in DEMO_CASES])
def test_run_config_refuses_vqgan_and_source_settings(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_run_config(changed(shipped("demo.yaml"), key, value))


@pytest.mark.parametrize("key,value,pattern", STAGE_CLASS_CASES, ids=[c[0] for c in STAGE_CLASS_CASES])
def test_run_config_refuses_download_and_pretokenize_settings(key, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_run_config(changed(shipped("laion-256.yaml"), key, value))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("amused: error:") and "\n" not in err, err
    return err


def test_validate_run_and_train_agree_on_a_bad_train_section(tmp_path, capsys):
    run_cfg = {**changed(shipped("laion-256.yaml"), "train.optim.lr", INF), "run_dir": str(tmp_path / "run"),
               "data_dir": str(tmp_path / "data")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_cfg))
    train_cfg = {**run_cfg["train"], "run_dir": str(tmp_path / "train"),
                 "data": {**run_cfg["train"]["data"], "dataset": str(tmp_path / "tokens")}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_cfg))
    errors = []
    for argv in (["config", "validate", str(tmp_path / "run.yaml")], ["run", str(tmp_path / "run.yaml")],
                 ["train", str(tmp_path / "train.yaml")]):
        assert main(argv) == 1
        errors.append(one_line_error(capsys))
    assert all("optim.lr: expected a finite number, got inf" in e for e in errors), errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "train.yaml"]  # nothing was made


def test_stage_flags_go_through_the_same_checks(tmp_path, capsys):
    base = ["filter", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "out")]
    for flags, message in ((["--max-nsfw", "nan"], "max_nsfw: expected a finite number, got nan"),
                           (["--max-nsfw", "2"], "max_nsfw must be in [0, 1], got 2.0"),
                           (["--min-aesthetic", "inf"], "min_aesthetic: expected a finite number, got inf"),
                           (["--allow-hosts", "localhost:8000"], "allow_hosts: 'localhost:8000' is neither")):
        assert main(base + flags) == 1
        assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
    evaluate = ["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--prompts", "p.txt", "--reference", "r.npz",
                "--inception", "i.pth", "--guidance-scale", "-3"]
    assert main(evaluate) == 1
    assert "guidance_scale must be >= 1 (1 = off), got -3.0" in one_line_error(capsys)
    for watch in (["--poll", "nan"], ["--poll", "0"], ["--timeout", "-5"]):
        assert main(evaluate[:-2] + watch) == 1
        assert "poll must be > 0 and timeout >= 0 seconds" in one_line_error(capsys)
    # Checked before the checkpoint (which does not exist) is loaded.
    sample = ["sample", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "a", "--output", str(tmp_path / "x.png"),
              "--guidance-scale", "-3"]
    assert main(sample) == 1
    assert "guidance_scale must be >= 1 (1 = off), got -3.0" in one_line_error(capsys)
    # A batch that does not split over the Ray workers is refused before Ray is asked for them.
    train = tmp_path / "train.yaml"
    train.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{dataset: {tmp_path / 'tokens'}, global_batch_size: 8, "
                     "micro_batch_size: 8}\nmodel: {preset: tiny}\nsteps: 4\n")
    assert main(["train", str(train), "--ray-workers", "3"]) == 1
    assert "global_batch_size=8 must be a multiple of micro_batch_size x ranks (8 x 3)" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,where,problem", [
    ("run_dir: /r\nsource:\n  metadata: [a, b\nmodels: {}\n", ":4:7:", "expected ',' or ']'"),
    ("run_dir: /r\n  data_dir: /d\n", ":2:11:", "mapping values are not allowed here"),
    ("run_dir: /r\ntrain:\n\tsteps: 3\n", ":3:1:", "found character '\\t' that cannot start any token"),
    ("run_dir: /r\nrun_dir: /other\n", ":2:1:", "duplicate key 'run_dir' (first at line 1)"),
    ("train:\n  optim: {lr: 0.1, warmup_steps: 5, lr: 0.2}\n", ":2:37:", "duplicate key 'lr' (first at line 2)"),
    ("train:\n  optim:\n    lr: 0.1\n  data: {}\n  optim: {lr: 1}\n", ":5:3:", "duplicate key 'optim' (first at line 2)"),
    ("run_dir: \x07\n", ":1:10:", "character U+0007 is not allowed in YAML"),
])
def test_yaml_errors_name_file_line_and_column(tmp_path, capsys, text, where, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for argv in (["config", "validate", str(path)], ["run", str(path)], ["train", str(path)]):
        assert main(argv) == 1
        err = one_line_error(capsys)
        assert f"{path}{where} {problem}" in err, err


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {lr: 0.1, steps: 3}\ntrain:\n  <<: *b\n  lr: 0.2\n")
    assert read_yaml(str(path))["train"] == {"lr": 0.2, "steps": 3}
