"""One writer per run folder (the lock of `amused run`, `amused train`, `amused vqgan
train`) and checkpoints checked against the checksums in their marker before any load."""

import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from orchestration.cli import main
from pipeline.runlock import FolderLock, FolderLocked
from pipeline.synthetic import write_token_dataset
from tests.test_run import demo_config
from training.checkpoint import MARKER, damage
from training.config import load_config, parse_config
from training.engine import train
from training.sample import load_trained_model

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()

# A process that takes a lock; "hold" keeps it, "crash" exits without releasing it.
_HOLDER = """
import os, sys, time
from pipeline.runlock import FolderLock
FolderLock(sys.argv[1]).acquire()
print("held", flush=True)
if sys.argv[2] == "crash":
    os._exit(0)
time.sleep(300)
"""


@contextmanager
def held(url: str):
    """Another process holding the lock at `url`; yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, url, "hold"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def crashed_holder(url: str) -> int:
    """The pid of a process that took the lock at `url` and died without releasing it."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, url, "crash"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate()
    assert out.strip() == "held"
    return proc.pid


def files(folder: Path) -> dict[str, bytes]:
    """Every file but the lock files (the holders' business) and Ray Train's own record
    (its driver validates that storage before any rank starts)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".lock" and p.relative_to(folder).parts[0] != "ray"}


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("amused: error:")]
    assert len(lines) == 1 and lines[0].startswith("amused: error: FolderLocked: "), err
    return lines[0]


# ---------------------------------------------------------------- the lock

@pytest.fixture(params=["local", "s3"])
def lock_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "folder" / "run.lock")
    return f"{request.getfixturevalue('s3_bucket')}/{tmp_path.name}/run.lock"


def test_a_held_lock_is_refused_and_a_dead_holders_lock_taken_over(lock_url):
    with held(lock_url) as pid:
        with pytest.raises(FolderLocked, match=f"held by pid {pid} on host {HOST} since .*another process"):
            FolderLock(lock_url).acquire()
    dead = crashed_holder(lock_url)
    messages: list[str] = []
    lock = FolderLock(lock_url, log=messages.append)
    lock.acquire()
    assert len(messages) == 1 and f"pid {dead} on host {HOST}" in messages[0] and "no longer running" in messages[0]
    assert json.loads(lock.fs.cat_file(lock.path))["pid"] == os.getpid()
    with pytest.raises(FolderLocked, match=f"held by pid {os.getpid()}"):  # not re-entrant
        FolderLock(lock_url).acquire()
    lock.release()
    assert not lock.fs.exists(lock.path)


def test_a_lock_held_on_another_host_is_refused_with_what_to_do(tmp_path):
    url = str(tmp_path / "run.lock")
    (tmp_path / "run.lock").write_text(json.dumps({"host": "node-7", "pid": os.getpid(), "started": 0.0,
                                                   "since": 0.0, "command": "amused run x.yaml"}))
    with pytest.raises(FolderLocked, match=f"pid {os.getpid()} on host node-7 .*amused run x.yaml.*another host.*"
                                           f"delete {url}"):
        FolderLock(url).acquire()
    assert (tmp_path / "run.lock").exists()


@pytest.mark.parametrize("shared_data", [False, True])
def test_a_second_run_stops_before_changing_anything(tmp_path, capsys, shared_data):
    """Two `amused run` of one config (or two runs sharing a data folder) at once: the
    second stops at once, names the holder and leaves every stage state as it was."""
    cfg = demo_config(tmp_path / "run")
    if shared_data:
        cfg["data_dir"] = str(tmp_path / "data")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # What a first run in the middle of its work has written.
    (tmp_path / "run/stages").mkdir(parents=True)
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "run/stages/filter.json").write_text(json.dumps({"stage": "filter", "status": "running"}))
    before = files(tmp_path / "run")
    with held(str(tmp_path / ("data" if shared_data else "run") / "run.lock")) as pid:
        capsys.readouterr()
        assert main(["run", str(path)]) == 1
        assert f"held by pid {pid} on host {HOST}" in error_line(capsys.readouterr().err)
        after = files(tmp_path / "run")
    assert after == before


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("safety") / "tokens")
    write_token_dataset(url, [64])
    return url


def train_config(run_dir: Path, tokens: str, steps: int) -> dict:
    return {"run_dir": str(run_dir), "steps": steps,
            "data": {"dataset": tokens, "global_batch_size": 8, "micro_batch_size": 8, "workers": 0},
            "model": {"preset": "tiny"}, "optim": {"lr": 1e-2, "warmup_steps": 1}, "ema": {"decay": 0.5},
            "checkpoint": {"every": 2, "keep": 3}, "log": {"every": 2, "progress": False}}


def test_a_second_training_stops_before_changing_anything(tmp_path, tokens, capsys, ray_session):
    """`amused train` (in process and on Ray workers) and `amused vqgan train` on a run
    folder another process trains in: a clear error naming it, before even a crash's
    leftovers are cleaned up."""
    run_dir = tmp_path / "run"
    leftover = run_dir / "checkpoints" / "step_00000003"
    leftover.mkdir(parents=True)
    (leftover / "mp_rank_00_model_states.pt").write_bytes(b"half written")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_config(run_dir, tokens, 4)))
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump({"run_dir": str(run_dir), "steps": 2,
                                                         "data": {"images": str(tmp_path / "images")}}))
    before = files(run_dir)
    for command in (["train", str(tmp_path / "train.yaml")], ["train", str(tmp_path / "train.yaml"), "--ray-workers", "1"],
                    ["vqgan", "train", str(tmp_path / "vqgan.yaml")]):
        with held(str(run_dir / "train.lock")) as pid:
            capsys.readouterr()
            assert main(command) == 1
            assert f"held by pid {pid} on host {HOST}" in error_line(capsys.readouterr().err)
            assert files(run_dir) == before


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_rerun_takes_over_a_dead_trainers_lock_and_falls_back_from_a_damaged_checkpoint(tmp_path, tokens, capsys):
    run_dir = tmp_path / "run"
    train(parse_config(train_config(run_dir, tokens, 4)))
    assert not (run_dir / "train.lock").exists()
    newest = run_dir / "checkpoints" / "step_00000004"
    recorded = json.loads((newest / MARKER).read_text())["files"]
    on_disk = {str(p.relative_to(newest)): p.stat().st_size for p in newest.rglob("*")
               if p.is_file() and p.name != MARKER}
    assert {k: v["size"] for k, v in recorded.items()} == on_disk
    assert {"ema.safetensors", "mp_rank_00_model_states.pt", "trainer.json", "rng/rank_00000.json"} <= set(recorded)

    states = newest / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    states.write_bytes(states.read_bytes()[:size // 2])  # truncated
    _flip_a_byte(newest / "ema.safetensors")  # same size, other bytes
    dead = crashed_holder(str(run_dir / "train.lock"))
    capsys.readouterr()

    result = train(parse_config(train_config(run_dir, tokens, 4)))
    err = capsys.readouterr().err
    assert result.resumed_from == 2 and result.step == 4
    assert f"took over the lock {run_dir / 'train.lock'}: its holder, pid {dead} on host {HOST}" in err
    assert f"{states}: damaged, {size // 2} bytes, expected {size}" in err
    assert f"{newest / 'ema.safetensors'}: damaged, sha256 " in err and ", expected " in err
    assert "resuming from the previous complete checkpoint step_00000002 instead" in err
    assert (run_dir / "checkpoints" / "damaged" / "step_00000004" / "ema.safetensors").exists()
    assert damage(newest) == []  # written again by the resumed run
    assert not (run_dir / "train.lock").exists()


@pytest.fixture
def copied_run(tmp_path, trained_checkpoint) -> Path:
    """A copy of the session's trained run (its checkpoint at step 4), free to damage."""
    shutil.copytree(Path(trained_checkpoint).parents[1], tmp_path / "run")
    return tmp_path / "run"


