"""Distributed checkpoint evaluation: the metrics of `metrics.METRICS` (FID, CLIP score)
and a sample grid per checkpoint.

Ray actors (one per GPU, or N on CPU) each keep the VQ-GAN, text encoder and what every
metric measures with (FID Inception, CLIP) loaded and take a disjoint, contiguous slice
of the prompt set. Every image is
drawn from its own generator seeded by (seed, prompt index), so the images, and so the
metrics, do not depend on how many actors there are or on the batch size. The driver
hands out each actor's slice in batches, so its bar counts images as they are generated,
gathers features in prompt order and writes `eval/step_N.json` (atomically: a result
exists only when complete), `eval/step_N.png` and `eval/metrics.png` (each metric
against step). A rerun skips checkpoints that already have a result; the watcher
evaluates checkpoints as training writes them. The run folder and the results may be
on any fsspec URL (s3://...).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm

from amused.plumbing.determinism import set_deterministic
from amused.plumbing.fsio import exists, file_exists, sha256_of, write_json_atomic
from amused.plumbing.plots import image_grid, line_plots, save_png
from amused.plumbing.raysession import ray_session
from amused.plumbing.storage import join, url_to_fs
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.inception import load_inception
from amused.tokenizer.text import TextEncoder
from amused.training.checkpoint import Checkpoint, tag
from amused.training.config import EvalConfig, SampleConfig
from amused.training.evaluation.metrics import (
    METRICS,
    RESIZE_PROTOCOL,
    FeatureStats,
    Metric,
    inception_features,
    summarise_all,
)
from amused.training.evaluation.results import read_results, results_dir
from amused.training.inference.sample import Sampler, checkpoint_models, load_trained_model
from amused.training.vqgan.data import held_out_batches

_SEED_STRIDE = 1 << 32  # image i of seed s draws from generator s * 2^32 + i


def read_prompts(url: str, limit: int = 0) -> list[str]:
    """Non-empty prompts of a text file or a Parquet file, in order."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"prompt set {url} not found")
    if path.endswith(".parquet"):
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
        column = next((c for c in ("caption", "prompt", "TEXT", "text") if c in table.column_names), None)
        if column is None:
            raise ValueError(f"{url}: no caption/prompt/TEXT/text column (has {table.column_names})")
        prompts = [str(p).strip() for p in table.column(column).to_pylist() if p is not None]
    else:
        with fs.open(path, "rt", encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{url}: no prompts")
    return prompts[:limit] if limit else prompts


class EvalWorker:
    """One actor: generation and each metric's measurement for its slice of the prompts."""

    def __init__(self, cfg: EvalConfig, vqgan: str, text_encoder: str, gpu: bool):
        self.device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        if cfg.deterministic:  # for the actor's life; a CPU actor reserves one CPU (start_workers)
            set_deterministic(None if self.device == "cuda" else 1)
        self.measures = {m.name: m.measurer(cfg, self.device) for m in METRICS if m.wanted(cfg)}
        self.image = ImageTokenizer.from_pretrained(vqgan, device=self.device)
        self.text = TextEncoder.from_pretrained(text_encoder, device=self.device)
        self.loaded: tuple[str, bool] | None = None
        self.sampler = None

    def _load(self, checkpoint: str, ema: bool) -> None:
        if self.loaded != (checkpoint, ema):
            self.sampler = Sampler(load_trained_model(checkpoint, ema=ema), self.image, self.text)
            self.loaded = (checkpoint, ema)

    def run(self, checkpoint: str, ema: bool, items: list[tuple[int, str]], sample: SampleConfig, seed: int,
            batch_size: int, keep_below: int) -> dict:
        """Each metric's rows and the images of indices < keep_below for `items`."""
        self._load(checkpoint, ema)
        out = {"index": [], "rows": {name: [] for name in self.measures}, "kept": {}}
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            index, prompts = [i for i, _ in batch], [p for _, p in batch]
            generators = [torch.Generator().manual_seed(seed * _SEED_STRIDE + i) for i in index]
            images = self.sampler.decode(self.sampler.generate(prompts, sample, generators))
            out["index"] += index
            for name, measure in self.measures.items():
                out["rows"][name].append(measure(images, prompts))
            out["kept"].update({i: im for i, im in zip(index, images) if i < keep_below})
        return out


def start_workers(cfg: EvalConfig, vqgan: str, text_encoder: str) -> list:
    actor = ray.remote(EvalWorker).options(num_cpus=1, num_gpus=cfg.gpus_per_actor)
    return [actor.remote(cfg, vqgan, text_encoder, cfg.gpus_per_actor > 0) for _ in range(cfg.actors)]


def evaluate_checkpoint(checkpoint: Checkpoint, cfg: EvalConfig, sample: SampleConfig, workers: list,
                        prompts: list[str], metrics: list[Metric]) -> dict:
    """`metrics` of one checkpoint over all prompts, split across `workers`; writes the result."""
    started = time.monotonic()
    step = checkpoint.step
    out_dir = results_dir(checkpoint.run_dir, cfg)
    slices = [s for s in np.array_split(np.arange(len(prompts)), len(workers)) if len(s)]
    # An actor runs its calls in order: its slice queued as batches keeps it busy and shows progress.
    calls = {w.run.remote(checkpoint.folder, cfg.ema, [(int(i), prompts[i]) for i in s[b:b + cfg.batch_size]],
                          sample, cfg.seed, cfg.batch_size, cfg.grid): len(s[b:b + cfg.batch_size])
             for w, s in zip(workers, slices) for b in range(0, len(s), cfg.batch_size)}
    parts = []
    with tqdm(total=len(prompts), desc=f"generate {tag(step)}", unit="img") as bar:
        while calls:
            ready, _ = ray.wait(list(calls), num_returns=1)
            parts.append(ray.get(ready[0]))
            bar.update(calls.pop(ready[0]))
    order = np.argsort(np.concatenate([p["index"] for p in parts]))
    numbers, provenance = summarise_all(metrics, {
        m.name: np.concatenate([rows for p in parts for rows in p["rows"][m.name]])[order] for m in metrics})
    kept = {i: im for p in parts for i, im in p["kept"].items()}
    result = {
        "step": step, "checkpoint": checkpoint.folder, "weights": "ema" if cfg.ema else "raw", **numbers,
        "images": len(prompts), **provenance,
        "prompts": cfg.prompts, "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "seed": cfg.seed, "sample": asdict(sample), "actors": len(slices),
        "seconds": round(time.monotonic() - started, 2),
    }
    if kept:
        shown = sorted(kept)
        save_png(image_grid(np.stack([kept[i] for i in shown]), [prompts[i] for i in shown], columns=4,
                            cell=max(128, kept[shown[0]].shape[0])), join(out_dir, f"{tag(step)}.png"))
    write_json_atomic(join(out_dir, f"{tag(step)}.json"), result)
    plot_results(out_dir)
    return result


def plot_results(out_dir: str) -> str:
    """eval/metrics.png: each metric measured so far against training step."""
    results = read_results(out_dir)
    series = {m.title: [(r["step"], r[m.name]) for r in results if r.get(m.name) is not None] for m in METRICS}
    return save_png(line_plots({title: points for title, points in series.items() if points}),
                    join(out_dir, "metrics.png"))


def evaluate(cfg: EvalConfig, sample: SampleConfig, checkpoint: str = "", run_dir: str = "",
             poll_seconds: float = 10.0, timeout_seconds: float = 0.0, ray_address: str | None = None,
             stop: threading.Event | None = None) -> list[dict]:
    """Evaluates one checkpoint, or every complete checkpoint of a run that has no result
    yet; with `cfg.watch`, keeps evaluating new ones until the run has finished training
    (its result.json exists, or `stop` is set) and all are done, or `timeout_seconds` pass."""
    if bool(checkpoint) == bool(run_dir):
        raise ValueError("give either a checkpoint or a run folder")
    if not 0 < poll_seconds < math.inf or not 0 <= timeout_seconds < math.inf:
        raise ValueError(f"poll must be > 0 and timeout >= 0 seconds (0 = never), both finite; got poll "
                         f"{poll_seconds}, timeout {timeout_seconds}")
    if checkpoint:
        Checkpoint.at(checkpoint).loadable(cfg.ema)
    if run_dir and not exists(run_dir):
        raise FileNotFoundError(f"run folder {run_dir} not found")
    prompts = read_prompts(cfg.prompts, cfg.max_prompts)
    metrics = [m(cfg) for m in METRICS if m.wanted(cfg)]
    deadline = time.monotonic() + timeout_seconds if timeout_seconds else None
    done: list[dict] = []
    workers = None
    with ray_session(ray_address):
        while True:
            # Before listing: a checkpoint written after this look is seen by the next one.
            finished = bool(run_dir) and file_exists(join(run_dir, "result.json")) or bool(stop and stop.is_set())
            if checkpoint:
                pending = [Checkpoint.at(checkpoint)]
            else:
                evaluated = {r["step"] for r in read_results(results_dir(run_dir, cfg))}
                pending = [c for c in Checkpoint.every(run_dir) if c.step not in evaluated]
            for ckpt in tqdm(pending, desc="evaluate", unit="ckpt", disable=len(pending) < 2):
                if workers is None:
                    workers = start_workers(cfg, *checkpoint_models(ckpt.folder, cfg.vqgan, cfg.text_encoder))
                try:
                    if run_dir:  # here, not only in the actors: their error would not name the file
                        ckpt.loadable(cfg.ema)
                    done.append(evaluate_checkpoint(ckpt, cfg, sample, workers, prompts, metrics))
                except Exception as exc:
                    if ckpt.complete:
                        raise
                    print(f"skipped {tag(ckpt.step)}: removed (kept-last pruning) while it was evaluated ({exc})")
            if checkpoint or not cfg.watch or (finished and not pending):
                return done
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"watcher: training of {run_dir} did not finish within {timeout_seconds} s")
            if not pending:
                (stop or threading.Event()).wait(poll_seconds)


def fid_reference(images: str, output: str, inception: str, resolution: int = 256, max_images: int = 0,
                  batch_size: int = 32) -> dict:
    """FID statistics of real held-out images (webdataset shards): each image's shorter
    side resized to `resolution` and centre-cropped like the generated ones, then the
    FID resize protocol. Undecodable images are counted by reason, not fatal."""
    net = load_inception(inception)
    skipped: Counter = Counter()
    features = []
    with tqdm(desc="reference images", unit="img", total=max_images or None) as bar:
        for batch in held_out_batches(images, resolution, batch_size, max_images, skipped):
            features.append(inception_features(net, batch))
            bar.update(len(batch))
    stats = FeatureStats.of(np.concatenate(features) if features else np.zeros((0, 2048)),
                            weights_sha256=sha256_of(inception))
    stats.save(output)
    return {"output": output, "images": stats.count, "skipped": dict(skipped), "protocol": RESIZE_PROTOCOL,
            "resolution": resolution}
