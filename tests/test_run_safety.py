"""One writer per run folder (the lock of `amused run`, `amused train`, `amused vqgan
train`) and checkpoints checked against the checksums in their marker before any load."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import s3fs
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from amused.demo.datasets import write_token_dataset
from amused.orchestration.cli import main
from amused.plumbing.runlock import FolderLock, FolderLocked
from amused.training import checkpoint as ckpt
from amused.training.checkpoint import MARKER, Checkpoint, damage, newest_intact, own_files, publish
from amused.training.config import load_config, parse_config
from amused.training.distributed import rank0_decides
from amused.training.inference.sample import load_trained_model
from amused.training.launch import train_on_ray
from amused.training.uvit.task import train
from tests.samples import demo_config

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()

# A process that takes a lock; "hold" keeps it, "crash" exits without releasing it.
_HOLDER = """
import os, sys, time
from amused.plumbing.runlock import FolderLock
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
    """Every file but the lock files (the holders' business)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".lock"}


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


class _ConflictingS3(ThreadingHTTPServer):
    """A proxy in front of the moto server that answers every conditional PUT the way AWS
    answers the loser of two racing ones: 409 ConditionalRequestConflict."""

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.conflicts = 0
        super().__init__(("127.0.0.1", 0), _ConflictHandler)


class _ConflictHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # answers the client's Expect: 100-continue

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and self.headers.get("If-None-Match"):
            self.server.conflicts += 1
            reply = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code>'
                     b"<Message>A conflicting conditional operation is currently in progress against this "
                     b"resource. Please try again.</Message></Error>")
            self.send_response(409)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
            return
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=30)
        upstream.request(self.command, self.path, body=body,
                         headers={k: v for k, v in self.headers.items() if k.lower() != "expect"})
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward


def test_a_conditional_write_that_lost_a_race_on_s3_looks_again(s3_bucket, s3_server, tmp_path, monkeypatch):
    """AWS refuses the loser of two racing conditional PUTs with 409, which s3fs raises as
    a plain OSError: the lock looks again and names the holder that won."""
    url = f"{s3_bucket}/{tmp_path.name}/train.lock"
    proxy = _ConflictingS3(s3_server)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    with held(url) as pid:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            with pytest.raises(FolderLocked, match=f"held by pid {pid} on host {HOST}"):
                FolderLock(url).acquire()
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            proxy.shutdown()
            proxy.server_close()
    assert proxy.conflicts >= 1


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
    leftovers are cleaned up (on Ray: from the driver, before Ray is asked for workers,
    so not even Ray Train's record is written)."""
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


def test_on_ray_the_driver_takes_over_a_dead_trainers_lock(tmp_path, tokens, capsys, ray_session):
    """Under Ray the driver holds the lock (its host is the user's, whatever node rank 0
    lands on): a lock a dead run left on this host is taken over by the driver, and the
    workers train without taking it again."""
    run_dir = tmp_path / "run"
    dead = crashed_holder(str(run_dir / "train.lock"))
    capsys.readouterr()
    result = train_on_ray(parse_config(train_config(run_dir, tokens, 2)), workers=1)
    assert result.step == 2
    # The driver's own stderr (the workers' does not reach the driver in the tests).
    assert f"took over the lock {run_dir / 'train.lock'}: its holder, pid {dead} on host {HOST}" in \
        capsys.readouterr().err
    assert not (run_dir / "train.lock").exists()


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


# ---------------------------------------------------------------- checking checkpoint files

def _checkpoint_of_ranks(folder: Path, ranks: int) -> list[str]:
    """A checkpoint folder as `ranks` ranks save one (DeepSpeed's and our per-rank file
    names), its marker gathered from every rank's own checksums; the files' names."""
    names = ["mp_rank_00_model_states.pt", "ema.safetensors", "trainer.json", "config.yaml"]
    for rank in range(ranks):
        names += [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"rng/rank_{rank:05d}.json",
                  f"rng/rank_{rank:05d}.safetensors"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode() * 50)
    (folder / "trainer.json").write_text(json.dumps({"step": int(folder.name[5:])}))
    marker = publish(folder, str(folder), own_files(folder, None))
    (folder / MARKER).write_text(json.dumps({"step": int(folder.name[5:]), "files": marker}))
    return sorted(names)


def test_each_rank_checks_the_files_it_wrote(tmp_path):
    """Resume checks split like saving: rank r of `world` checks the files ranks r,
    r + world, ... wrote (all of them on one rank)."""
    folder = tmp_path / "step_00000004"
    names = _checkpoint_of_ranks(folder, 3)
    for name in names:
        (folder / name).unlink()
    checked_by = {(rank, world): sorted(line.split(": missing")[0][len(str(folder)) + 1:]
                                        for line in damage(folder, rank=rank, world=world))
                  for world in (1, 2, 3, 4) for rank in range(world)}
    assert checked_by[0, 1] == names
    for world in (2, 3, 4):
        shares = [checked_by[rank, world] for rank in range(world)]
        assert sorted(n for share in shares for n in share) == names  # each file once
    assert checked_by[1, 3] == ["rng/rank_00001.json", "rng/rank_00001.safetensors",
                                "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert checked_by[0, 2] == sorted(set(names) - set(checked_by[1, 2]))
    assert "zero_pp_rank_2_mp_rank_00_optim_states.pt" in checked_by[0, 2]  # 3 ranks' files resumed on 2
    assert checked_by[3, 4] == []


def _resume_on_rank(rank: int, run_dir: str, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        state = newest_intact(run_dir, rank0_decides)
        Path(store).with_name(f"rank{rank}.json").write_text(json.dumps(state))
    finally:
        dist.destroy_process_group()


def test_two_ranks_resume_from_the_newest_checkpoint_every_rank_found_intact(tmp_path, capfd):
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        _checkpoint_of_ranks(root / f"step_{step:08d}", 2)
    _flip_a_byte(root / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")  # rank 1's to check
    mp.spawn(_resume_on_rank, args=(str(tmp_path / "run"), str(tmp_path / "store")), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [{"step": 2}] * 2
    err = capfd.readouterr().err
    assert f"{root / 'step_00000004' / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'}: damaged, sha256 " in err
    assert "resuming from the previous complete checkpoint step_00000002 instead" in err
    assert (root / "damaged" / "step_00000004").is_dir() and not (root / "step_00000004").exists()


def test_a_process_hashes_a_checkpoint_file_once_while_it_stays_unchanged(copied_run, monkeypatch):
    hashed: list[str] = []
    real = ckpt.sha256_of
    monkeypatch.setattr(ckpt, "sha256_of", lambda path: hashed.append(Path(path).name) or real(path))
    folder = copied_run / "checkpoints" / "step_00000004"
    ema = folder / "ema.safetensors"
    for _ in range(3):
        Checkpoint.at(folder).checked("config.yaml", "ema.safetensors")
    assert sorted(hashed) == ["config.yaml", "ema.safetensors"]
    ema.write_bytes(ema.read_bytes())  # rewritten, same bytes: hashed again, and found intact
    Checkpoint.at(folder).checked("ema.safetensors")
    assert hashed.count("ema.safetensors") == 2
    _flip_a_byte(ema)  # then changed: caught by the same process
    with pytest.raises(ValueError, match=f"checkpoint file {ema}: damaged, sha256 "):
        Checkpoint.at(folder).checked("ema.safetensors")
