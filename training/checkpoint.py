"""Checkpoints of a run: DeepSpeed's own files plus what DeepSpeed does not keep.

    RUN_DIR/checkpoints/step_00001000/
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed (model, optimizer, scheduler)
        ema.safetensors                                EMA weights (rank 0)
        trainer.json                                   step, data position, world size, counters
        rng/rank_00000.json, rank_00000.safetensors    every rank's RNG states
        config.yaml                                    the config it was trained with
        COMPLETE                                       written last: step, every file's size and sha256
    RUN_DIR/checkpoints/latest.json                    the newest complete step (a convenience)
    RUN_DIR/checkpoints/damaged/step_N                 checkpoints a resume found damaged, set aside

A checkpoint counts only when COMPLETE exists: every rank hashes the files it wrote and
rank 0 gathers the checksums, so it writes the marker only once every rank's files are
written, and a kill at any moment leaves the previous checkpoint usable (DeepSpeed's own
`latest` file is not written: rank 0 writes it without waiting for the others).

Every file is checked against the marker before it is read: a resume takes the newest
checkpoint whose files all match, naming each damaged file and setting its checkpoint
aside; sampling, export and evaluation refuse a damaged file by name. Saving and resuming
split the hashing alike: each rank hashes the files it wrote (a resume on fewer ranks:
rank r also takes those of ranks r + world, r + 2 world, ...). A process hashes a file
once: it remembers the size and modification time it verified, and a file that changed
since is hashed again (a new process always hashes). A marker from
before checksums were recorded holds only the step: such a checkpoint loads unverified,
with a note. DeepSpeed's files are pickles; they are loaded only from the run's own
folder. Weights that come from outside a run are safetensors.

Readers open a checkpoint through `Checkpoint` (a run's latest complete one, or a given
folder): its config and its weights with or without EMA come checked. Every writer of a
config.yaml (the run folder's and each checkpoint's) uses `write_config`; a resume finds
its checkpoint with `newest_intact`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from amused.plumbing.config import read_yaml
from amused.plumbing.fsio import TMP_MARK, atomic_writer, read_json, sha256_of, write_json_atomic
from amused.training.config import dump_config

MARKER = "COMPLETE"
UNIVERSAL = "universal"
DAMAGED = "damaged"
MODEL_STATES = "mp_rank_00_model_states.pt"
EMA_WEIGHTS = "ema.safetensors"
CONFIG = "config.yaml"
TRAINER = "trainer.json"
# The rank in a per-rank file's name: ours (rng/rank_00003.json) and DeepSpeed's
# (zero_pp_rank_3_mp_rank_00_optim_states.pt); files without one are rank 0's.
_RANK_IN_NAME = re.compile(r"(?:^|zero_pp_)rank_(\d+)")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag(step: int) -> str:
    return f"step_{step:08d}"


def _complete_steps(run_dir: str | Path) -> list[int]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / MARKER).exists())


def _remove_incomplete(run_dir: str | Path) -> list[str]:
    """Folders a crash left without a marker (rank 0, before any rank writes)."""
    root = checkpoints_dir(run_dir)
    removed = []
    for p in sorted(root.glob("step_*")) if root.is_dir() else []:
        if not (p / MARKER).exists():
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = plain["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def write_rank_files(folder: Path, rank: int) -> None:
    plain, tensors = rng_state()
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "rng" / f"rank_{rank:05d}.safetensors"))
    write_json_atomic(str(folder / "rng" / f"rank_{rank:05d}.json"), plain)


def restore_rank_rng(folder: Path, rank: int) -> bool:
    """False when the checkpoint has no RNG file for this rank (it ran on fewer ranks)."""
    base = folder / "rng" / f"rank_{rank:05d}"
    if not base.with_suffix(".json").exists():
        return False
    set_rng_state(json.loads(base.with_suffix(".json").read_text()), load_file(str(base.with_suffix(".safetensors"))))
    return True


def writer(name: str) -> int:
    """The rank that writes the checkpoint file `name` (a path inside the folder)."""
    found = _RANK_IN_NAME.search(name.rpartition("/")[2])
    return int(found.group(1)) if found else 0


def own_checksums(folder: Path, rank: int) -> dict[str, dict]:
    """Size and sha256 of the files of `folder` that `rank` wrote: each rank hashes its
    own, in parallel. Every rank reads and writes the same folder, and a resume reads
    every rank's files: the run folder must be on a file system all nodes share
    (node-local disks are not supported; object storage is not yet)."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.name != MARKER and TMP_MARK not in path.name and writer(name) == rank:
            out[name] = {"size": path.stat().st_size, "sha256": sha256_of(str(path))}
    return out


