"""Opening checkpoints (`training.checkpoint.Checkpoint`) on hand-made folders of tiny
files, marked complete by the module's own writer: which one is the latest, which
weights file, the config it was trained with, refusal of a file its marker does not
vouch for, and which one a resume takes."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from amused.training.checkpoint import (
    CONFIG,
    DAMAGED,
    EMA_WEIGHTS,
    MARKER,
    MODEL_STATES,
    TRAINER,
    Checkpoint,
    checkpoints_dir,
    mark_complete,
    newest_intact,
    own_files,
    publish,
    tag,
    write_config,
)
from amused.training.config import dump_config, parse_config

pytestmark = pytest.mark.unit


def _config(run_dir: Path, steps: int = 8):
    return parse_config({"run_dir": str(run_dir), "steps": steps,
                         "data": {"dataset": str(run_dir / "tokens"), "global_batch_size": 8, "micro_batch_size": 8},
                         "model": {"preset": "tiny"}})


def _checkpoint(run_dir: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint folder as a one-rank training writes one: EMA weights +step, raw
    weights -step, the config, the trainer state; the marker last (unless incomplete)."""
    folder = Path(checkpoints_dir(run_dir)) / tag(step)
    folder.mkdir(parents=True)
    save_file({"w": torch.full((2,), float(step))}, str(folder / EMA_WEIGHTS))
    torch.save({"module": {"w": torch.full((2,), -float(step))}}, folder / MODEL_STATES)
    write_config(folder, _config(run_dir, steps=step))
    (folder / TRAINER).write_text(json.dumps({"step": step}))
    if complete:
        mark_complete(run_dir, step, keep=10, files=publish(folder, str(folder), own_files(folder, 0)))
    return folder


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert Checkpoint.latest(run) is None and Checkpoint.every(run) == []  # no checkpoints folder yet
    for step in (2, 4):
        _checkpoint(run, step)
    crashed = _checkpoint(run, 6, complete=False)
    aside = Path(checkpoints_dir(run)) / DAMAGED / tag(8)  # where a resume sets a damaged one
    aside.parent.mkdir()
    _checkpoint(run, 8).rename(aside)

    latest = Checkpoint.latest(run)
    assert (latest.step, latest.folder) == (4, str(Path(checkpoints_dir(run)) / tag(4)))
    assert [c.step for c in Checkpoint.every(run)] == [2, 4]
    assert Checkpoint.at(latest.folder) == latest  # the step read from the marker
    with pytest.raises(ValueError, match=f"{crashed} is not a complete training checkpoint \\(no {MARKER} marker\\)"):
        Checkpoint.at(crashed)

    _flip_a_byte(Path(latest.folder) / EMA_WEIGHTS)  # damaged, still marked: the latest, refused when read
    assert Checkpoint.latest(run) == latest
    with pytest.raises(ValueError, match="damaged, sha256"):
        latest.weights(ema=True)


def test_weights_with_or_without_ema(tmp_path):
    trained = Checkpoint.at(_checkpoint(tmp_path / "run", 3))
    assert trained.weights(ema=True) == Path(trained.folder) / EMA_WEIGHTS
    assert trained.weights(ema=False) == Path(trained.folder) / MODEL_STATES
    assert trained.state_dict(ema=True)["w"].tolist() == [3.0, 3.0]
    assert trained.state_dict(ema=False)["w"].tolist() == [-3.0, -3.0]


def test_the_config_it_was_trained_with_round_trips(tmp_path):
    trained = Checkpoint.at(_checkpoint(tmp_path / "run", 5))
    assert trained.config(parse_config) == _config(tmp_path / "run", steps=5)
    assert trained.file(CONFIG).read_text() == dump_config(_config(tmp_path / "run", steps=5))
    assert not list(Path(trained.folder).glob(f"{CONFIG}*tmp*"))  # written under a temporary name, then renamed


def test_a_file_that_does_not_match_its_marker_is_refused_by_name(tmp_path):
    trained = Checkpoint.at(_checkpoint(tmp_path / "run", 4))
    trained.weights(ema=True)  # intact: checked once, then remembered
    ema, config = Path(trained.folder) / EMA_WEIGHTS, Path(trained.folder) / CONFIG
    _flip_a_byte(ema)
    with pytest.raises(ValueError, match=f"checkpoint file {ema}: damaged, sha256 .* \\(same size, "):
        trained.weights(ema=True)
    with pytest.raises(ValueError, match=f"checkpoint file {ema}: damaged"):
        trained.loadable(ema=True)  # what loading the model reads: config and EMA weights
    assert trained.loadable(ema=False) == trained  # config and raw weights are intact
    assert trained.state_dict(ema=False)["w"].tolist() == [-4.0, -4.0]
    size = config.stat().st_size
    config.write_text("steps: 1\n")
    with pytest.raises(ValueError, match=f"checkpoint file {config}: damaged, 9 bytes, expected {size}"):
        trained.config(parse_config)
    (Path(trained.folder) / "extra.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=f"extra.bin: not part of this checkpoint \\(its {MARKER} marker"):
        trained.checked("extra.bin")


def test_a_checkpoint_opened_by_a_relative_path_knows_its_run_folder(tmp_path, monkeypatch):
    _checkpoint(tmp_path / "run", 4)
    monkeypatch.chdir(tmp_path / "run")
    opened = Checkpoint.at(f"checkpoints/{tag(4)}")
    assert (opened.folder, opened.run_dir) == (str(tmp_path / "run" / "checkpoints" / tag(4)), str(tmp_path / "run"))
    assert Checkpoint(str(tmp_path / "elsewhere" / "kept" / tag(4)), 4).run_dir == str(tmp_path / "elsewhere")


def test_a_marker_without_checksums_loads_unverified_with_one_note(tmp_path, capsys):
    folder = _checkpoint(tmp_path / "run", 4)
    (folder / MARKER).write_text(json.dumps({"step": 4}))
    trained = Checkpoint.at(folder)
    trained.weights(ema=True)
    trained.config(parse_config)
    assert capsys.readouterr().err.count("has no checksums (written before they were recorded): loaded unverified") == 1


def test_a_resume_takes_the_newest_intact_checkpoint_and_sets_the_damaged_aside(tmp_path, capsys):
    run = tmp_path / "run"
    for step in (2, 4):
        _checkpoint(run, step)
    crashed = _checkpoint(run, 6, complete=False)
    _flip_a_byte(Path(checkpoints_dir(run)) / tag(4) / MODEL_STATES)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        state = newest_intact(run, lambda fn, *args: fn(*args))  # one rank decides for itself
    finally:
        dist.destroy_process_group()
    assert state == {"step": 2}
    err = capsys.readouterr().err
    assert f"removed checkpoint folders a crash left incomplete: {crashed.name}" in err
    assert f"{Path(checkpoints_dir(run)) / tag(4) / MODEL_STATES}: damaged, sha256 " in err
    assert not crashed.exists() and (Path(checkpoints_dir(run)) / DAMAGED / tag(4) / MODEL_STATES).exists()
    assert Checkpoint.latest(run).step == 2
    assert json.loads((Path(checkpoints_dir(run)) / "latest.json").read_text())["step"] == 2
