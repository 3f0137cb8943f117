"""`make bench-gpu`: the project's GPU measurement in one command, sized for a short loan
of one H100/H200-class GPU (8 minutes or less), every part in a process of its own under
its own time limit, so that a slow or hung part is recorded as timed out and the others
still run. It prints one table and writes it, with the machine's description, as
`bench_gpu.json` (and `bench_gpu.md`) into `--out`; each part's log is in `logs/`.

    machine      GPU name, the bf16 dense peak used for MFU, CUDA, cuDNN, driver and library versions
    pretokenize  256 px, aMUSEd VQ-GAN + CLIP-L/14 text (random weights, bf16): (a) bare models on
                 crops in memory, (b) a plain one-process loop, (c) the Ray job with decode spread
                 over the CPU cores (end to end and steady state); images/s, c/b, the cores it kept busy
    train        amused-256 through the project's engine (`training.uvit.task.train`, DeepSpeed, bf16):
                 samples/s, MFU = samples/s x the project's FLOP count per sample (0.641 TFLOP for
                 amused-256; benchmarks/train.py) / the GPU's bf16 dense peak, peak memory; activation
                 checkpointing off/on, x `train.model.compile` off/on where the engine offers it
    sample       the `amused sample` path (training.inference.sample.Sampler) vs diffusers'
                 AmusedPipeline on the same modules, batch 1 and 8, bf16 and fp16, with int8
                 (`--quantize int8`), then torch.compile (bf16); tokens compared with diffusers'
                 first (same prompts, seed, dtype and generator), then latency (median, the whole
                 text-to-image path); random draws on the GPU, plus a row with the CPU generator
                 `amused sample` seeds today
    gpu-tests    the suite's tests marked `gpu` (bf16 tokens vs fp32, bf16 training, 8-bit AdamW)

Models are the presets' architectures (tokenizer/presets.py) with random weights built at
run time (throughput does not depend on the weights); nothing is downloaded.

    python benchmarks/bench_gpu.py                          # one GPU; what `make bench-gpu` runs
    python benchmarks/bench_gpu.py --smoke --out /tmp/s     # CPU, tiny sizes, < 2 minutes: the same code path
    python benchmarks/bench_gpu.py --parts train --limit train=300   # one part again, with more time

`--smoke` runs every part end to end on the CPU (CUDA hidden) with the tiny presets; what
exists only on a GPU (bf16 training, torch.compile, MFU) is recorded as skipped with its
reason, not faked. The suite runs it (tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Sizes:
    """What one mode measures. `vqgan_clip` names the VQ-GAN and CLIP text presets of the
    pre-tokenizer and the sampler; `uvit` the U-ViT preset of training and sampling."""

    vqgan_clip: str
    uvit: str
    resolution: int  # pre-tokenization crop, px
    images: int
    shards: int
    image_sizes: tuple[int, int]  # min, max side of the generated JPEGs
    pretok_batch: int
    bare_images: int  # images through (a)
    decode_cpus: float
    train_batch: int
    train_steps: int  # timed steps, after train_warmup (a multiple of it: one metrics line per warm-up)
    train_warmup: int
    train_rows: int
    train_workers: int
    sample_batches: tuple[int, ...]
    sample_steps: int
    sample_repeats: int
    sample_dtypes: tuple[str, ...]
    limits: dict  # part -> seconds


# On the GPU: 15 + 105 + 170 + 125 + 60 = 475 s of limits, under 8 minutes with start-up.
GPU = Sizes(vqgan_clip="amused", uvit="amused-256", resolution=256, images=4096, shards=16, image_sizes=(300, 640),
            pretok_batch=256, bare_images=2048, decode_cpus=0.5, train_batch=128, train_steps=20, train_warmup=10,
            train_rows=2048, train_workers=2, sample_batches=(1, 8), sample_steps=12, sample_repeats=3,
            sample_dtypes=("bf16", "fp16"),
            limits={"machine": 15, "pretokenize": 105, "train": 170, "sample": 125, "gpu-tests": 60})
# On 2 CPU cores: most of the time is start-up (imports, Ray, DeepSpeed); the limits are generous
# so that a loaded machine does not fail the suite's run.
SMOKE = Sizes(vqgan_clip="tiny", uvit="tiny", resolution=64, images=24, shards=3, image_sizes=(64, 128),
              pretok_batch=8, bare_images=16, decode_cpus=0.5, train_batch=8, train_steps=4, train_warmup=2,
              train_rows=256, train_workers=0, sample_batches=(2,), sample_steps=3, sample_repeats=1,
              sample_dtypes=("bf16", "fp16"),
              limits={"machine": 60, "pretokenize": 120, "train": 120, "sample": 120, "gpu-tests": 120})
PARTS = ("machine", "pretokenize", "train", "sample", "gpu-tests")

# bf16 dense tensor-core peaks (TFLOP/s; the data sheets' sparse figures halved), by a
# substring of torch.cuda.get_device_name(), first match wins (GH200 before H200, NVL and
# PCIe before the SXM boards, whose names carry neither: "NVIDIA H100 80GB HBM3").
BF16_PEAKS = (("GH200", "GH200", 989.4), ("H200 NVL", "H200 NVL", 835.5), ("H200", "H200 SXM", 989.4),
              ("H100 NVL", "H100 NVL", 835.5), ("H100 PCIe", "H100 PCIe", 756.5), ("H100", "H100 SXM", 989.4),
              ("A100", "A100 (SXM and PCIe)", 312.0))


def bf16_peak(device_name: str | None) -> tuple[float | None, str]:
    """The bf16 dense peak of a device, or None and why not."""
    if not device_name:
        return None, "no CUDA GPU: no bf16 peak, no MFU"
    for key, label, tflops in BF16_PEAKS:
        if key.lower() in device_name.lower():
            return tflops, f"{label}: {tflops} TFLOP/s bf16 dense"
    known = ", ".join(label for _, label, _ in BF16_PEAKS)
    return None, f"GPU {device_name!r} is not in the peak table ({known}): no MFU"


# ---------------------------------------------------------------- rows

COLUMNS = ("rate", "ratio", "latency", "MFU", "peak memory")


class Rows:
    """A part's results, one JSON line each as soon as it is known, so that rows finished
    before a time-out survive it. The first line plans the part's cases."""

    def __init__(self, path: Path):
        self.path, self.done = path, set()
        path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def plan(self, cases: list[str]) -> None:
        self._write({"plan": cases})

    def machine(self, info: dict) -> None:
        self._write({"machine": info})

    def add(self, case: str, status: str = "ok", note: str = "", **values) -> None:
        """`values`: rate, unit, ratio, ratio_of, latency_s, mfu_pct, peak_gib, and any
        other number worth keeping in the JSON."""
        self._write({"case": case, "status": status, "note": note, **values})
        self.done.add(case)
        print(f"[{case}] {status} {values} {note}", flush=True)

    def skip(self, cases: list[str], reason: str) -> None:
        for case in cases:
            self.add(case, "skipped", reason)

    @contextlib.contextmanager
    def guard(self, cases: list[str]):
        """A failure inside is recorded on those of `cases` not yet done, and the part goes on
        with its next group (a compile that breaks must not cost the rows after it)."""
        try:
            yield
        except Exception as exc:
            traceback.print_exc()
            for case in cases:
                if case not in self.done:
                    self.add(case, "failed", f"{type(exc).__name__}: {str(exc)[:300]}")


