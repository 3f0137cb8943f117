"""The stages of a run, in order, each a thin call into `pipeline/` or `training/`.

A stage is one entry of STAGES, which declares all there is to it:
- `after`: the stages it reads from;
- `section`: its own part of the run config (the key, a RunConfig field of the same
  name, and `config`, its class), with `derived`: the keys the run sets in it, from the
  top of the run config and the sections of the stages before it (where it reads the
  output of one before it, it names that stage's output key; the image shards, which
  download or ingest writes by the source's kind, are at `_images`). A user setting a
  derived key is an error naming it; `applies` turns a section and its stage off for
  the sources it does not serve;
- the settings its output depends on: its section's `output_settings` (every setting not
  declared `output=False`), or `depends` where it reads more; fingerprinted together
  with its inputs' fingerprints;
- `outputs`: the folders it writes (removed when the fingerprint changes, or when another
  stage writes them now: download's and ingest's image shards, as the source's kind
  changes), and `run`, which does or resumes the work through the stage's own resume
  points and returns the counts that `amused status` shows, with `progress`, the work
  found in its outputs, and `check`, what must hold before the run starts.
"""

from __future__ import annotations

import tempfile
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from amused.demo.showcase import sample_grid
from amused.demo.site import ImageServer, write_shape_site
from amused.demo.tiny_models import write_tiny_clip, write_tiny_text_encoder
from amused.pipeline.download import DownloadConfig, download
from amused.pipeline.filter import FilterConfig, filter_metadata
from amused.pipeline.ingest import INPUTS, IngestConfig, check_found, ingest
from amused.pipeline.pretokenize import PretokenizeConfig, pretokenize
from amused.plumbing.config import output_settings
from amused.plumbing.determinism import deterministic_torch, machine_threads
from amused.plumbing.fsio import exists, file_exists, list_files, upload_tree
from amused.plumbing.storage import is_local, join, url_to_fs
from amused.tokenizer.image import build_vqgan
from amused.tokenizer.inception import write_random_inception
from amused.training.checkpoint import Checkpoint
from amused.training.config import EvalConfig, TrainConfig
from amused.training.evaluation.metrics import METRICS
from amused.training.evaluation.results import read_results, results_dir
from amused.training.vqgan.task import VQ_COMPLETE, VQGANConfig, export_vqgan, train_vqgan

if TYPE_CHECKING:  # run_config reads STAGES to parse the stage sections
    from amused.orchestration.run_config import RunBase, RunConfig


def _nothing(*_) -> dict:
    return {}


@dataclass(frozen=True)
class Stage:
    """One stage of the graph (see the module docstring); `settings` and `enabled` are
    what the graph asks of it."""

    name: str
    after: tuple[str, ...]
    outputs: Callable[[RunConfig], list[str]]
    run: Callable[[RunConfig], dict]
    section: str | None = None
    config: type | None = None
    # Keys (dotted into nested sections) the run sets: f(top of the run config, the
    # sections parsed so far by name).
    derived: Callable[[RunBase, dict[str, Any]], dict[str, Any]] = _nothing
    defaults: Callable[[RunBase], dict[str, Any]] = _nothing  # defaults that depend on the run
    # A section not written: its config's defaults, an error, or the stage is off
    # (also when empty or null).
    absent: Literal["defaults", "required", "off"] = "defaults"
    # Where not applies(top of the run config), the section is None (writing it is an error)
    # and the stage is off: which stages run depends on the source.
    applies: Callable[[RunBase], bool] | None = None
    # Inputs added after runs existed: one that is off adds nothing to the fingerprint, so
    # a run made before keeps its fingerprints and its finished stages.
    late_after: tuple[str, ...] = ()
    depends: Callable[[RunConfig], Any] | None = None  # the settings, where more than the section's
    when: Callable[[RunConfig], bool] | None = None  # on, where more than "its section is given"
    # Units of work present so far, read from its outputs alone (`amused status`).
    progress: Callable[[RunConfig], str] = lambda cfg: ""
    # Raises where what the stage reads from outside the run is missing: asked before any
    # stage starts, of the stages still to do (a done one may have lost its inputs).
    check: Callable[[RunConfig], None] = _nothing

    def settings(self, cfg: RunConfig) -> Any:
        """What the stage's output depends on besides its inputs."""
        return self.depends(cfg) if self.depends else output_settings(getattr(cfg, self.section))

    def enabled(self, cfg: RunConfig) -> bool:
        if self.when is not None:
            return self.when(cfg)
        return getattr(cfg, self.section) is not None


