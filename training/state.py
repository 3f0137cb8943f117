"""What a resume needs beyond DeepSpeed's own files: the trainer state of a checkpoint
(its trainer.json), versioned, and which checkpoint a resume takes.

The RNG states (rng/rank_*.{json,safetensors}) and the EMA weights (ema.safetensors) are
files of the checkpoint folder (training/checkpoint.py), not part of this state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amused.training import checkpoint as ckpt
from amused.training.distributed import rank0_decides


@dataclass
class TrainState:
    """The trainer's state at a checkpoint. `task` is the task's own state (its data
    position, ...), stored beside these keys in the same JSON object."""

    step: int
    world_size: int  # the ranks that wrote the checkpoint: other ranks resume through DeepSpeed's universal form
    global_batch_size: int
    nonfinite_in_row: int  # non-finite steps just before the checkpoint; the count goes on after a resume
    task: dict = field(default_factory=dict)

    # Version 1: the keys above and the task's beside them; checkpoints written before
    # the version was recorded have the same layout without "version".
    VERSION = 1
    _KEYS = ("step", "world_size", "global_batch_size", "nonfinite_in_row")

    def to_dict(self) -> dict:
        clash = set(self.task) & {"version", *self._KEYS}
        if clash:
            raise ValueError(f"task state key(s) {sorted(clash)} would overwrite the trainer's own")
        return {"version": self.VERSION, **{key: getattr(self, key) for key in self._KEYS}, **self.task}

    @classmethod
    def from_dict(cls, data: dict, where: str = "trainer state") -> "TrainState":
        version = data.get("version", 1)
        if version != cls.VERSION:
            raise ValueError(f"{where}: format version {version!r} is not one this amused reads "
                             f"(it reads version {cls.VERSION}); resume it with the amused that wrote it")
        missing = [key for key in cls._KEYS if key not in data]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        task = {k: v for k, v in data.items() if k != "version" and k not in cls._KEYS}
        return cls(**{key: data[key] for key in cls._KEYS}, task=task)


def resume_state(run_dir: str) -> TrainState | None:
    """Every rank: the state of the newest checkpoint every rank found intact
    (training/checkpoint.py's `newest_intact`), None for a fresh run."""
    data = ckpt.newest_intact(run_dir, rank0_decides)
    if data is None:
        return None
    return TrainState.from_dict(data, f"the trainer state of the checkpoint to resume in {ckpt.checkpoints_dir(run_dir)}")