def resume_config(run_dir: Path, steps: int):
    cfg = load_config(str(run_dir / "config.yaml")).to_json()
    return parse_config({**cfg, "run_dir": str(run_dir), "steps": steps})


def test_sample_export_evaluate_and_resume_refuse_a_damaged_file_by_name(copied_run, tmp_path, tiny_models, capsys):
    folder = copied_run / "checkpoints" / "step_00000004"
    ema = folder / "ema.safetensors"
    size = ema.stat().st_size
    ema.write_bytes(ema.read_bytes()[:100])
    named = f"checkpoint file {ema}: damaged, 100 bytes, expected {size}"
    for command in (["sample", "--checkpoint", str(folder), "--prompt", "a red circle", "--output",
                     str(tmp_path / "grid.png")],
                    ["export", "--checkpoint", str(folder), "--output", str(tmp_path / "exported"),
                     "--vqgan", str(tiny_models / "vqgan"), "--text-encoder", str(tiny_models)],
                    ["evaluate", "--checkpoint", str(folder), "--prompts", "p.txt", "--reference", "r.npz",
                     "--inception", "i.pth"]):
        capsys.readouterr()
        assert main(command) == 1
        assert named in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "exported").exists()
    with pytest.raises(ValueError, match=f"no intact checkpoint to resume in .*step_00000004: {ema}: damaged, 100 bytes"):
        train(resume_config(copied_run, 6))
    assert ema.exists()  # nothing to fall back to: left where it is


def test_checkpoints_from_before_checksums_load_unverified(copied_run, capsys):
    folder = copied_run / "checkpoints" / "step_00000004"
    (folder / MARKER).write_text(json.dumps({"step": 4}))
    load_trained_model(folder)
    assert f"{folder} has no checksums (written before they were recorded): loaded unverified" in \
        capsys.readouterr().err
    result = train(resume_config(copied_run, 6))
    assert result.resumed_from == 4 and result.step == 6
    assert "step_00000004 has no checksums (written before they were recorded): resuming unverified" in \
        capsys.readouterr().err