# ----- source -----------------------------------------------------------------------------

def _www(cfg: RunConfig) -> str:
    return join(cfg.data_dir, "source/www")


def _base_url(cfg: RunConfig) -> str:
    return f"http://127.0.0.1:{cfg.source.synthetic.port}"


def run_source(cfg: RunConfig) -> dict:
    syn = cfg.source.synthetic
    return write_shape_site(_www(cfg), cfg.filter.input, syn.images, _base_url(cfg), syn.min_size, syn.max_size,
                            syn.seed)


# ----- models -----------------------------------------------------------------------------

def _tiny_models(cfg: RunConfig) -> dict[str, bool]:
    m = cfg.models
    return {"text_encoder": m.text_encoder == "tiny", "vqgan": m.vqgan == "tiny",
            "inception": m.inception == "tiny", "clip": m.clip == "tiny"}


# The file whose presence says a tiny model is written (uploaded last to a remote run folder).
_TINY_MARKERS = {"vqgan": "vqgan/config.json", "text_encoder": "text_encoder/config.json",
                 "inception": "inception.pth", "clip": "clip/config.json"}


def run_models(cfg: RunConfig) -> dict:
    """Small random models for what the config marks 'tiny' (the demo); real runs name folders.
    A remote run folder gets them written locally and uploaded, each model's marker file last."""
    out, wanted = join(cfg.run_dir, "models"), _tiny_models(cfg)
    missing = {k for k, v in wanted.items() if v and not file_exists(join(out, _TINY_MARKERS[k]))}
    remote = not is_local(out)
    with tempfile.TemporaryDirectory() if remote else nullcontext(url_to_fs(out)[1]) as where:
        local = Path(where)
        torch.manual_seed(0)
        if "vqgan" in missing:
            build_vqgan("tiny").save_pretrained(local / "vqgan")
        if "text_encoder" in missing:
            write_tiny_text_encoder(local)
        if "inception" in missing:
            write_random_inception(local / "inception.pth")
        if "clip" in missing:
            write_tiny_clip(local / "clip")
        if remote:
            upload_tree(local, out, last=frozenset(_TINY_MARKERS[k] for k in missing))
    return {"written": sorted(k for k, v in wanted.items() if v)}


# ----- data stages ------------------------------------------------------------------------

def run_filter(cfg: RunConfig) -> dict:
    report = filter_metadata(cfg.filter)
    print(report.table())
    return {"rows": report.total.get("rows_in"), "kept": report.total.get("rows_out"),
            "rejected": {k: v for k, v in report.total.get("rejected", {}).items() if v}, "shards": report.shards}


def run_download(cfg: RunConfig) -> dict:
    serve = ImageServer(_www(cfg), cfg.source.synthetic.port) if cfg.source.synthetic else nullcontext()
    with serve:
        summary = download(cfg.download)
    print(summary.table())
    if summary.shards == 0:
        raise RuntimeError("download wrote no shard")
    return {"shards": summary.shards, "samples": summary.samples, "downloaded": summary.successes,
            "failed": summary.failures, "refused": {k: v for k, v in summary.policy_rejected.items() if v}}


def run_ingest(cfg: RunConfig) -> dict:
    report = ingest(cfg.ingest)
    print(report.summary())
    if not report.ok:
        raise RuntimeError(f"ingest found no usable image in source.{cfg.source.kind}")
    return {"shards": report.shards_total, "samples": report.samples, "ingested": report.successes,
            "skipped": report.skipped}


def run_vqgan(cfg: RunConfig) -> dict:
    result = train_vqgan(cfg.vqgan)
    target = cfg.pretokenize.vqgan
    if not file_exists(join(target, VQ_COMPLETE)):
        export_vqgan(result.checkpoint, target)
    return {"step": result.step, "checkpoint": result.checkpoint, "exported": target,
            "metrics": result.last_metrics}