def read_rows(path: Path) -> tuple[list[str], list[dict], dict]:
    plan, rows, machine = [], [], {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "plan" in record:
                plan += record["plan"]
            elif "machine" in record:
                machine = record["machine"]
            else:
                rows.append(record)
    return plan, rows, machine


# ---------------------------------------------------------------- the parts (each in its own process)

@dataclass
class Part:
    sizes: Sizes
    rows: Rows
    work: Path

    @property
    def gpu(self) -> bool:
        import torch

        return torch.cuda.is_available()

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"


def _peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def machine_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda}
    for package in ("diffusers", "transformers", "deepspeed", "ray", "torchao", "bitsandbytes", "pyarrow"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info["gpu"] = name
    info["bf16_peak_tflops"], info["bf16_peak"] = bf16_peak(name)
    if name:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu_memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
                 "gpus": torch.cuda.device_count(), "cudnn": torch.backends.cudnn.version()}
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def part_machine(p: Part) -> None:
    p.rows.plan(["machine"])
    info = machine_info()
    p.rows.machine(info)
    where = info["gpu"] or f"CPU x{info['cpu_cores']}"
    p.rows.add("machine", note=f"{where}; {info['bf16_peak']}; torch {info['torch']}, CUDA {info['cuda']}")


def part_pretokenize(p: Part) -> None:
    from pretokenize import bare_models, plain_loop, ray_job, write_data, write_models

    s = p.sizes
    cases = ["(a) bare models", "(b) plain loop", "(c) Ray job, end to end", "(c) Ray job, steady state"]
    p.rows.plan(cases)
    models = write_models(p.work / "models", s.vqgan_clip)
    write_data(p.work / "wds", s.images, s.shards, s.image_sizes)
    setting = f"{s.vqgan_clip} VQ-GAN + CLIP text, {s.resolution} px, bf16 on {p.device}, batch {s.pretok_batch}"
    a = b = None  # each row in its own guard: (c) is worth having without (a) or (b)
    with p.rows.guard(cases[:1]):
        _reset_peak()
        a = bare_models(models, p.device, "bf16", s.pretok_batch, s.bare_images, s.resolution)
        p.rows.add(cases[0], rate=a, unit="images/s", peak_gib=_peak_gib(), note=setting)
    with p.rows.guard(cases[1:2]):
        _reset_peak()
        b, rows_b = plain_loop(models, p.work / "wds", p.work / "plain", p.device, "bf16", s.pretok_batch,
                               s.resolution)
        p.rows.add(cases[1], rate=b, unit="images/s", peak_gib=_peak_gib(), note=f"{rows_b} images, one process")
    with p.rows.guard(cases[2:]):
        c = ray_job(models, p.work / "wds", p.work / "ray", s.pretok_batch, s.decode_cpus, s.resolution, "bf16")
        cores = (f"cores busy {c['cores']:.1f} of {os.cpu_count()} (CPU s of every process / wall); decode tasks "
                 f"{s.decode_cpus} CPU each")
        p.rows.add(cases[2], rate=c["total"], unit="images/s", ratio=c["total"] / b if b else None, ratio_of="c/b",
                   cores_busy=c["cores"], cpu_cores=os.cpu_count(), note=f"{c['rows']} images; {cores}")
        if c["steady"]:
            p.rows.add(cases[3], rate=c["steady"], unit="images/s", ratio=c["steady"] / b if b else None,
                       ratio_of="c/b", note="shards after the first" + (f"; c/a = {c['steady'] / a:.2f}" if a else ""))
        else:
            p.rows.skip(cases[3:], f"fewer than 3 shards ({s.shards}): no steady state")