def mark_complete(run_dir: str | Path, step: int, keep: int, files: dict[str, dict]) -> None:
    """Rank 0, once every rank's checksums are in: the marker, `latest.json`, then pruning to `keep`."""
    folder = checkpoints_dir(run_dir) / tag(step)
    write_json_atomic(str(folder / MARKER), {"step": step, "files": files})
    _write_latest(run_dir, step)
    for old in _complete_steps(run_dir)[:-keep]:
        shutil.rmtree(checkpoints_dir(run_dir) / tag(old))
        shutil.rmtree(checkpoints_dir(run_dir) / UNIVERSAL / tag(old), ignore_errors=True)


def _write_latest(run_dir: str | Path, step: int) -> None:
    write_json_atomic(str(checkpoints_dir(run_dir) / "latest.json"), {"step": step, "tag": tag(step)})


def damage(folder: Path, names: tuple[str, ...] = (), rank: int = 0, world: int = 1) -> list[str] | None:
    """What is wrong with the files `names` of a complete checkpoint, one line per file
    ([] = intact); None when its marker has no checksums (an older run). Without `names`:
    the files of the marker that `rank` of `world` checks (those it wrote; all for one rank)."""
    try:
        files = read_json(str(folder / MARKER)).get("files")
    except ValueError:
        return [f"{folder / MARKER}: damaged, not readable JSON"]
    if files is None:
        return None
    problems = []
    for name in names or sorted(n for n in files if writer(n) % world == rank):
        path, want = folder / name, files.get(name)
        if want is None:
            problems.append(f"{path}: not part of this checkpoint (its {MARKER} marker does not list it)")
        elif not path.is_file():
            problems.append(f"{path}: missing (expected {want['size']} bytes)")
        elif _verified.get(path) == (seen := _seen(path, folder)):
            continue
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: damaged, {path.stat().st_size} bytes, expected {want['size']}")
        elif (digest := sha256_of(str(path))) != want["sha256"]:
            problems.append(f"{path}: damaged, sha256 {digest[:16]}..., expected {want['sha256'][:16]}... "
                            f"(same size, {want['size']} bytes)")
        else:
            _verified[path] = seen
    return problems


# Files this process found matching their marker, with what a stat said of the file and of
# the marker then: checking them again costs a stat, not a hash. Any write or replacement
# changes the inode, the modification or the change time, and the file is hashed again.
_verified: dict[Path, tuple] = {}


def _seen(path: Path, folder: Path) -> tuple:
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in (path.stat(), (folder / MARKER).stat()))


_noted_unverified: set[Path] = set()


Parse = TypeVar("Parse")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder and its step. Every file is checked against the
    marker before it is handed out (a ValueError names the damaged file; each file is
    hashed once per process while it stays unchanged); a marker without checksums is
    noted once."""

    folder: Path
    step: int

    @classmethod
    def at(cls, folder: str | Path) -> Checkpoint:
        folder = Path(folder)
        if not (folder / MARKER).exists():
            raise _not_complete(folder)
        try:
            step = read_json(str(folder / MARKER))["step"]
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"checkpoint file {folder / MARKER}: damaged, not a JSON object with a step") from None
        return cls(folder, step)

    @classmethod
    def every(cls, run_dir: str | Path) -> list[Checkpoint]:
        """The run's complete checkpoints, oldest first."""
        return [cls(checkpoints_dir(run_dir) / tag(step), step) for step in _complete_steps(run_dir)]

    @classmethod
    def latest(cls, run_dir: str | Path) -> Checkpoint | None:
        """The run's newest complete checkpoint, None before the first. Complete, not yet
        verified: its files are checked when they are read."""
        found = cls.every(run_dir)
        return found[-1] if found else None

    @property
    def complete(self) -> bool:
        """Still complete: pruning to `checkpoint.keep` removes old ones while others read them."""
        return (self.folder / MARKER).exists()

    def checked(self, *names: str) -> Checkpoint:
        """This checkpoint once `names` are found matching the marker."""
        if not self.complete:
            raise _not_complete(self.folder)
        problems = damage(self.folder, names)
        if problems:
            raise ValueError(f"checkpoint file {problems[0]}")
        if problems is None and self.folder not in _noted_unverified:
            _noted_unverified.add(self.folder)
            _stderr(f"note: {self.folder} has no checksums (written before they were recorded): loaded unverified")
        return self

    def file(self, name: str) -> Path:
        """The path of the file `name`, checked."""
        return self.checked(name).folder / name

    def config(self, parse: Callable[[Any], Parse]) -> Parse:
        """The config it was trained with, read by `parse` (e.g. training.config.parse_config)."""
        return parse(read_yaml(str(self.file(CONFIG))))

    def weights(self, ema: bool) -> Path:
        """The model weights file: the EMA weights (safetensors) or DeepSpeed's model states."""
        return self.file(_weights_name(ema))

    def loadable(self, ema: bool) -> Checkpoint:
        """This checkpoint once what loading its model reads (the config, the weights
        with or without EMA) matches the marker."""
        return self.checked(CONFIG, _weights_name(ema))

    def state_dict(self, ema: bool) -> dict[str, torch.Tensor]:
        """The model weights of `weights(ema)`. DeepSpeed's file is a pickle: read with
        `weights_only=True` (plain tensors and containers, nothing executed)."""
        path = self.weights(ema)
        if ema:
            return load_file(str(path))
        return torch.load(path, weights_only=True, map_location="cpu")["module"]