def run_pretokenize(cfg: RunConfig) -> dict:
    report = pretokenize(cfg.pretokenize)
    print(report.summary())
    if not report.ok:
        raise RuntimeError(f"{len(report.failed_shards)} token shard(s) failed: {report.failed_shards}")
    return {"shards": report.shards_total, "tokenized": report.rows_written, "skipped": report.skipped}


# ----- training and evaluation --------------------------------------------------------------

def run_train(cfg: RunConfig) -> dict:
    """Trains through Ray Train; with `evaluate.watch`, evaluation actors score each
    checkpoint as it is written, and the evaluate stage then only finishes what is left."""
    # Ray Train and Ray (this and evaluate below) would add ~1.7 s to every run-config parse
    # (`amused config`, `amused status`), which imports this module for the stage table.
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
    from amused.training.evaluation.evaluate import evaluate  # ray: see run_train

    try:
        _fid_reference(cfg)
        evaluate(cfg.evaluate, cfg.sample, run_dir=cfg.train.run_dir, poll_seconds=5.0,
                 ray_address=cfg.ray.address or None, stop=stop)
    except Exception as exc:  # training goes on; the evaluate stage redoes what is missing
        print(f"[train] evaluation watcher stopped: {type(exc).__name__}: {exc}")


def _fid_reference(cfg: RunConfig) -> None:
    """As many of the run's own images as images generated per checkpoint, unless given."""
    from amused.training.evaluation.evaluate import fid_reference, read_prompts  # ray: see run_train

    ev = cfg.evaluate
    if exists(ev.reference):
        return
    # In the run's process (the evaluation watcher's thread, or the stage): its kernels and
    # threads are the run's to set; the training meanwhile runs in Ray Train's workers.
    with deterministic_torch(machine_threads()) if cfg.deterministic else nullcontext():
        fid_reference(_images(cfg), ev.reference, ev.inception, cfg.pretokenize.resolution,
                      max_images=ev.max_prompts or len(read_prompts(ev.prompts)))


def run_evaluate(cfg: RunConfig) -> dict:
    from amused.training.evaluation.evaluate import evaluate  # ray: see run_train

    _fid_reference(cfg)
    evaluate(cfg.evaluate, cfg.sample, run_dir=cfg.train.run_dir, ray_address=cfg.ray.address or None)
    results = read_results(results_dir(cfg.train.run_dir, cfg.evaluate))
    latest = max(results, key=lambda r: r["step"], default=None)
    shown = ("step", *(m.name for m in METRICS))
    return {"evaluated": len(results), "latest": latest and {k: latest.get(k) for k in shown}}


def run_samples(cfg: RunConfig) -> dict:
    # In the run's own process, whose torch threads are otherwise whatever its environment says.
    with deterministic_torch(machine_threads()) if cfg.deterministic else nullcontext():
        return sample_grid(cfg.train.run_dir, cfg.prompts, join(cfg.run_dir, "samples"), cfg.sample,
                           score_shapes=cfg.source.synthetic is not None)


# ----- the table ----------------------------------------------------------------------------

def _shards(folder: str, suffix: str) -> str:
    return f"{len(list_files(folder, suffix, required=False))} shards"


def _steps(section) -> str:
    latest = Checkpoint.latest(section.run_dir)
    return f"step {latest.step if latest else 0}/{section.steps}"


def _images(run: RunBase) -> str:
    """The image shards the later stages read, written by download or by ingest."""
    return join(run.data_dir, "images")


def _fetched(run: RunBase) -> bool:
    return not run.source.ingested


def _vqgan_model(run: RunBase) -> str:
    """The VQ-GAN folder the stages read: the models stage's tiny one, the vqgan stage's
    export, or the folder the config names."""
    return {"tiny": join(run.run_dir, "models/vqgan"), "train": join(run.run_dir, "vqgan/export")}.get(
        run.models.vqgan, run.models.vqgan)


def _text_encoder_model(run: RunBase) -> str:
    return join(run.run_dir, "models") if run.models.text_encoder == "tiny" else run.models.text_encoder


def _metric_models(run: RunBase) -> dict[str, str]:
    """The FID Inception and CLIP the config names ('tiny': the models stage's); '' leaves
    the evaluate section's own setting."""
    out = {}
    for key, tiny in (("inception", "models/inception.pth"), ("clip", "models/clip")):
        given = getattr(run.models, key)
        if given:
            out[key] = join(run.run_dir, tiny) if given == "tiny" else given
    return out


