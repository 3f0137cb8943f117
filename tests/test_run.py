"""`amused run` / `status` / `config`: the run config, the stage graph's fingerprints,
an end-to-end scaled-down demo run that resumes, skips and re-runs what changed."""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import s3fs
import yaml

from amused.orchestration.cli import main
from amused.orchestration.run import _locked_folders, plan, run
from amused.orchestration.run_config import load_run_config, parse_run_config
from amused.pipeline import shards as fmt
from tests.samples import demo_config, free_port

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_validate():
    for name in ("demo.yaml", "laion-256.yaml"):
        assert main(["config", "validate", str(ROOT / "configs" / name)]) == 0


def test_config_errors_name_key_value_and_allowed(tmp_path, capsys):
    good = demo_config(tmp_path / "run", port=8765)
    cases = [
        ({"train": {**good["train"], "steps": "ten"}}, "train.steps: expected int, got 'ten'"),
        ({"filter": {**good["filter"], "output": "/elsewhere"}}, "filter.output is set by the run"),
        ({"train": {**good["train"], "model": {"preset": "huge"}}}, "train.model.preset: 'huge' is not one of"),
        ({"sourse": {}}, "unknown key 'sourse'; allowed at the top"),
        ({"source": {"metadata": "x.parquet", "synthetic": {}}}, "exactly one of metadata"),
        ({"vqgan": None}, "models.vqgan is 'train' but there is no vqgan section"),
        ({"train": {**good["train"], "model": {"preset": "tiny"}}},
         "train.model.preset 'tiny' takes 8x8 tokens of 64 codes, but the VQ-GAN preset 'small' at "
         "pretokenize.resolution 32 makes 16x16 tokens of 256 codes"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            parse_run_config({**good, **change})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**good, "ray": {"train_workers": 0}}))
    assert main(["config", "validate", str(bad)]) == 1
    assert "train_workers >= 1" in capsys.readouterr().err
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(good))
    assert main(["config", "show", str(ok)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["data"]["dataset"] == str(tmp_path / "run/data/tokens")  # derived
    assert shown["train"]["optim"]["betas"] == [0.9, 0.999]  # a default filled in


def _changed(base: dict, **edits) -> set[str]:
    new = copy.deepcopy(base)
    for dotted, value in edits.items():
        *parents, leaf = dotted.split(".")
        node = new
        for p in parents:
            node = node[p]
        node[leaf] = value
    before, after = plan(parse_run_config(base)), plan(parse_run_config(new))
    return {name for name in before if before[name][0] != after[name][0]}


def test_fingerprints_follow_the_graph(tmp_path):
    base = demo_config(tmp_path, port=8765)
    downstream_of_filter = {"filter", "download", "vqgan", "pretokenize", "train", "evaluate", "samples"}
    assert _changed(base, **{"train.optim.lr": 0.003}) == {"train", "evaluate", "samples"}
    assert _changed(base, **{"filter.min_width": 40}) == downstream_of_filter
    assert _changed(base, **{"vqgan.steps": 5}) == {"vqgan", "pretokenize", "train", "evaluate", "samples"}
    assert _changed(base, **{"evaluate.max_prompts": 8}) == {"evaluate"}
    # How a stage runs, not what it writes: no re-run.
    assert _changed(base, **{"pretokenize.encoders": 2, "filter.workers": 1, "download.threads": 2,
                             "evaluate.watch": True}) == set()


def _ran(log: list[str]) -> set[str]:
    return {line.split("]")[0][1:] for line in log if line.endswith("starting") or line.endswith("resuming")}


def test_run_resumes_skips_and_reruns_what_changed(tmp_path, capsys):
    cfg = demo_config(tmp_path / "run")
    log: list[str] = []
    states = run(parse_run_config(cfg), log=log.append)
    assert _ran(log) == {"source", "models", "filter", "download", "vqgan", "pretokenize", "train", "evaluate",
                         "samples"}
    assert all(s["status"] == "done" for s in states.values())
    assert states["filter"]["counts"]["kept"] == 96
    assert states["download"]["counts"]["downloaded"] == 96
    assert states["pretokenize"]["counts"]["tokenized"] == 96
    manifest = (tmp_path / "run/data/tokens" / fmt.MANIFEST).read_bytes()
    assert json.loads((tmp_path / "run/samples/result.json").read_text())["prompt_following"]["samples"] == 8

    log.clear()
    run(parse_run_config(cfg), log=log.append)
    assert _ran(log) == set() and sum("skipped" in line for line in log) == 9

    # A new learning rate, and now the watcher evaluates checkpoints while training runs.
    cfg["train"]["optim"]["lr"] = 0.003
    cfg["evaluate"]["watch"] = True
    log.clear()
    states = run(parse_run_config(cfg), log=log.append)
    assert _ran(log) == {"train", "evaluate", "samples"}
    assert any("optim.lr: 0.002 -> 0.003" in line for line in log)
    assert (tmp_path / "run/data/tokens" / fmt.MANIFEST).read_bytes() == manifest
    results = sorted((tmp_path / "run/eval").glob("step_*.json"))
    assert [p.name for p in results] == ["step_00000003.json", "step_00000006.json"]
    assert all(p.stat().st_mtime < states["train"]["finished"] for p in results)  # written by the train stage
    assert json.loads(results[-1].read_text())["sample"]["steps"] == 4
    assert states["evaluate"]["counts"]["evaluated"] == 2

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["status", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    assert "train        done" in table and "step 6/6" in table and "latest checkpoint:" in table
    assert "masked_accuracy" in table and "samples_per_s" in table and "latest evaluation: step 6 FID" in table
    assert load_run_config(str(path)).train.optim.lr == 0.003


def _outcome(run_dir: Path) -> dict:
    """What must not depend on interruptions: the token shards' checksums, the training
    losses per logged step, the evaluation results and the prompt-following score."""
    manifest = json.loads((run_dir / "data/tokens" / fmt.MANIFEST).read_text())
    shards = sorted((s["name"], s["sha256"], s["rows"]) for s in manifest["shards"])
    losses = [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "train/metrics.jsonl").open())]
    evals = sorted((r["step"], r["fid"], r["clip_score"])
                   for r in map(json.loads, map(Path.read_text, (run_dir / "eval").glob("step_*.json"))))
    samples = json.loads((run_dir / "samples/result.json").read_text())["prompt_following"]
    return {"shards": shards, "losses": losses, "evals": evals, "samples": samples}


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path):
    """`amused run` killed with SIGKILL (its whole process group: Ray too) at three random
    moments, resumed each time, ends where an uninterrupted run ends."""
    def start(cfg: dict, name: str) -> subprocess.Popen:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return subprocess.Popen([sys.executable, "-m", "amused.orchestration.cli", "run", str(path)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    # One port for both runs: the image URLs, kept in each sample's metadata, contain it.
    # Several download threads: the download stage puts each shard in key order.
    port = free_port()
    straight = demo_config(tmp_path / "straight", port)
    assert start(straight, "straight").wait(timeout=900) == 0
    killed = demo_config(tmp_path / "killed", port)
    rng = random.Random(7)
    kills = 0
    for delay in sorted(rng.uniform(5, 120) for _ in range(3)):
        proc = start(killed, "killed")
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < delay:
            time.sleep(0.5)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills >= 1
    assert start(killed, "killed").wait(timeout=900) == 0
    got, want = _outcome(tmp_path / "killed"), _outcome(tmp_path / "straight")
    got_evals, want_evals = got.pop("evals"), want.pop("evals")
    assert got == want
    # Evaluation results to 1e-4: once a killed run's FID of one checkpoint differed by
    # 1.2e-5 (relative) with byte-identical weights and reference, while `amused evaluate`
    # of that checkpoint in fresh processes reproduced the uninterrupted value exactly.
    assert [e[0] for e in got_evals] == [e[0] for e in want_evals]
    for (_, fid, clip), (_, fid_want, clip_want) in zip(got_evals, want_evals):
        assert fid == pytest.approx(fid_want, rel=1e-4) and clip == pytest.approx(clip_want, rel=1e-4, abs=1e-6)


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    """Ray Train runs its workers in another directory: a relative run_dir must not reach them."""
    monkeypatch.chdir(tmp_path)
    cfg = demo_config("rel/run", port=8765)
    cfg["models"]["text_encoder"] = "weights/clip"
    parsed = parse_run_config(cfg)
    assert parsed.train.run_dir == str(tmp_path / "rel/run/train")
    assert parsed.train.data.dataset == str(tmp_path / "rel/run/data/tokens")
    assert parsed.pretokenize.text_encoder == str(tmp_path / "weights/clip")


def test_runs_sharing_a_data_folder_share_a_lock(tmp_path):
    """A run's data folder inside its run folder is locked too: another run may name it
    as its own data_dir."""
    first = parse_run_config(demo_config(tmp_path / "x"))
    second = parse_run_config({**demo_config(tmp_path / "y"), "data_dir": first.data_dir})
    assert first.data_dir.startswith(first.run_dir + "/")
    assert set(_locked_folders(first)) & set(_locked_folders(second)) == {first.data_dir}
    same = parse_run_config({**demo_config(tmp_path / "z"), "data_dir": str(tmp_path / "z")})
    assert _locked_folders(same) == [same.run_dir]


def test_status_of_a_running_run_on_s3(s3_bucket, capsys):
    """`amused status s3://...` of a run whose train stage is running: the stage table, then the
    training's progress and its checkpoints (the last complete one, one still uploading), all read
    through fsspec from files as the stages and rank 0 write them."""
    fs = s3fs.S3FileSystem()
    run_dir = f"{s3_bucket}/{uuid.uuid4().hex[:8]}/run"
    cfg = demo_config(run_dir)
    fs.pipe(f"{run_dir}/config.yaml", yaml.safe_dump(cfg).encode())
    now = time.time()
    for stage in ("source", "models", "filter", "download", "vqgan", "pretokenize"):
        fs.pipe(f"{run_dir}/stages/{stage}.json", json.dumps({"status": "done", "seconds": 1.0, "counts": {}}).encode())
    fs.pipe(f"{run_dir}/stages/train.json", json.dumps({"status": "running", "started": now - 30}).encode())
    fs.pipe(f"{run_dir}/train/progress.json", json.dumps(
        {"step": 5, "total": 6, "loss": 4.5, "samples_per_s": 16.0, "eta_s": 0.5, "state": "running", "launch": "l",
         "restarts": 1, "started": now - 20, "updated": now - 2}).encode())
    fs.pipe(f"{run_dir}/train/checkpoints/step_00000003/COMPLETE", b'{"step": 3, "files": {}}')
    fs.pipe(f"{run_dir}/train/checkpoints/step_00000006/zero_pp_rank_1_mp_rank_00_optim_states.pt", b"partial")
    fs.pipe(f"{run_dir}/train/train.lock", b"{}")  # held while the training works
    assert main(["status", run_dir]) == 0
    out = capsys.readouterr().out
    assert "train        running" in out
    assert "train progress: running, step 5/6, loss 4.5, 16 samples/s, ETA 00:00, restarts 1, updated " in out
    assert f"latest checkpoint: {run_dir}/train/checkpoints/step_00000003 (step 3, " in out
    assert "; uploading step 6" in out
