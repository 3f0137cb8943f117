"""Checkpoints of a run: DeepSpeed's own files plus what DeepSpeed does not keep.

    RUN_DIR/checkpoints/step_00001000/
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed (model, optimizer, scheduler): the
                                                       trained parameters only (a LoRA run's frozen
                                                       base is not saved; training/lora.py)
        ema.safetensors                                EMA of the trained parameters (fp32 master;
                                                       every rank's share, written by rank 0)
        trainer.json                                   step, data position, world size, counters
        rng/rank_00000.json, rank_00000.safetensors    every rank's RNG states
        config.yaml                                    the config it was trained with
        COMPLETE                                       written last: step, every file's size and sha256
    RUN_DIR/checkpoints/latest.json                    the newest complete step (a convenience)
    RUN_DIR/checkpoints/universal/step_N               DeepSpeed's universal form (a resume on other ranks)
    RUN_DIR/checkpoints/damaged/step_N                 checkpoints a resume found damaged, set aside

RUN_DIR is a local (or shared) folder or any fsspec URL (s3://...). Every process works
on a local copy of a step folder (`local_copy`): the folder itself when RUN_DIR is local,
else its place in this node's scratch (plumbing.storage.scratch_folder), shared by the
ranks of the node. DeepSpeed and the loaders read and write only local files.

Saving (`save_checkpoint` in training/engine.py, then `Publisher`): every rank writes its
files into the local copy; then each rank hashes the files it wrote (`writer(name) ==
rank`) and uploads them to RUN_DIR (for a local RUN_DIR no upload, only the hashing: one
path), every rank's checksums or error are gathered, and rank 0 writes COMPLETE with
every file's size and sha256 LAST, then latest.json, then prunes to `checkpoint.keep`
(remote objects and local copies). A checkpoint counts only when COMPLETE exists, so a
kill at any moment, a partial upload included, leaves the previous one usable
(DeepSpeed's own `latest` file is not written: rank 0 writes it without waiting for the
others). With `checkpoint.asynchronous` the hashing, upload and marker run in a thread
per rank: training goes on once the local files are written, and the next checkpoint
and the end of training wait for it (and raise its error, naming the file).

Every file is checked against the marker before it is read; a remote one is downloaded
into the local copy first (a local copy that already matches is reused; the ranks of a
node take turns per file, so it is downloaded once per node). A resume takes the newest
checkpoint whose files all match, naming each damaged (missing or not matching) file
and setting its checkpoint aside; one that some rank could not check at all (a download
or the scratch failed) is left in place and every rank raises CheckFailed, retried; sampling, export and evaluation refuse a damaged file by name. Each
rank checks (and on a remote run downloads) its share of the files: those it wrote (a
resume on fewer ranks: rank r also takes those of ranks r + world, r + 2 world, ...),
and, remote, the model states every rank's DeepSpeed load reads (ZeRO 1/2 read only
their own optimizer partition besides) and the EMA, whose piece every rank reads. A process hashes a file once: it remembers the
size and modification time it verified, and a file that changed since is hashed again
(a new process always hashes). A marker from before checksums were recorded holds only
the step: such a checkpoint loads unverified, with a note. DeepSpeed's files are
pickles; they are loaded only from the run's own folder. Weights that come from outside
a run are safetensors.

Readers open a checkpoint through `Checkpoint` (a run's latest complete one, or a given
folder, local path or URL): its config and its weights with or without EMA come checked,
as local paths. Every writer of a config.yaml (the run folder's and each checkpoint's)
uses `write_config`; a resume finds its checkpoint with `newest_intact`.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from amused.plumbing.config import read_yaml
from amused.plumbing.fsio import TMP_MARK, atomic_writer, file_exists, read_json, sha256_of, write_json_atomic
from amused.plumbing.storage import is_local, join, scratch_folder, url_to_fs
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
_DOWNLOAD = ".download-"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def checkpoints_dir(run_dir: str | Path) -> str:
    return join(str(run_dir), "checkpoints")


def tag(step: int) -> str:
    return f"step_{step:08d}"


def step_folder(run_dir: str | Path, step: int) -> str:
    return join(checkpoints_dir(run_dir), tag(step))


def local_copy(url: str | Path) -> Path:
    """Where this node reads and writes the checkpoint folder (or file) `url`: the path
    itself when local, else its place under the scratch folder of its run, the same for
    the writer of a checkpoint and every later reader on the node."""
    url = str(url).rstrip("/")
    if is_local(url):
        return Path(url_to_fs(url)[1])
    run, found, inside = (url + "/").rpartition("/checkpoints/")
    if not found:  # a step folder outside any run's layout
        return scratch_folder(url)
    return scratch_folder(run) / "checkpoints" / inside.rstrip("/")


def _step_of(name: str) -> int | None:
    return int(name[5:]) if re.fullmatch(r"step_\d+", name) else None


def step_folders(run_dir: str | Path) -> dict[int, str]:
    """The step_* folders of RUN_DIR/checkpoints by step (with or without a marker), as
    paths of their filesystem."""
    fs, root = url_to_fs(checkpoints_dir(run_dir))
    found = {}
    for path in fs.glob(f"{root.rstrip('/')}/step_*"):
        step = _step_of(path.rstrip("/").rpartition("/")[2])
        if step is not None:
            found[step] = path
    return found


def complete_steps(run_dir: str | Path) -> list[int]:
    """The steps of RUN_DIR's checkpoints that have their marker, oldest first."""
    fs, root = url_to_fs(checkpoints_dir(run_dir))
    # One listing of the checkpoints (per step folder on S3), not one request per folder.
    markers = fs.glob(f"{root.rstrip('/')}/step_*/{MARKER}")
    return sorted(s for s in (_step_of(p.rstrip("/").split("/")[-2]) for p in markers) if s is not None)