def _train_case(checkpointing: bool, compiled: bool) -> str:
    return f"engine, checkpointing {'on' if checkpointing else 'off'}, compile {'on' if compiled else 'off'}"


def part_train(p: Part) -> None:
    import torch
    from train import engine_run, preset_tokens, training_flops_per_sample

    from amused.training.config import ModelConfig

    s = p.sizes
    variants = [(ckpt, comp) for comp in (False, True) for ckpt in (False, True)]  # eager first: compile may time out
    p.rows.plan([_train_case(*v) for v in variants])
    dataset = str(p.work / "tokens")
    preset_tokens(dataset, s.uvit, [s.train_rows // 4] * 4)
    flops = training_flops_per_sample(s.uvit)
    name = torch.cuda.get_device_name() if p.gpu else None
    peak, peak_note = bf16_peak(name)
    precision = "bf16" if p.gpu else "fp32"
    has_compile = "compile" in {f.name for f in dataclasses.fields(ModelConfig)}
    base = None
    for ckpt, comp in variants:
        case = _train_case(ckpt, comp)
        if comp and not has_compile:
            p.rows.add(case, "skipped", "engine has no compile option (train.model.compile)")
            continue
        if comp and not p.gpu:
            p.rows.add(case, "skipped", "torch.compile is measured on a GPU only (minutes of Inductor on 2 CPU cores)")
            continue
        model = {"preset": s.uvit, "activation_checkpointing": ckpt} | ({"compile": comp} if has_compile else {})
        _reset_peak()
        with p.rows.guard([case]):
            try:
                rate = engine_run(p.work / "run", model, dataset, s.train_batch, s.train_steps, s.train_warmup,
                                  zero=2, workers=s.train_workers, precision=precision)
            finally:
                shutil.rmtree(p.work / "run", ignore_errors=True)  # amused-256's final checkpoint is ~10 GB
            base = base or rate
            mfu = 100 * rate * flops / (peak * 1e12) if peak else None
            note = (f"{s.uvit}, {precision}, batch {s.train_batch}, {s.train_steps} steps after {s.train_warmup}; "
                    f"{flops / 1e12:.3g} TFLOP/sample" + ("" if peak else f"; {peak_note}") +
                    ("" if p.gpu else "; bf16 training is a GPU setting: fp32 on CPU"))
            p.rows.add(case, rate=rate, unit="samples/s", ratio=rate / base, ratio_of="x first row", mfu_pct=mfu,
                       peak_gib=_peak_gib(), tflop_per_sample=flops / 1e12, note=note)


def part_sample(p: Part) -> None:
    import torch
    from pretokenize import write_models
    from sample import DIFFUSERS, PROMPTS, diffusers_pipeline, timed_runs, token_agreement

    from amused.tokenizer.image import ImageTokenizer
    from amused.tokenizer.text import TextEncoder
    from amused.training.config import SampleConfig
    from amused.training.inference.quantize import quantize_uvit
    from amused.training.inference.sample import Sampler
    from amused.training.uvit.model import build_model

    s = p.sizes
    ours, int8, compiled, int8_compiled = ("amused sample", "amused sample --quantize int8",
                                           "amused sample, compiled", "int8, compiled")
    # `amused sample` seeds a CPU generator, so on a GPU its draws (and diffusers' with the same
    # generator) go through the host; the rows draw on the device, plus one row per batch in the
    # first dtype as the CLI does.
    cli_generator = "amused sample, CPU generator (as the CLI seeds it)"

    def eager(dtype):
        return [ours, int8] + ([cli_generator] if p.gpu and dtype == s.sample_dtypes[0] else [])

    def case(dtype, batch, variant):
        return f"batch {batch}, {dtype}, {variant}"

    def cases(dtype, batch, variants):
        return [case(dtype, batch, v) for v in variants]

    # Compiled rows last, in the first dtype only, the biggest batch first: each first call
    # compiles (tens of seconds for aMUSEd-256), so they are the ones a time limit cuts.
    groups = [(dtype, batch) for dtype in s.sample_dtypes for batch in s.sample_batches]
    compile_dtype, compile_batches = s.sample_dtypes[0], sorted(s.sample_batches, reverse=True)
    compile_cases = [case(compile_dtype, batch, v) for batch in compile_batches for v in (compiled, int8_compiled)]
    p.rows.plan([c for g in groups for c in cases(*g, [DIFFUSERS, *eager(g[0])])] + compile_cases)
    models = write_models(p.work / "models", s.vqgan_clip)
    torch.manual_seed(0)
    transformer = build_model(s.uvit).eval()
    cfg = SampleConfig(steps=s.sample_steps)
    prompts_of = {b: (PROMPTS * b)[:b] for b in s.sample_batches}
    diffusers_s: dict[tuple[str, int], float] = {}

    def add(dtype, batch, variant, seconds, equal, why=""):
        theirs = diffusers_s.get((dtype, batch))
        vq = " (VQ-GAN in bf16: it overflows in fp16)" if dtype == "fp16" else ""
        note = (f"the reference, {s.sample_steps} steps{vq}" if equal is None else
                f"tokens equal to diffusers' {dtype}: {equal:.3f}{why}")
        p.rows.add(case(dtype, batch, variant), rate=batch / seconds, unit="images/s", latency_s=seconds,
                   ratio=theirs / seconds if theirs else None, ratio_of="x diffusers", tokens_equal=equal,
                   peak_gib=_peak_gib(), note=note)

    def modules(dtype):
        # The VQ-GAN refuses fp16 (it overflows to NaN): fp16 rows decode in bf16, diffusers' too (same module).
        image = ImageTokenizer.from_pretrained(models / "vqgan", device=p.device,
                                               dtype="bf16" if dtype == "fp16" else dtype)
        text = TextEncoder.from_pretrained(models, device=p.device, dtype=dtype)
        return image, text, copy.deepcopy(transformer).to(p.device, dtype=text.dtype)

    int8_note = "; int8 weights" + ("" if p.gpu else ", dynamic int8 activations, eager (the CLI compiles it on CPU)")
    for dtype in s.sample_dtypes:
        with p.rows.guard([c for batch in s.sample_batches for c in cases(dtype, batch, [DIFFUSERS, *eager(dtype)])]):
            image, text, model = modules(dtype)
            samplers = {ours: Sampler(model, image, text),
                        int8: Sampler(quantize_uvit(copy.deepcopy(model), "int8", p.device, compile=False), image,
                                      text)}
            pipe = diffusers_pipeline(samplers[ours])
            for batch in s.sample_batches:
                prompts = prompts_of[batch]
                _reset_peak()
                equal = token_agreement(pipe, samplers, prompts, cfg, generator=p.device)
                seconds = timed_runs(pipe, samplers, prompts, cfg, s.sample_repeats, generator=p.device)
                diffusers_s[(dtype, batch)] = seconds[DIFFUSERS]
                add(dtype, batch, DIFFUSERS, seconds[DIFFUSERS], None)
                add(dtype, batch, ours, seconds[ours], equal[ours],
                    "" if equal[ours] == 1 else ": NOT the same work, the ratio compares different computations")
                add(dtype, batch, int8, seconds[int8], equal[int8], int8_note)
                if cli_generator in eager(dtype):
                    host = {cli_generator: samplers[ours]}
                    add(dtype, batch, cli_generator,
                        timed_runs(None, host, prompts, cfg, s.sample_repeats)[cli_generator],
                        token_agreement(pipe, host, prompts, cfg)[cli_generator], "; both with CPU generators")
            del samplers, pipe, model
    if not p.gpu:
        p.rows.skip(compile_cases, "torch.compile is measured on a GPU only (minutes of Inductor on 2 CPU cores)")
        return
    image, text, model = modules(compile_dtype)
    pipe = diffusers_pipeline(Sampler(model, image, text))
    makers = {compiled: lambda: torch.compile(copy.deepcopy(model), options={"freezing": True}),
              int8_compiled: lambda: quantize_uvit(copy.deepcopy(model), "int8", p.device, compile=True)}
    for batch in compile_batches:
        for name, make in makers.items():
            with p.rows.guard([case(compile_dtype, batch, name)]):
                sampler = {name: Sampler(make(), image, text)}
                _reset_peak()
                equal = token_agreement(pipe, sampler, prompts_of[batch], cfg, generator=p.device)[name]
                seconds = timed_runs(None, sampler, prompts_of[batch], cfg, s.sample_repeats, generator=p.device)
                add(compile_dtype, batch, name, seconds[name], equal, "; its first call compiles (untimed)")


def part_gpu_tests(p: Part) -> None:
    """The suite's `gpu` tests, one row each (skipped on a machine without CUDA, as in the suite)."""
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in f.read_text())
    report = p.work / "junit.xml"
    # A test that hangs fails alone (pytest-timeout) and the report still comes back.
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs", "--timeout=40",
                    f"--junitxml={report}", *files], cwd=ROOT, check=False)
    cases = ET.parse(report).getroot().iter("testcase")
    rows = []
    for tc in cases:
        outcome = next((child for child in tc if child.tag in ("failure", "error", "skipped")), None)
        status = {None: "ok", "failure": "failed", "error": "failed", "skipped": "skipped"}[
            outcome.tag if outcome is not None else None]
        why = (outcome.get("message") or "")[:200] if outcome is not None else "passed"
        rows.append((f"{tc.get('classname').split('.')[-1]}::{tc.get('name')}", status,
                     f"{why} ({float(tc.get('time', 0)):.1f} s)"))
    p.rows.plan([r[0] for r in rows])
    for name, status, note in rows:
        p.rows.add(name, status, note)
    if not rows:
        raise RuntimeError(f"no test marked gpu was collected from {files}")


