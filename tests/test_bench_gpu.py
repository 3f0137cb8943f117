"""`make bench-gpu` cannot rot between GPU loans: its smoke mode runs every part end to end
on the CPU (tiny presets) exactly as the command does, and each part must come back with
figures, or with the reason a GPU-only row was skipped; the MFU peak table is checked on
its own."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0)])
def test_bf16_peak_by_device_name(name, tflops):
    assert _bench().bf16_peak(name)[0] == tflops


@pytest.mark.unit
@pytest.mark.parametrize("name, why", [("NVIDIA L4", "not in the peak table"), (None, "no CUDA GPU")])
def test_no_peak_no_mfu_with_the_reason(name, why):
    peak, reason = _bench().bf16_peak(name)
    assert peak is None and why in reason


def _rows(result: dict, part: str) -> dict[str, dict]:
    return {r["case"]: r for r in result["rows"] if r["part"] == part}


def _measured(row: dict) -> bool:
    return row["status"] == "ok" and isinstance(row.get("rate"), float) and row["rate"] > 0


def test_smoke_runs_every_part_with_figures(tmp_path):
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert {n: p["status"] for n, p in result["parts"].items()} == {n: "ok" for n in _bench().PARTS}, \
        [(n, p["reason"]) for n, p in result["parts"].items()]
    assert result["mode"].startswith("smoke") and result["machine"]["cpu_cores"] >= 1
    assert result["machine"]["torch"] and result["machine"]["gpu"] is None  # CUDA hidden in smoke

    pretok = _rows(result, "pretokenize")
    assert set(pretok) == {"(a) bare models", "(b) plain loop", "(c) Ray job, end to end", "(c) Ray job, steady state"}
    assert all(_measured(r) for r in pretok.values()), pretok
    assert pretok["(c) Ray job, end to end"]["ratio_of"] == "c/b" and pretok["(c) Ray job, end to end"]["cores_busy"] > 0

    train = _rows(result, "train")
    eager = [r for case, r in train.items() if "compile off" in case]
    assert len(eager) == 2 and all(_measured(r) for r in eager), train
    # MFU needs a GPU's peak: blank on the CPU, with the reason in the row.
    assert all(r["mfu_pct"] is None and "no MFU" in r["note"] for r in eager)
    assert all(r["status"] == "skipped" and r["note"] for case, r in train.items() if "compile on" in case)

    sample = _rows(result, "sample")
    sizes = _bench().SMOKE
    settings = len(sizes.sample_dtypes) * len(sizes.sample_batches)
    eager = {case: r for case, r in sample.items() if "compiled" not in case}
    assert len(eager) == 3 * settings and all(_measured(r) for r in eager.values()), eager
    # The sampler and diffusers did the same work (same tokens, in each dtype) before they were timed.
    ours = [r for case, r in eager.items() if case.endswith(", amused sample")]
    assert len(ours) == settings and all(r["tokens_equal"] == 1.0 and r["ratio"] > 0 for r in ours), ours
    assert all(r["status"] == "skipped" for case, r in sample.items() if "compiled" in case)

    gpu_tests = _rows(result, "gpu-tests")
    assert gpu_tests and all(r["status"] == "skipped" and "CUDA" in r["note"] for r in gpu_tests.values())

    table = (tmp_path / "bench_gpu.md").read_text()
    assert all(f"| {part} |" in table for part in ("machine", "pretokenize", "train", "sample", "gpu-tests"))
    print(f"bench-gpu --smoke: {seconds:.0f} s (" + ", ".join(f"{n} {p['seconds']:.0f} s"
                                                           for n, p in result["parts"].items()) + ")")