STAGES: tuple[Stage, ...] = (
    Stage("source", (), lambda c: [join(c.data_dir, "source")], run_source,
          depends=lambda c: output_settings(c.source), when=lambda c: c.source.synthetic is not None),
    Stage("models", (), lambda c: [join(c.run_dir, "models")], run_models,
          depends=_tiny_models, when=lambda c: any(_tiny_models(c).values())),
    Stage("filter", ("source",), lambda c: [c.filter.output], run_filter, section="filter", config=FilterConfig,
          applies=_fetched,
          derived=lambda run, s: {"input": run.source.metadata or join(run.data_dir, "source/metadata"),
                                  "output": join(run.data_dir, "filtered"), "ray_address": run.ray.address or None},
          progress=lambda c: _shards(c.filter.output, ".parquet")),
    Stage("download", ("filter",), lambda c: [c.download.output], run_download, section="download",
          config=DownloadConfig, applies=_fetched,
          derived=lambda run, s: {"input": s["filter"].output, "output": _images(run)},
          progress=lambda c: _shards(c.download.output, ".tar")),
    Stage("ingest", (), lambda c: [c.ingest.output], run_ingest, section="ingest", config=IngestConfig,
          applies=lambda run: run.source.ingested,
          derived=lambda run, s: {"output": _images(run), "ray_address": run.ray.address or None,
                                  **{k: getattr(run.source, k) for k in INPUTS}},
          progress=lambda c: _shards(c.ingest.output, "_stats.json"), check=lambda c: check_found(c.ingest, "source")),
    Stage("vqgan", ("download", "models"), lambda c: [c.vqgan.run_dir], run_vqgan, section="vqgan",
          config=VQGANConfig, absent="off", late_after=("ingest",),
          derived=lambda run, s: {"run_dir": join(run.run_dir, "vqgan"), "data.images": _images(run),
                                  "deterministic": run.deterministic},
          progress=lambda c: _steps(c.vqgan)),
    Stage("pretokenize", ("download", "vqgan", "models"), lambda c: [c.pretokenize.output], run_pretokenize,
          section="pretokenize", config=PretokenizeConfig, late_after=("ingest",),
          derived=lambda run, s: {"input": _images(run), "output": join(run.data_dir, "tokens"),
                                  "vqgan": _vqgan_model(run), "text_encoder": _text_encoder_model(run),
                                  "ray_address": run.ray.address or None, "deterministic": run.deterministic},
          progress=lambda c: _shards(c.pretokenize.output, ".parquet")),
    Stage("train", ("pretokenize", "models"), lambda c: [c.train.run_dir], run_train, section="train",
          config=TrainConfig, absent="required",
          derived=lambda run, s: {"run_dir": join(run.run_dir, "train"), "data.dataset": s["pretokenize"].output,
                                  "model.vqgan": _vqgan_model(run), "model.text_encoder": _text_encoder_model(run),
                                  "deterministic": run.deterministic},
          depends=lambda c: {**output_settings(c.train), "ray": output_settings(c.ray)},
          progress=lambda c: _steps(c.train)),
    Stage("evaluate", ("train",), lambda c: [c.evaluate.output], run_evaluate, section="evaluate",
          config=EvalConfig, absent="off",
          derived=lambda run, s: {"vqgan": _vqgan_model(run), "text_encoder": _text_encoder_model(run),
                                  "output": join(run.run_dir, "eval"), "deterministic": run.deterministic,
                                  **_metric_models(run)},
          # No reference statistics given: the evaluate stage computes them from the run's own images.
          defaults=lambda run: {"reference": join(run.run_dir, "eval/reference.npz")},
          # Nested by section, unlike train's: the fingerprints of existing runs stay the same.
          depends=lambda c: {"evaluate": output_settings(c.evaluate), "sample": output_settings(c.sample)}),
    Stage("samples", ("train",), lambda c: [join(c.run_dir, "samples")], run_samples,
          depends=lambda c: {"prompts": c.prompts, "sample": output_settings(c.sample)}, when=lambda c: bool(c.prompts)),
)
