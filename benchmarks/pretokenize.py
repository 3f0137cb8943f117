"""Pre-tokenization throughput at aMUSEd size: bare models vs a plain loop vs the Ray job.

    (a) bare models: VQ-GAN encode + CLIP on pre-decoded uint8 crops already in memory
    (b) plain loop:  read tar -> decode -> crop -> encode -> embed -> write, one process
    (c) Ray job:     `pipeline.pretokenize.pretokenize` on the same shards

Models are the released aMUSEd VQ-GAN config and CLIP-L/14's text config with random
weights (throughput does not depend on the weights). Images are noisy shape JPEGs of
300-640 px, whose decode cost is like photographs'. (c) is reported end to end and in
steady state (rows of the shards finished after the first one, over the time between
the first and the last), since actor start-up is a one-off cost at scale.

    python benchmarks/pretokenize.py                       # CPU: small counts
    python benchmarks/pretokenize.py --images 16384 --batch-size 256 --shards 32   # GPU

--model-free times the data plane alone: the Ray job whose encoder actors run no model and
return aMUSEd-256-shaped outputs (16 x 16 uint16 tokens taken from the pixels, 77 x 768 fp16
hidden states and 768 pooled drawn from a fixed random bank), so what is timed is tar read,
JPEG decode + crop, transfer and Parquet write. It runs the job twice, on the first third of
the shards and on all of them, and reports marginal costs between the two (fixed start-up
cancels): the driver's CPU seconds per 1,000 samples, the bytes the driver received per
sample (as the job counts them, where it does), and the ceiling in samples/s per CPU core
(samples over the CPU seconds of every process of the job: driver, Ray, workers, each
sampled every 0.5 s).

    python benchmarks/pretokenize.py --model-free --images 3000 --shards 12 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import ray
import torch

from amused.demo.datasets import write_shape_shards
from amused.demo.tiny_models import clip_bpe_tokenizer
from amused.pipeline import shards as fmt
from amused.pipeline.images import decode_views
from amused.pipeline.pretokenize import (
    ChunkEncoder,
    PretokenizeConfig,
    _pretokenize,
    list_input_shards,
    pretokenize,
)
from amused.pipeline.wds import BadSample, caption_of, iter_samples
from amused.tokenizer.image import ImageTokenizer, build_vqgan
from amused.tokenizer.text import TextEmbeddings, TextEncoder, build_clip_text

RES = 256


def write_models(root: Path, preset: str = "amused") -> Path:
    """Random VQ-GAN and CLIP text tower of a preset (tokenizer/presets.py) with CLIP's BPE
    tokenizer, in the layout the loaders read: the aMUSEd ones unless `preset` says otherwise."""
    torch.manual_seed(0)
    build_vqgan(preset).save_pretrained(root / "vqgan")
    build_clip_text(preset).save_pretrained(root / "text_encoder")
    clip_bpe_tokenizer(root / "tokenizer")
    return root


def _write_shards(args):
    out, first, count, per_shard, sizes = args
    write_shape_shards(out, shards=count, per_shard=per_shard, min_size=sizes[0], max_size=sizes[1], seed=11,
                       texture=12.0, first_shard=first)


def write_data(out: Path, images: int, shards: int, sizes: tuple[int, int] = (300, 640)) -> None:
    """`images` noisy shape JPEGs of `sizes` (min, max) px in `shards` tars, one process per shard."""
    per_shard = images // shards
    jobs = [(str(out), i, 1, per_shard, sizes) for i in range(shards)]
    with mp.Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        pool.map(_write_shards, jobs)


def bare_models(models: Path, device: str, dtype: str, batch: int, n: int, res: int = RES) -> float:
    image = ImageTokenizer.from_pretrained(models / "vqgan", device=device, dtype=dtype)
    text = TextEncoder.from_pretrained(models, device=device, dtype=dtype)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, res, res, 3), dtype=np.uint8)
    captions = [f"a red circle on a blue background number {i}" for i in range(batch)]

    def step():
        image.encode(pixels)
        text.encode(captions).hidden_states.float().cpu()

    step()  # warm-up (cudnn autotune, allocator)
    steps = max(1, n // batch)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def plain_loop(models: Path, src: Path, out: Path, device: str, dtype: str, batch: int,
               res: int = RES) -> tuple[float, int]:
    """What a user writes first: one process, decode then encode, shard after shard."""
    image = ImageTokenizer.from_pretrained(models / "vqgan", device=device, dtype=dtype)
    text = TextEncoder.from_pretrained(models, device=device, dtype=dtype)
    none = fmt.ModelIdentity("", "")
    spec = fmt.DatasetSpec(res, image.grid(res), image.codebook_size, text.seq_len, text.hidden_size,
                           text.pooled_dim, none, none)
    rows = 0
    start = time.perf_counter()
    for source in list_input_shards(str(src)):
        columns: dict[str, list] = {k: [] for k in ("key", "caption", "image_tokens", "text_hidden_states",
                                                     "text_pooled", *fmt.SIZE_COLUMNS)}
        crops, captions = [], []

        def flush():
            if crops:
                columns["image_tokens"].append(image.encode(np.stack(crops)))
                emb = text.encode(captions)
                columns["text_hidden_states"].append(emb.hidden_states.float().cpu().numpy().astype(np.float16))
                columns["text_pooled"].append(emb.pooled.float().cpu().numpy().astype(np.float16))
                columns["caption"] += captions
                crops.clear()
                captions.clear()

        with open(source, "rb") as fh:
            for sample in iter_samples(fh, source):
                try:
                    caption = caption_of(sample)
                    orig, offsets, crop = decode_views(sample.image[1], res, "center", 1, 0, sample.key, 32, 10**8)
                except BadSample:
                    continue
                captions.append(caption)
                crops.append(crop[0])
                columns["key"].append(sample.key)
                for name, value in zip(fmt.SIZE_COLUMNS, (*orig, *offsets[0])):
                    columns[name].append(value)
                if len(crops) == batch:
                    flush()
        flush()
        n = len(columns["key"])
        for name in ("image_tokens", "text_hidden_states", "text_pooled"):
            columns[name] = np.concatenate(columns[name])
        columns.update(content_id=columns["key"], view=[0] * n, aesthetic_score=[None] * n)
        fmt.write_shard(str(out), source, fmt.build_table(spec, columns))
        rows += n
    return rows / (time.perf_counter() - start), rows


def ray_job(models: Path, src: Path, out: Path, batch: int, decode_cpus: float, res: int = RES,
            dtype: str = "auto") -> dict:
    """(c): images/s end to end (`total`) and in steady state (`steady`; 0 with fewer than 3
    shards), `rows`, and `cores`: the CPU seconds of every process of the job over its wall time."""
    cpu0 = time.process_time()
    with _RayCpu() as workers:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        cfg = PretokenizeConfig(input=str(src), output=str(out), vqgan=str(models / "vqgan"), text_encoder=str(models),
                                resolution=res, batch_size=batch, decode_cpus=decode_cpus, dtype=dtype, progress=True)
        start = time.perf_counter()
        report = pretokenize(cfg)
        total = time.perf_counter() - start
        cpu = time.process_time() - cpu0
    ray.shutdown()
    assert report.ok, report.summary()
    markers = sorted((p.stat().st_mtime, json.loads(p.read_text())["record"]["rows"])
                     for p in (out / fmt.STATS_DIR).glob("*.json"))
    steady = sum(r for _, r in markers[1:]) / max(markers[-1][0] - markers[0][0], 1e-9) if len(markers) > 2 else 0.0
    return {"total": report.rows_written / total, "steady": steady, "rows": report.rows_written,
            "cores": (cpu + workers.seconds) / total}


class _NoImageModel:
    def __init__(self, resolution: int):
        self.stride = resolution // 16

    def encode_with_mask(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens = pixels[:, :: self.stride, :: self.stride, 0].astype(np.uint16) * 32
        return tokens, np.ones(len(pixels), bool)


class _NoTextModel:
    def __init__(self):
        # Random, not zeros: zstd would squeeze zeros to nothing and flatter the write.
        self.bank = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 77, 768)).astype(np.float16))

    def encode(self, captions: list[str]) -> TextEmbeddings:
        rows = [zlib.crc32(c.encode()) % len(self.bank) for c in captions]
        hidden = self.bank[rows]
        return TextEmbeddings(hidden_states=hidden, pooled=hidden[:, 0, :])


class ModelFreeEncoder(ChunkEncoder):
    """The job's encoder with aMUSEd-256-shaped outputs and no model behind them."""

    def __init__(self, vqgan: str, text_encoder: str, resolution: int, device: str, dtype: str,
                 threads: int | None, text: str = "states", deterministic: bool = False):
        if text != "states":
            raise ValueError("the model-free encoder has stored states only (text: states)")
        self.resolution = resolution
        self.image = _NoImageModel(resolution)
        self.text = _NoTextModel()


