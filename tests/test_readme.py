"""The README's tiny walk-through runs as shown: the blocks marked `<!-- readme-test: tiny -->`
run block by block, as written, with bash in a scratch folder that has the clone's configs/:
the cheap blocks in the default suite, every marked block (`tiny slow` too) in the slow one.
The line-by-line checks of every command are in test_readme_units.py."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_readme_units import README, ROOT, Block, code_blocks


def _walkthrough(tmp_path: Path, blocks: list[Block]) -> list[str]:
    """Run each block with bash in `tmp_path` (which has the clone's configs/), as a user would."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    timings = []
    for block in blocks:
        start = time.monotonic()
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (f"README.md:{block.line}: block failed ({done.returncode}):\n{block.text}\n"
                                      f"--- stderr ---\n{done.stderr[-3000:]}")
        timings.append(f"README.md:{block.line}: {time.monotonic() - start:.0f} s")
    return timings


def _tested_blocks(*, slow: bool) -> list[Block]:
    blocks = [b for b in code_blocks(README.read_text()) if "tiny" in b.marks and (slow or "slow" not in b.marks)]
    assert blocks, "no README block is marked <!-- readme-test: tiny -->"
    return blocks


def test_the_readme_cheap_tiny_blocks_run_as_shown(tmp_path):
    _walkthrough(tmp_path, _tested_blocks(slow=False))
    assert (tmp_path / "try" / "models" / "transformer" / "config.json").exists()
    assert list((tmp_path / "try" / "shards").glob("*.tar"))


@pytest.mark.slow
def test_the_readme_tiny_walkthrough_runs_as_shown(tmp_path):
    """Every marked block in order: models, shards, tokens, training, sampling, export, evaluation."""
    timings = _walkthrough(tmp_path, _tested_blocks(slow=True))
    print("\n".join(timings))
    assert list((tmp_path / "try" / "run" / "checkpoints").glob("step_*/COMPLETE"))
    assert (tmp_path / "try" / "samples" / "grid.png").exists() and len(list((tmp_path / "try" / "samples").glob("*.png"))) == 3
    assert (tmp_path / "try" / "pipeline" / "model_index.json").exists()
    assert list((tmp_path / "try" / "pipeline" / "transformer").glob("*.fp16.safetensors"))
    assert list((tmp_path / "try" / "eval").glob("step_*.json"))