PART_FUNCTIONS = {"machine": part_machine, "pretokenize": part_pretokenize, "train": part_train,
                  "sample": part_sample, "gpu-tests": part_gpu_tests}


def run_part_here(name: str, out: Path, smoke: bool) -> None:
    sys.path.insert(0, str(HERE))  # the sibling benchmark scripts, whose functions the parts call
    part = Part(SMOKE if smoke else GPU, Rows(out / "parts" / f"{name}.jsonl"), out / "work" / name)
    part.work.mkdir(parents=True, exist_ok=True)
    PART_FUNCTIONS[name](part)


# ---------------------------------------------------------------- the driver

def _kill_tree(proc: subprocess.Popen) -> None:
    """The part and every process it started (Ray's daemons and workers, pytest)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return lines[-1][:300] if lines else "no output"


def run_part(name: str, limit: float, out: Path, smoke: bool) -> dict:
    """Runs one part in a process of its own (a session of its own, so that a time-out ends
    all it started); rows it planned and did not finish are recorded with the reason."""
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a machine with a GPU
    start = time.monotonic()
    print(f"--- {name} (limit {limit:.0f} s, log {log})", flush=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, __file__, "--part", name, "--out", str(out)] + (["--smoke"] * smoke),
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            code = None
    seconds = time.monotonic() - start
    shutil.rmtree(out / "work" / name, ignore_errors=True)
    plan, rows, machine = read_rows(out / "parts" / f"{name}.jsonl")
    status = "ok" if code == 0 else "timed out" if code is None else "failed"
    reason = (f"timed out after {limit:.0f} s" if code is None else
              f"part failed (exit {code}): {_last_line(log)}" if code else "")
    done = {r["case"] for r in rows}
    rows += [{"case": c, "status": "timed out" if code is None else "failed", "note": reason}
             for c in plan if c not in done]
    if code and not rows:
        rows = [{"case": "(the whole part)", "status": status, "note": reason}]
    print(f"--- {name}: {status} in {seconds:.0f} s", flush=True)
    return {"status": status, "seconds": round(seconds, 1), "limit_s": limit, "reason": reason,
            "log": str(log.relative_to(out)), "rows": [{"part": name, **r} for r in rows], "machine": machine}


def _cell(row: dict, column: str) -> str:
    def num(key, fmt):
        return format(row[key], fmt) if isinstance(row.get(key), (int, float)) else ""

    if column == "rate":
        return f"{num('rate', '.1f')} {row.get('unit', '')}".strip()
    if column == "ratio":
        return f"{num('ratio', '.2f')} {row.get('ratio_of', '')}".strip() if row.get("ratio") is not None else ""
    if column == "latency":
        return f"{num('latency_s', '.3f')} s" if row.get("latency_s") is not None else ""
    if column == "MFU":
        return f"{num('mfu_pct', '.1f')}%" if row.get("mfu_pct") is not None else ""
    return f"{num('peak_gib', '.1f')} GiB" if row.get("peak_gib") is not None else ""


def render(result: dict) -> str:
    m = result["machine"]
    head = [f"bench-gpu ({result['mode']}), {result['date']}, {result['total_s']:.0f} s: "
            f"{m.get('gpu') or 'no GPU'}, {m.get('cpu_cores')} CPU cores; {m.get('bf16_peak')}",
            "versions: " + ", ".join(f"{k} {m[k]}" for k in ("torch", "cuda", "cudnn", "driver", "diffusers",
                                                              "transformers", "deepspeed", "ray", "torchao")
                                     if m.get(k) is not None),
            "parts: " + ", ".join(f"{n} {p['status']} ({p['seconds']:.0f} of {p['limit_s']:.0f} s)"
                                  for n, p in result["parts"].items()), ""]
    lines = ["| part | case | " + " | ".join(COLUMNS) + " | status, notes |",
             "| --- | --- |" + " ---: |" * len(COLUMNS) + " --- |"]
    for row in result["rows"]:
        status = "" if row["status"] == "ok" else f"**{row['status']}**: "
        lines.append(f"| {row['part']} | {row['case']} | " + " | ".join(_cell(row, c) for c in COLUMNS) +
                     f" | {status}{row.get('note', '')} |")
    return "\n".join(head + lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same code path in < 2 minutes")
    parser.add_argument("--out", default="bench-gpu-out", help="folder for bench_gpu.json/.md and the parts' logs")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run these parts only")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="another time limit for a part (repeatable)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.part:
        run_part_here(args.part, out, args.smoke)
        return
    sizes = SMOKE if args.smoke else GPU
    limits = dict(sizes.limits)
    for item in args.limit:
        part, _, seconds = item.partition("=")
        if part not in PARTS or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--limit {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        limits[part] = float(seconds)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench-gpu: no CUDA GPU here (torch " + torch.__version__ + "); --smoke runs the same "
                             "code on the CPU with tiny sizes")
    for folder in ("parts", "logs", "work"):
        shutil.rmtree(out / folder, ignore_errors=True)
    start = time.monotonic()
    parts = {name: run_part(name, limits[name], out, args.smoke) for name in PARTS if name in args.parts}
    result = {"mode": "smoke (CPU, tiny sizes: not a performance figure)" if args.smoke else "GPU",
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "total_s": time.monotonic() - start,
              "machine": next((p["machine"] for p in parts.values() if p["machine"]), {}),
              "parts": {n: {k: v for k, v in p.items() if k not in ("rows", "machine")} for n, p in parts.items()},
              "rows": [row for p in parts.values() for row in p["rows"]]}
    table = render(result)
    _atomic_write(out / "bench_gpu.json", json.dumps(result, indent=1) + "\n")
    _atomic_write(out / "bench_gpu.md", table)
    shutil.rmtree(out / "work", ignore_errors=True)
    print("\n" + table + f"\nwritten: {out / 'bench_gpu.json'}, {out / 'bench_gpu.md'}")


if __name__ == "__main__":
    main()