def _remove_incomplete(run_dir: str | Path) -> list[str]:
    """Folders a crash left without a marker (rank 0, before any rank writes)."""
    fs, _ = url_to_fs(checkpoints_dir(run_dir))
    complete = set(complete_steps(run_dir))
    removed = []
    for step, path in sorted(step_folders(run_dir).items()):
        if step not in complete:
            fs.rm(path, recursive=True)
            removed.append(tag(step))
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


def own_files(folder: Path, rank: int | None) -> list[str]:
    """The names of the files in the local `folder` that `rank` wrote (None: all)."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if n.rpartition("/")[2] != MARKER and TMP_MARK not in n and _DOWNLOAD not in n
                  and (rank is None or writer(n) == rank))


def clear_own(folder: Path, rank: int) -> None:
    """Before `rank` writes a checkpoint into a local copy a former launch may have left:
    what remains of its own files there would otherwise be published with the new ones."""
    if folder.is_dir():
        for name in own_files(folder, rank):
            (folder / name).unlink(missing_ok=True)


def publish(folder: Path, url: str, names: list[str]) -> dict[str, dict]:
    """Size and sha256 of the files `names` of the local copy `folder` of `url`, each
    uploaded there when `url` is remote (hashed while it streams; an object appears only
    once complete, plumbing/fsio.atomic_writer). A failure names the file."""
    remote = not is_local(url)
    out = {}
    for name in names:
        path = folder / name
        try:
            if remote:
                with open(path, "rb") as src, atomic_writer(join(url, name)) as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
                out[name] = {"size": dst.size, "sha256": dst.sha256.hexdigest()}
            else:
                out[name] = {"size": path.stat().st_size, "sha256": sha256_of(str(path))}
        except Exception as exc:
            raise OSError(f"{join(url, name)}: {'upload' if remote else 'hashing'} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    return out


def mark_complete(run_dir: str | Path, step: int, keep: int, files: dict[str, dict]) -> list[int]:
    """Rank 0, once every rank's files are in place: the marker, `latest.json`, then
    pruning to `keep` (the remote objects, and this node's local copies); the steps kept."""
    write_json_atomic(join(step_folder(run_dir, step), MARKER), {"step": step, "files": files})
    _write_latest(run_dir, step)
    complete = complete_steps(run_dir)
    fs, _ = url_to_fs(checkpoints_dir(run_dir))
    for old in complete[:-keep]:
        for url in (step_folder(run_dir, old), join(checkpoints_dir(run_dir), UNIVERSAL, tag(old))):
            path = url_to_fs(url)[1]
            if fs.exists(path):
                # The marker first: a removal cut short leaves an incomplete folder (removed
                # at the next resume), never a "complete" one with files missing.
                marker = url_to_fs(join(url, MARKER))[1]
                if fs.exists(marker):
                    fs.rm_file(marker)
                fs.rm(path, recursive=True)
    kept = complete[-keep:]
    prune_local(run_dir, kept)
    return kept


def prune_local(run_dir: str | Path, kept: list[int]) -> None:
    """This node's local copies of checkpoints older than the oldest kept (a no-op for a
    local run folder, which pruning itself cleans)."""
    if not kept or is_local(str(run_dir)):
        return
    root = local_copy(checkpoints_dir(run_dir))
    for parent in (root, root / UNIVERSAL):
        for path in parent.glob("step_*") if parent.is_dir() else []:
            step = _step_of(path.name)
            if step is not None and step < min(kept):
                shutil.rmtree(path, ignore_errors=True)
                shutil.rmtree(_locks(path), ignore_errors=True)


def _write_latest(run_dir: str | Path, step: int) -> None:
    write_json_atomic(join(checkpoints_dir(run_dir), "latest.json"), {"step": step, "tag": tag(step)})


class Publisher:
    """Every rank, for the whole training: publishes each checkpoint once its local files
    are written (see the module's docstring), in a thread of its own when `asynchronous`.
    The ranks' threads meet in a gloo group made here, once, by every rank, so that their
    gathers never interleave with the training loop's collectives (as
    torch.distributed.checkpoint's async_save does)."""

    def __init__(self, run_dir: str, keep: int, asynchronous: bool):
        self.run_dir, self.keep, self.asynchronous = run_dir, keep, asynchronous
        self.group = dist.new_group(backend="gloo")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, step: int) -> None:
        """Publishes checkpoint `step`, whose local files every rank has written."""
        self.wait()
        if self.asynchronous:
            self._thread = threading.Thread(target=self._run, args=(step,), name=f"publish-{tag(step)}", daemon=True)
            self._thread.start()
        else:
            self._run(step)
            self.wait()

    def wait(self) -> None:
        """Until the checkpoint being published is complete; raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def settle(self, timeout: float = 600.0) -> None:
        """After an error in the training loop: the checkpoint being published (its local
        files written whole) is let finish, for up to `timeout` seconds, so that a restart
        resumes from it; its own failure is only noted, the loop's error is what counts.
        Every rank's thread gathers in a group of its own, so it finishes while the other
        ranks train on or stop (a dead rank's socket fails the gather)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                _stderr(f"note: {thread.name} still running after {timeout:.0f} s: left unfinished")
        error, self._error = self._error, None
        if error is not None:
            _stderr(f"note: {error}")

    def _run(self, step: int) -> None:
        try:
            self._publish(step)
        except BaseException as exc:  # raised in the training thread by the next wait()
            self._error = exc

    def _publish(self, step: int) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        url = step_folder(self.run_dir, step)
        folder = local_copy(url)
        try:
            mine = ("ok", publish(folder, url, own_files(folder, rank)))
        except Exception as exc:  # reported, not raised: the other ranks wait in the gather
            mine = ("error", f"rank {rank}: {exc}")
        every: list = [None] * world
        dist.all_gather_object(every, mine, group=self.group)
        box: list = [None]
        if rank == 0:
            errors = [value for status, value in every if status == "error"]
            try:
                if errors:
                    raise OSError("; ".join(errors))
                box[0] = ("ok", mark_complete(self.run_dir, step, self.keep,
                                              {k: v for _, part in every for k, v in part.items()}))
            except Exception as exc:
                box[0] = ("error", f"{exc}" if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}")
        dist.broadcast_object_list(box, src=0, group=self.group)
        status, value = box[0]
        if status == "error":
            raise RuntimeError(f"checkpoint {url} was not saved (it has no {MARKER} marker): {value}")
        prune_local(self.run_dir, value)


def _problem(name: str, path: Path, want: dict) -> str | None:
    """What is wrong with the local file `path` (named `name` in messages) given its marker entry."""
    if not path.is_file():
        return f"{name}: missing (expected {want['size']} bytes)"
    if path.stat().st_size != want["size"]:
        return f"{name}: damaged, {path.stat().st_size} bytes, expected {want['size']}"
    digest = sha256_of(str(path))
    if digest != want["sha256"]:
        return (f"{name}: damaged, sha256 {digest[:16]}..., expected {want['sha256'][:16]}... "
                f"(same size, {want['size']} bytes)")
    return None


def _check_file(url: str, root: Path, name: str, want: dict, remote: bool) -> str | None:
    """The local copy (`name` in the local folder `root`) of the checkpoint file `url`,
    made to match its marker entry `want`: a remote file whose local copy does not is
    downloaded (under a temporary name, moved into place once it matches). None when it
    matches, else the problem. Raises when it could not be checked (a download, a read or
    a write failed)."""
    local = root / name
    if local.is_file() and _verified.get(local) == _seen(local, want):
        return None
    if remote:
        with _node_lock(root, name):  # the ranks of a node that all read a file download it once
            problem = _fetch(url, root, name, want)
    else:
        problem = _problem(url, local, want)
    if problem is None:
        _verified[local] = _seen(local, want)
    return problem


@contextmanager
def _node_lock(root: Path, name: str):
    """The lock of the file `name` of the local folder `root` among the processes of this
    node (the scratch is node-local): the second rank to take it finds the first one's
    verified copy. Lock files (and downloads under way) live beside the folder, not in it:
    DeepSpeed takes any file of a universal checkpoint's folder whose name has ".pt" in it
    for its own, and a killed download would stay there."""
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    _locks(root).mkdir(parents=True, exist_ok=True)
    with open(_locks(root) / name.replace("/", "%"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        yield


def _locks(root: Path) -> Path:
    return root.with_name(f".{root.name}.locks")


def _fetch(url: str, root: Path, name: str, want: dict) -> str | None:
    """`name` in `root` made a verified copy of the remote file `url` unless it already matches `want`."""
    local = root / name
    problem = _problem(url, local, want)
    if problem is None:
        return None
    fs, path = url_to_fs(url)
    tmp = _locks(root) / f"{name.replace('/', '%')}{_DOWNLOAD}{uuid.uuid4().hex[:8]}"
    try:
        try:
            fs.get_file(path, str(tmp))
        except FileNotFoundError:
            return f"{url}: missing (expected {want['size']} bytes)"
        problem = _problem(url, tmp, want)
        if problem is None:
            os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return problem


def damage(folder: str | Path, names: tuple[str, ...] = (), rank: int = 0, world: int = 1) -> list[str] | None:
    """What is wrong with the files `names` of a complete checkpoint, one line per file
    ([] = intact; a remote checkpoint's files are downloaded into the local copy); None
    when its marker has no checksums (an older run). Without `names`: the share of `rank`
    of `world` (all for one rank)."""
    folder = str(folder).rstrip("/")
    try:
        files = read_json(join(folder, MARKER)).get("files")
    except ValueError:
        return [f"{join(folder, MARKER)}: damaged, not readable JSON"]
    if files is None:
        return None
    remote, local = not is_local(folder), local_copy(folder)
    # DeepSpeed's load reads the model states on every rank (ZeRO 1/2: besides its own
    # optimizer partition; zero_pp_rank_N files, in the rank's share), the EMA's load its piece.
    share = sorted(n for n in files if writer(n) % world == rank or (remote and n in (MODEL_STATES, EMA_WEIGHTS)))
    problems = []
    for name in names or share:
        want = files.get(name)
        if want is None:
            problems.append(f"{join(folder, name)}: not part of this checkpoint (its {MARKER} marker does not list it)")
        elif (problem := _check_file(join(folder, name), local, name, want, remote)) is not None:
            problems.append(problem)
    return problems


# Local files this process found matching their marker entries, with what a stat said of
# the file then: checking them again costs a stat, not a hash. Any write or replacement
# changes the inode, the modification or the change time, and the file is hashed again.
_verified: dict[Path, tuple] = {}


def _seen(path: Path, want: dict) -> tuple:
    s = path.stat()
    return s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns, want["sha256"]


_noted_unverified: set[str] = set()


Parse = TypeVar("Parse")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder (a local path or a URL, as a str) and its step. Every
    file is checked against the marker before it is handed out, as a local path (a remote
    one downloaded once into this node's local copy; a ValueError names the damaged
    file; each file is hashed once per process while it stays unchanged); a marker
    without checksums is noted once."""

    folder: str
    step: int

    @classmethod
    def at(cls, folder: str | Path) -> Checkpoint:
        folder = str(folder).rstrip("/")
        if is_local(folder):  # absolute, so that its run folder is known (`run_dir`)
            folder = url_to_fs(folder)[1]
        if not file_exists(join(folder, MARKER)):
            raise _not_complete(folder)
        try:
            step = read_json(join(folder, MARKER))["step"]
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"checkpoint file {join(folder, MARKER)}: damaged, not a JSON object with a step") from None
        return cls(folder, step)

    @classmethod
    def every(cls, run_dir: str | Path) -> list[Checkpoint]:
        """The run's complete checkpoints, oldest first."""
        return [cls(step_folder(run_dir, step), step) for step in complete_steps(run_dir)]

    @classmethod
    def latest(cls, run_dir: str | Path) -> Checkpoint | None:
        """The run's newest complete checkpoint, None before the first. Complete, not yet
        verified: its files are checked when they are read."""
        found = cls.every(run_dir)
        return found[-1] if found else None

    @property
    def name(self) -> str:
        return self.folder.rpartition("/")[2]

    @property
    def run_dir(self) -> str:
        """The run folder it belongs to (RUN_DIR/checkpoints/[universal/]step_N; a folder
        outside that layout: two levels up)."""
        run, found, _ = self.folder.rpartition("/checkpoints/")
        return run if found else self.folder.rpartition("/")[0].rpartition("/")[0]

    @property
    def complete(self) -> bool:
        """Still complete: pruning to `checkpoint.keep` removes old ones while others read them."""
        return file_exists(join(self.folder, MARKER))

    def checked(self, *names: str) -> Checkpoint:
        """This checkpoint once `names` (none: all its files) are found matching the marker."""
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
        """The local path of the file `name`, checked."""
        return local_copy(self.checked(name).folder) / name

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


def _not_complete(folder: str) -> ValueError:
    return ValueError(f"{folder} is not a complete training checkpoint (no {MARKER} marker)")


def write_config(folder: str | Path, cfg) -> None:
    """FOLDER/config.yaml: the config (any with `to_json()`) a run or checkpoint is trained with."""
    with atomic_writer(join(str(folder), CONFIG)) as fh:
        fh.write(dump_config(cfg).encode())


class CheckFailed(OSError):
    """A checkpoint's files could not be checked (a download, a read or a write of the
    local copy failed): nothing is known to be wrong with them, a later try may succeed."""


def newest_intact(run_dir: str | Path, decide: Callable) -> dict | None:
    """Every rank: the trainer.json (as written) of the newest complete checkpoint whose
    files all match its marker, None when there is none. Each rank checks (remote:
    downloads) its own share of a candidate's files, the verdicts are gathered, and the
    newest step every rank found intact is taken; rank 0 names what is damaged and sets
    it aside. A file found missing or not matching is damage; when any rank could not
    check its share at all, every rank raises CheckFailed (an OSError: a restart tries
    again) and nothing is set aside. `decide(fn, *args)` runs `fn` on rank 0 and gives every rank its result or
    its error (the training's rank0_decides)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    verdicts: dict[int, list[str] | None] = {}
    for step in decide(_resume_candidates, run_dir):
        folder = step_folder(run_dir, step)
        try:
            mine = ("checked", damage(folder, rank=rank, world=world))
        except Exception as exc:  # reported, not raised: the other ranks wait in the gather
            mine = ("unchecked", f"rank {rank}: {type(exc).__name__}: {exc}")
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        unchecked = [value for kind, value in gathered if kind == "unchecked"]
        if unchecked:  # the same on every rank
            raise CheckFailed(f"could not check checkpoint {folder} (nothing was set aside; "
                              f"a restart checks it again): {'; '.join(unchecked)}")
        every = [value for _, value in gathered]
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
    return complete_steps(run_dir)[::-1]


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
            f"{', '.join(tag(s) for s in damaged)} to {join(checkpoints_dir(run_dir), DAMAGED)}")
    # Rank 0 checked (and fetched) trainer.json: it is in its share.
    return json.loads((local_copy(step_folder(run_dir, chosen)) / TRAINER).read_text())


def _set_aside(run_dir: str | Path, step: int) -> None:
    """A damaged checkpoint to checkpoints/damaged/ (on object storage: copied, then removed)."""
    fs, _ = url_to_fs(checkpoints_dir(run_dir))
    src = url_to_fs(step_folder(run_dir, step))[1]
    target = url_to_fs(join(checkpoints_dir(run_dir), DAMAGED, tag(step)))[1]
    universal = url_to_fs(join(checkpoints_dir(run_dir), UNIVERSAL, tag(step)))[1]
    for gone in (target, universal):
        if fs.exists(gone):
            fs.rm(gone, recursive=True)
    fs.makedirs(target.rpartition("/")[0], exist_ok=True)
    fs.mv(src, target, recursive=True)
    if fs.exists(src):  # object stores leave the "folder" of a moved prefix behind on some
        fs.rm(src, recursive=True)


def to_universal(run_dir: str | Path, step: int) -> str:
    """Rank 0: DeepSpeed's universal form of a checkpoint (for loading on another number
    of ranks), converted once into checkpoints/universal/step_N, its files published
    (uploaded) as a checkpoint's are, with a marker of their own: its URL. The
    conversion reads every file of the checkpoint (downloaded, checked), from a staging
    folder holding those files only (hard links)."""
    dst_url = join(checkpoints_dir(run_dir), UNIVERSAL, tag(step))
    if file_exists(join(dst_url, MARKER)):
        return dst_url
    source = Checkpoint.at(step_folder(run_dir, step)).checked()
    src = local_copy(source.folder)
    work = local_copy(dst_url)
    tmp, staged = work.with_name(work.name + ".tmp"), work.with_name(work.name + ".input")
    for old in (tmp, staged):
        shutil.rmtree(old, ignore_errors=True)
    # DeepSpeed's conversion globs its input folder (the ZeRO degree is the number of
    # *_optim_states.pt there): it gets the checkpoint's own files only, not what a launch
    # on another number of ranks may have left in this node's local copy.
    names = read_json(join(source.folder, MARKER)).get("files") or own_files(src, None)
    for name in names:
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(src / name, staged / name)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(staged),
         "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"],
        capture_output=True, text=True,
    )
    shutil.rmtree(staged, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"universal conversion of {src} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    shutil.rmtree(work, ignore_errors=True)
    tmp.rename(work)
    files = publish(work, dst_url, own_files(work, None))
    write_json_atomic(join(dst_url, MARKER), {"step": step, "files": files})
    return dst_url