def _weights_name(ema: bool) -> str:
    return EMA_WEIGHTS if ema else MODEL_STATES


def _not_complete(folder: Path) -> ValueError:
    return ValueError(f"{folder} is not a complete training checkpoint (no {MARKER} marker)")


def write_config(folder: str | Path, cfg) -> None:
    """FOLDER/config.yaml: the config (any with `to_json()`) a run or checkpoint is trained with."""
    with atomic_writer(str(Path(folder) / CONFIG)) as fh:
        fh.write(dump_config(cfg).encode())


def newest_intact(run_dir: str | Path, decide: Callable) -> dict | None:
    """Every rank: the trainer.json (as written) of the newest complete checkpoint whose
    files all match its marker, None when there is none. Each rank hashes its own share
    of a candidate's files, the verdicts are gathered, and the newest step every rank
    found intact is taken; rank 0 names what is damaged and sets it aside.
    `decide(fn, *args)` runs `fn` on rank 0 and gives every rank its result or its error
    (the training's rank0_decides)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    verdicts: dict[int, list[str] | None] = {}
    for step in decide(_resume_candidates, run_dir):
        folder = checkpoints_dir(run_dir) / tag(step)
        try:
            mine = damage(folder, rank=rank, world=world)
        except Exception as exc:  # reported, not raised: the other ranks wait in the gather
            mine = [f"{folder}: rank {rank} could not check its files: {type(exc).__name__}: {exc}"]
        every: list = [None] * world
        dist.all_gather_object(every, mine)
        lines = [line for part in every if part for line in part]
        # No checksums is a fact of the marker, the same on every rank.
        verdicts[step] = None if all(part is None for part in every) else list(dict.fromkeys(lines))
        if not verdicts[step]:
            break
    return decide(_resume_from, run_dir, verdicts)


def _resume_candidates(run_dir: str | Path, log=_stderr) -> list[int]:
    """Rank 0, before a resume: the complete steps, newest first, once the folders a
    crash left without a marker are removed."""
    removed = _remove_incomplete(run_dir)
    if removed:
        log(f"removed checkpoint folders a crash left incomplete: {', '.join(removed)}")
    return _complete_steps(run_dir)[::-1]


def _resume_from(run_dir: str | Path, verdicts: dict[int, list[str] | None], log=_stderr) -> dict | None:
    """Rank 0: the trainer state of the newest checkpoint whose files all match its marker,
    given each checked step's problems (newest first, up to the first intact one; None: no
    checksums). A damaged one is named file by file and moved to checkpoints/damaged/.
    Complete checkpoints but none intact: an error."""
    damaged = {step: problems for step, problems in verdicts.items() if problems}
    for step, problems in damaged.items():
        log(f"checkpoint {tag(step)} is damaged: {'; '.join(problems)}")
    chosen = next((step for step, problems in verdicts.items() if not problems), None)
    if chosen is None:
        if damaged:
            raise ValueError(f"no intact checkpoint to resume in {checkpoints_dir(run_dir)}: "
                             + "; ".join(f"{tag(s)}: {p[0]}" for s, p in damaged.items())
                             + " (move the step_* folders away to start over)")
        return None
    if verdicts[chosen] is None:
        log(f"checkpoint {tag(chosen)} has no checksums (written before they were recorded): resuming unverified")
    if damaged:
        for bad in damaged:
            _set_aside(run_dir, bad)
        _write_latest(run_dir, chosen)
        log(f"resuming from the previous complete checkpoint {tag(chosen)} instead; moved "
            f"{', '.join(tag(s) for s in damaged)} to {checkpoints_dir(run_dir) / DAMAGED}")
    return json.loads((checkpoints_dir(run_dir) / tag(chosen) / TRAINER).read_text())


def _set_aside(run_dir: str | Path, step: int) -> None:
    root = checkpoints_dir(run_dir)
    target = root / DAMAGED / tag(step)
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    (root / tag(step)).rename(target)
    shutil.rmtree(root / UNIVERSAL / tag(step), ignore_errors=True)


def to_universal(run_dir: str | Path, step: int) -> Path:
    """DeepSpeed's universal form of a checkpoint (for loading on another number of
    ranks), converted once into checkpoints/universal/ via a temporary folder."""
    src = checkpoints_dir(run_dir) / tag(step)
    dst = checkpoints_dir(run_dir) / UNIVERSAL / tag(step)
    if (dst / MARKER).exists():
        return dst.parent
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
         "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"],
        capture_output=True, text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"universal conversion of {src} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    write_json_atomic(str(tmp / MARKER), {"step": step})
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst.parent
