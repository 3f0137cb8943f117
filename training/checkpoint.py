"""Checkpoints of a run: DeepSpeed's own files plus what DeepSpeed does not keep.

    RUN_DIR/checkpoints/step_00001000/
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed (model, optimizer, scheduler)
        ema.safetensors                                EMA weights (rank 0)
        trainer.json                                   step, data position, world size, counters
        rng/rank_00000.json, rank_00000.safetensors    every rank's RNG states
        config.yaml                                    the config it was trained with
        COMPLETE                                       written last, after every rank finished
    RUN_DIR/checkpoints/latest.json                    the newest complete step (a convenience)

A checkpoint counts only when COMPLETE exists: rank 0 writes it after a barrier that
every rank reaches once its own files are written, so a kill at any moment leaves the
previous checkpoint usable (DeepSpeed's own `latest` file is not written: rank 0 writes
it without waiting for the others). DeepSpeed's files are pickles; they are loaded only
from the run's own folder. Weights that come from outside a run are safetensors.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.fsio import write_json_atomic

MARKER = "COMPLETE"
UNIVERSAL = "universal"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_steps(run_dir: str | Path) -> list[int]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / MARKER).exists())


def remove_incomplete(run_dir: str | Path) -> list[str]:
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


def mark_complete(run_dir: str | Path, step: int, keep: int) -> None:
    """Rank 0, after the barrier: the marker, `latest.json`, then pruning to `keep`."""
    folder = checkpoints_dir(run_dir) / tag(step)
    write_json_atomic(str(folder / MARKER), {"step": step})
    write_json_atomic(str(checkpoints_dir(run_dir) / "latest.json"), {"step": step, "tag": tag(step)})
    for old in complete_steps(run_dir)[:-keep]:
        shutil.rmtree(checkpoints_dir(run_dir) / tag(old))
        shutil.rmtree(checkpoints_dir(run_dir) / UNIVERSAL / tag(old), ignore_errors=True)


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


def module_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint folder (DeepSpeed's model-states file, read with
    `weights_only=True`: plain tensors and containers, nothing executed)."""
    state = torch.load(Path(folder) / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")
    return state["module"]
