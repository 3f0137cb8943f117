"""The stages of a run, in order, each a thin call into `pipeline/` or `training/`.

A stage names the stages it reads from (`after`), the settings its output depends on
(`settings`, fingerprinted together with its inputs' fingerprints), the folders it
writes (`outputs`, removed when the fingerprint changes) and `run`, which does or
resumes the work through the stage's own resume points and returns the counts that
`amused status` shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from amused.orchestration.run_config import RunConfig
from amused.plumbing.storage import join


@dataclass(frozen=True)
class Stage:
    name: str
    after: tuple[str, ...]
    settings: Callable[[RunConfig], Any]
    outputs: Callable[[RunConfig], list[str]]
    run: Callable[[RunConfig], dict]
    enabled: Callable[[RunConfig], bool] = lambda cfg: True


def _asdict(section, *drop: str) -> dict:
    out = dataclasses.asdict(section)
    for key in drop:  # settings that change how a stage runs, not what it writes
        out.pop(key, None)
    return out


# ----- source -----------------------------------------------------------------------------

def _www(cfg: RunConfig) -> str:
    return join(cfg.data_dir, "source/www")


def _base_url(cfg: RunConfig) -> str:
    return f"http://127.0.0.1:{cfg.source.synthetic.port}"


def run_source(cfg: RunConfig) -> dict:
    from amused.demo.site import write_shape_site

    syn = cfg.source.synthetic
    return write_shape_site(_www(cfg), cfg.filter.input, syn.images, _base_url(cfg), syn.min_size, syn.max_size,
                            syn.seed)


# ----- models -----------------------------------------------------------------------------

def _tiny_models(cfg: RunConfig) -> dict[str, bool]:
    m = cfg.models
    return {"text_encoder": m.text_encoder == "tiny", "vqgan": m.vqgan == "tiny",
            "inception": m.inception == "tiny", "clip": m.clip == "tiny"}


def run_models(cfg: RunConfig) -> dict:
    """Small random models for what the config marks 'tiny' (the demo); real runs name folders."""
    from pathlib import Path

    import torch

    from amused.demo.tiny_models import write_tiny_clip, write_tiny_text_encoder
    from amused.tokenizer.image import build_vqgan
    from amused.training.evaluation.metrics import write_random_inception

    out, wanted = Path(cfg.run_dir) / "models", _tiny_models(cfg)
    torch.manual_seed(0)
    if wanted["vqgan"] and not (out / "vqgan/config.json").exists():
        build_vqgan("tiny").save_pretrained(out / "vqgan")
    if wanted["text_encoder"] and not (out / "text_encoder/config.json").exists():
        write_tiny_text_encoder(out)
    if wanted["inception"] and not (out / "inception.pth").exists():
        write_random_inception(out / "inception.pth")
    if wanted["clip"] and not (out / "clip/config.json").exists():
        write_tiny_clip(out / "clip")
    return {"written": sorted(k for k, v in wanted.items() if v)}


# ----- data stages ------------------------------------------------------------------------

def run_filter(cfg: RunConfig) -> dict:
    from amused.pipeline.filter import filter_metadata

    report = filter_metadata(cfg.filter)
    print(report.table())
    return {"rows": report.total.get("rows_in"), "kept": report.total.get("rows_out"),
            "rejected": {k: v for k, v in report.total.get("rejected", {}).items() if v}, "shards": report.shards}


def run_download(cfg: RunConfig) -> dict:
    from contextlib import nullcontext

    from amused.demo.site import ImageServer
    from amused.pipeline.download import download

    serve = ImageServer(_www(cfg), cfg.source.synthetic.port) if cfg.source.synthetic else nullcontext()
    with serve:
        summary = download(cfg.download)
    print(summary.table())
    if summary.shards == 0:
        raise RuntimeError("download wrote no shard")
    return {"shards": summary.shards, "samples": summary.samples, "downloaded": summary.successes,
            "failed": summary.failures, "refused": {k: v for k, v in summary.policy_rejected.items() if v}}


def run_vqgan(cfg: RunConfig) -> dict:
    from amused.plumbing.fsio import exists
    from amused.training.vqgan.task import export_vqgan, train_vqgan

    result = train_vqgan(cfg.vqgan)
    target = cfg.pretokenize.vqgan
    if not exists(join(target, "config.json")):
        export_vqgan(result.checkpoint, target)
    return {"step": result.step, "checkpoint": result.checkpoint, "exported": target,
            "metrics": result.last_metrics}


def run_pretokenize(cfg: RunConfig) -> dict:
    from amused.pipeline.pretokenize import pretokenize

    report = pretokenize(cfg.pretokenize)
    print(report.summary())
    if not report.ok:
        raise RuntimeError(f"{len(report.failed_shards)} token shard(s) failed: {report.failed_shards}")
    return {"shards": report.shards_total, "tokenized": report.rows_written, "skipped": report.skipped}


# ----- training and evaluation --------------------------------------------------------------

def run_train(cfg: RunConfig) -> dict:
    """Trains through Ray Train; with `evaluate.watch`, evaluation actors score each
    checkpoint as it is written, and the evaluate stage then only finishes what is left."""
    import threading

    from amused.training.launch import train_on_ray

    stop = threading.Event()
    watcher = None
    if cfg.evaluate is not None and cfg.evaluate.watch:
        watcher = threading.Thread(target=_watch_training, args=(cfg, stop), name="evaluation-watcher", daemon=True)
        watcher.start()
    try:
        result = train_on_ray(cfg.train, workers=cfg.ray.train_workers, gpus_per_worker=cfg.ray.gpus_per_worker,
                              address=cfg.ray.address, cpus_per_worker=cfg.ray.cpus_per_worker)
    finally:
        stop.set()  # the watcher evaluates what is complete, then returns
        if watcher is not None:
            watcher.join()
    return {"step": result.step, "checkpoint": result.checkpoint, "metrics": result.last_metrics}


def _watch_training(cfg: RunConfig, stop) -> None:
    from amused.training.evaluation.evaluate import evaluate

    try:
        _fid_reference(cfg)
        evaluate(cfg.evaluate, cfg.sample, run_dir=cfg.train.run_dir, poll_seconds=5.0,
                 ray_address=cfg.ray.address or None, stop=stop)
    except Exception as exc:  # training goes on; the evaluate stage redoes what is missing
        print(f"[train] evaluation watcher stopped: {type(exc).__name__}: {exc}")


def _fid_reference(cfg: RunConfig) -> None:
    """As many of the run's own images as images generated per checkpoint, unless given."""
    from amused.plumbing.fsio import exists
    from amused.training.evaluation.evaluate import fid_reference, read_prompts

    ev = cfg.evaluate
    if not exists(ev.reference):
        fid_reference(cfg.download.output, ev.reference, ev.inception, cfg.pretokenize.resolution,
                      max_images=ev.max_prompts or len(read_prompts(ev.prompts)))


