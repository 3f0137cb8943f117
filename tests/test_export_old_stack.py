"""An exported folder opens on older diffusers/transformers stacks a user may still run, with
the same pixels as this project's pinned stack (diffusers 0.42.1, transformers 5.23.0).

Stacks, each installed by the test into a throwaway virtualenv (cached under the temp folder,
keyed by its pins, so a rerun takes seconds):
- the oldest pair with `AmusedPipeline`: diffusers 0.25.0 (December 2023, the release that
  added aMUSEd) with transformers 4.36.2, the release of that week (and of its time:
  tokenizers 0.15.0, huggingface_hub 0.20.1, numpy 1.26, safetensors 0.4.1, Pillow 10.1).
  It imports and runs with the pinned torch 2.13.0 (only pytree deprecation warnings), so no
  newer pair had to be taken. transformers 4.x is where the slow `CLIPTokenizer` that
  model_index.json names still exists (transformers 5 has one tokenizers-backed class), and
  tokenizers 0.15 reads only "a b" merge strings in tokenizer.json.
- diffusers 0.35.2 with transformers 4.57.6: the pair the issue found failing in
  `CLIPTokenizer.__init__` when tokenizer/ held only tokenizer.json.
torch is the project's pin (2.13.0) in both, so the generated images can be compared bit for
bit: the same weights, prompts, generator and torch kernels give pixel-equal images, which
is what the test asserts (no tolerance).

Skipped, saying so, when the package index cannot be reached (pip download fails).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AmusedPipeline
from transformers import CLIPTokenizer

from amused.training.inference.export import export_pipeline

pytestmark = pytest.mark.slow

TORCH = torch.__version__.split("+")[0]
STACKS = {
    "oldest": ("diffusers==0.25.0", "transformers==4.36.2", "tokenizers==0.15.0", "huggingface_hub==0.20.1",
               "numpy==1.26.4", "safetensors==0.4.1", "Pillow==10.1.0", f"torch=={TORCH}"),
    "issue": ("diffusers==0.35.2", "transformers==4.57.6", "numpy==1.26.4", f"torch=={TORCH}"),
}
PROMPTS = ["a red circle on a grey background", "a blue square"]
CAPTIONS = [*PROMPTS, "A  BLUE square, on yellow!!", "naïve café über 3.14 #tags", "", "two words " * 40]
SETTINGS = {"prompts": PROMPTS, "captions": CAPTIONS, "seed": 3, "steps": 6, "guidance_scale": 8.0, "variant": "fp16"}
JOB = Path(__file__).with_name("old_stack_job.py")
INSTALLED = "INSTALLED"  # written last into a venv: a cut install is rebuilt


def _pip(python: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def stack_venv(pins: tuple[str, ...]) -> Path:
    """A virtualenv with exactly `pins` installed, reused while its INSTALLED marker exists."""
    key = hashlib.sha256(json.dumps([sys.version_info[:2], *pins]).encode()).hexdigest()[:16]
    venv = Path(tempfile.gettempdir()) / f"amused-stack-{key}"
    python = venv / "bin" / "python"
    if (venv / INSTALLED).is_file():
        return python
    probe = Path(tempfile.mkdtemp(prefix="amused-stack-probe-"))
    try:
        reach = _pip(Path(sys.executable), "download", "--no-deps", "--dest", str(probe), pins[0], timeout=300)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if reach.returncode:
        pytest.skip(f"the package index is unreachable (pip download {pins[0]} failed: "
                    f"{(reach.stderr.strip().splitlines() or ['no output'])[-1]})")
    building = venv.with_name(f"{venv.name}.tmp-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
    install = _pip(building / "bin" / "python", "install", "--quiet", *pins, timeout=1800)
    assert install.returncode == 0, f"pip install {' '.join(pins)} failed:\n{install.stdout[-3000:]}{install.stderr[-3000:]}"
    (building / INSTALLED).write_text("\n".join(pins))
    shutil.rmtree(venv, ignore_errors=True)
    building.rename(venv)  # the venv's scripts name their folder, but `python -m` never reads those
    return python


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_models, trained_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("oldstack") / "pipe"
    return Path(export_pipeline(trained_checkpoint, str(out), str(tiny_models / "vqgan"), str(tiny_models),
                                variant="fp16"))


@pytest.fixture(scope="module")
def current(exported) -> dict:
    """What this project's stack gives for SETTINGS."""
    pipe = AmusedPipeline.from_pretrained(exported)
    images = pipe(PROMPTS, num_inference_steps=SETTINGS["steps"], guidance_scale=SETTINGS["guidance_scale"],
                  generator=torch.Generator().manual_seed(SETTINGS["seed"]), output_type="np").images
    tokenizer = CLIPTokenizer.from_pretrained(exported / "tokenizer")
    return {"images": np.round(np.asarray(images) * 255).astype(np.uint8),
            "ids": np.array(tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=77).input_ids)}


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_export_opens_on_an_older_stack_with_pixel_equal_images(stack, exported, current, tmp_path):
    python = stack_venv(STACKS[stack])
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({**SETTINGS, "folder": str(exported)}))
    out = tmp_path / "out.npz"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    ran = subprocess.run([str(python), str(JOB), str(settings), str(out)], capture_output=True, text=True,
                         timeout=900, env=env, cwd=tmp_path)
    assert ran.returncode == 0, f"{stack} stack could not open the export:\n{ran.stderr[-4000:]}"
    got = np.load(out)
    versions = json.loads(str(got["versions"]))
    assert [f"{k}=={versions[k].split('+')[0]}" for k in ("diffusers", "transformers")] == list(STACKS[stack][:2])
    assert np.array_equal(got["slow_ids"], current["ids"]) and np.array_equal(got["fast_ids"], current["ids"])
    assert got["images"].shape == current["images"].shape == (2, 64, 64, 3)
    assert np.array_equal(got["images"], current["images"])
    assert str(got["variant_dtype"]) == "torch.float16"