class _RayCpu:
    """CPU seconds of this process's descendants (Ray's daemons and workers, started by this
    run's ray.init): each process's last reading, sampled every `every` seconds so that
    workers that exit before the end still count (all but their last `every` seconds)."""

    def __init__(self, every: float = 0.5):
        self.every, self.seen, self.stop = every, {}, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _read(self) -> None:
        for proc in psutil.Process().children(recursive=True):
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            self.seen[proc.pid] = t.user + t.system

    def _watch(self) -> None:
        while not self.stop.wait(self.every):
            self._read()

    def __enter__(self) -> "_RayCpu":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._read()

    @property
    def seconds(self) -> float:
        return sum(self.seen.values())


def model_free_run(models: Path, src: Path, out: Path, batch: int, decode_cpus: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    driver0 = time.process_time()
    with _RayCpu() as workers:
        # "local": a Ray of its own, never one another process on this machine started.
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        cfg = PretokenizeConfig(input=str(src), output=str(out), vqgan=str(models / "vqgan"),
                                text_encoder=str(models), resolution=RES, batch_size=batch, decode_cpus=decode_cpus,
                                progress=False)
        start = time.perf_counter()
        report = _pretokenize(cfg, ModelFreeEncoder)
        wall = time.perf_counter() - start
        driver = time.process_time() - driver0
    ray.shutdown()
    assert report.ok, report.summary()
    table = fmt.TokenDataset(str(out))
    encoded = sum(table.read_shard(s.name).nbytes for s in table.shards)
    return {"rows": report.rows_written, "wall": wall, "driver_cpu": driver, "all_cpu": driver + workers.seconds,
            "driver_bytes": getattr(report, "driver_bytes", None), "encoded_bytes": encoded}


def model_free(models: Path, work: Path, shards: int, batch: int, decode_cpus: float) -> None:
    tars = sorted((work / "wds").glob("*.tar"))
    subsets = {"warmup": tars[:1], "small": tars[: max(1, shards // 3)]}
    for name, subset in subsets.items():
        (work / name).mkdir(exist_ok=True)
        for tar in subset:
            (work / name / tar.name).unlink(missing_ok=True)
            (work / name / tar.name).symlink_to(tar)
    # The first job in a process pays one-off costs (imports, Ray Data's first plan) that would
    # not cancel in the difference: a one-shard job first, not counted.
    runs = [model_free_run(models, src, work / f"tokens-{src.name}", batch, decode_cpus)
            for src in (work / "warmup", work / "small", work / "wds")][1:]
    for r in runs:
        per = f"{r['driver_bytes'] / r['rows']:.0f} B" if r["driver_bytes"] is not None else "not counted"
        print(f"{r['rows']:6d} samples: {r['wall']:6.1f}s wall ({r['rows'] / r['wall']:.1f} samples/s), driver CPU "
              f"{r['driver_cpu']:.2f}s, all processes' CPU {r['all_cpu']:.1f}s; driver received {per}/sample; "
              f"encoded rows {r['encoded_bytes'] / r['rows'] / 1e3:.1f} KB/sample (Arrow)", flush=True)
    (s, big) = runs
    d_rows = big["rows"] - s["rows"]
    print(f"marginal ({s['rows']} -> {big['rows']} samples): driver CPU "
          f"{(big['driver_cpu'] - s['driver_cpu']) / d_rows * 1e3:.2f} s per 1,000 samples; data-plane ceiling "
          f"{d_rows / (big['all_cpu'] - s['all_cpu']):.1f} samples/s per CPU core; "
          f"wall {d_rows / (big['wall'] - s['wall']):.1f} samples/s on {os.cpu_count()} cores")


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4096 if gpu else 24)
    p.add_argument("--shards", type=int, default=16 if gpu else 3)
    p.add_argument("--batch-size", type=int, default=256 if gpu else 8)
    p.add_argument("--decode-cpus", type=float, default=0.5)
    p.add_argument("--workdir", default=None)
    p.add_argument("--model-free", action="store_true", help="time the data plane alone (see above)")
    args = p.parse_args()
    device, dtype = ("cuda", "bf16") if gpu else ("cpu", "fp32")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pretok-"))
    models = write_models(work / "models")
    t = time.perf_counter()
    write_data(work / "wds", args.images, args.shards)
    print(f"data: {args.images} images in {args.shards} shards written in {time.perf_counter() - t:.1f}s", flush=True)
    if args.model_free:
        model_free(models, work, args.shards, args.batch_size, args.decode_cpus)
        return

    a = bare_models(models, device, dtype, args.batch_size, n=max(args.batch_size * 4, args.images // 4))
    print(f"(a) bare models      {a:9.1f} images/s", flush=True)
    b, rows_b = plain_loop(models, work / "wds", work / "plain", device, dtype, args.batch_size)
    print(f"(b) plain loop       {b:9.1f} images/s ({rows_b} rows)", flush=True)
    c = ray_job(models, work / "wds", work / "ray", args.batch_size, args.decode_cpus)
    c_total, c_steady = c["total"], c["steady"]
    print(f"(c) Ray job          {c_total:9.1f} images/s end to end, {c_steady:.1f} steady ({c['rows']} rows, "
          f"{c['cores']:.1f} of {os.cpu_count()} cores busy)")
    name = torch.cuda.get_device_name() if gpu else f"CPU x{os.cpu_count()}"
    print(f"\ndevice {name}, {device} {dtype}, batch {args.batch_size}, {args.images} images, {RES}px")
    print(f"c/a = {c_steady / a:.2f} (steady)   c/b = {c_steady / b:.2f} (steady)   "
          f"end-to-end c/b = {c_total / b:.2f}")


if __name__ == "__main__":
    main()