def run_evaluate(cfg: RunConfig) -> dict:
    from amused.training.evaluation.evaluate import evaluate, read_results, results_dir

    _fid_reference(cfg)
    evaluate(cfg.evaluate, cfg.sample, run_dir=cfg.train.run_dir, ray_address=cfg.ray.address or None)
    results = read_results(results_dir(cfg.train.run_dir, cfg.evaluate))
    latest = max(results, key=lambda r: r["step"], default=None)
    return {"evaluated": len(results), "latest": latest and {k: latest.get(k) for k in ("step", "fid", "clip_score")}}


def run_samples(cfg: RunConfig) -> dict:
    from amused.demo.showcase import sample_grid

    return sample_grid(cfg.train.run_dir, cfg.prompts, join(cfg.run_dir, "samples"), cfg.sample,
                       score_shapes=cfg.source.synthetic is not None)


STAGES: tuple[Stage, ...] = (
    Stage("source", (), lambda c: _asdict(c.source), lambda c: [join(c.data_dir, "source")], run_source,
          enabled=lambda c: c.source.synthetic is not None),
    Stage("models", (), lambda c: _tiny_models(c), lambda c: [join(c.run_dir, "models")], run_models,
          enabled=lambda c: any(_tiny_models(c).values())),
    Stage("filter", ("source",), lambda c: _asdict(c.filter, "workers", "progress", "ray_address", "partition_rows"),
          lambda c: [c.filter.output], run_filter),
    Stage("download", ("filter",), lambda c: _asdict(c.download, "processes", "threads"),
          lambda c: [c.download.output], run_download),
    Stage("vqgan", ("download", "models"), lambda c: _asdict(c.vqgan, "log"),
          lambda c: [c.vqgan.run_dir], run_vqgan, enabled=lambda c: c.vqgan is not None),
    Stage("pretokenize", ("download", "vqgan", "models"),
          lambda c: _asdict(c.pretokenize, "encoders", "encoder_cpus", "encoder_threads", "decode_cpus", "progress",
                            "ray_address", "device"),
          lambda c: [c.pretokenize.output], run_pretokenize),
    Stage("train", ("pretokenize", "models"), lambda c: {**_asdict(c.train, "log"), "ray": _asdict(c.ray, "address")},
          lambda c: [c.train.run_dir], run_train),
    Stage("evaluate", ("train",), lambda c: {"evaluate": _asdict(c.evaluate, "watch"), "sample": _asdict(c.sample)},
          lambda c: [c.evaluate.output], run_evaluate, enabled=lambda c: c.evaluate is not None),
    Stage("samples", ("train",), lambda c: {"prompts": c.prompts, "sample": _asdict(c.sample)},
          lambda c: [join(c.run_dir, "samples")], run_samples, enabled=lambda c: bool(c.prompts)),
)
