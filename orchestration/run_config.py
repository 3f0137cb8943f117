"""The run config: one YAML file for the whole graph, validated before anything runs.

The top (`run_dir`, `data_dir`, `ray`, `source`, `models`) says where the run lives and
what it starts from; each stage's section is that stage's own config class minus the
keys the run derives (where it reads and writes, which models it uses, the Ray
address), both declared by the stage in `orchestration/stages.py`. Setting a derived
key is an error that names it, so there is one place for every path and no stage
config is copied and edited by hand.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from amused.orchestration.stages import STAGES, Stage
from amused.pipeline.download import DownloadConfig
from amused.pipeline.filter import FilterConfig
from amused.pipeline.ingest import INPUTS, IngestConfig, check_inputs
from amused.pipeline.pretokenize import PretokenizeConfig
from amused.plumbing.config import dotted_parent, from_mapping, opt, read_yaml
from amused.plumbing.storage import join
from amused.tokenizer.presets import UVIT_CONFIGS, VQGAN_CONFIGS, downsample_of
from amused.training.config import EvalConfig, SampleConfig, TrainConfig
from amused.training.distributed import Layout
from amused.training.vqgan.task import VQGANConfig


@dataclass
class SyntheticSource:
    """Generated captioned shape images served on 127.0.0.1, with LAION-schema metadata
    pointing at them: the embedded default's stand-in for the internet."""

    images: int = opt(2000, "images to generate")
    min_size: int = opt(48, "smallest side drawn")
    max_size: int = opt(96, "largest side drawn")
    port: int = opt(8765, "port of the image server on 127.0.0.1 (the metadata's URLs name it)")
    seed: int = opt(0, "images, captions and sizes")

    def __post_init__(self):
        if self.images < 1 or not 8 <= self.min_size <= self.max_size or not 0 < self.port < 65536 or self.seed < 0:
            raise ValueError("source.synthetic: images >= 1, 8 <= min_size <= max_size, 0 < port < 65536, seed >= 0")


def _ingest_field(name: str):
    """The `ingest` setting `name` with its default and help: the source declares the
    ingest stage's inputs, and the derived ingest section takes them from it."""
    f = next(f for f in dataclasses.fields(IngestConfig) if f.name == name)
    return dataclasses.field(default=f.default, metadata=f.metadata)


SOURCE_KINDS = ("metadata", "synthetic", "images", "hf_dataset")


@dataclass
class SourceConfig:
    metadata: str | None = opt(None, "image-text metadata Parquet (file, folder or glob; local or s3)")
    synthetic: SyntheticSource | None = opt(None, "generate the images and their metadata instead")
    # Your own images, made into shards by the ingest stage (filter and download do not run).
    images: str | None = _ingest_field("images")
    captions: str | None = _ingest_field("captions")
    file_column: str = _ingest_field("file_column")
    hf_dataset: str | None = _ingest_field("hf_dataset")
    image_column: str = _ingest_field("image_column")
    caption_column: str = _ingest_field("caption_column")
    split: str = _ingest_field("split")

    def __post_init__(self):
        kinds = [k for k in SOURCE_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("source: give exactly one of metadata (a Parquet URL), synthetic (generated images), "
                             "images (a folder of your own) or hf_dataset (a datasets folder)"
                             + (f"; got {', '.join(kinds)}" if kinds else ""))
        if self.metadata is not None and not self.metadata.strip():
            raise ValueError("source.metadata: expected a Parquet URL, got ''")
        if self.ingested:
            # Whether they are there is asked where ingest is to run (its Stage.check): a finished
            # run's status and resume do not need them.
            check_inputs(self.images, self.captions, self.hf_dataset, "source")
        else:
            for f in dataclasses.fields(self):
                if f.name in INPUTS and getattr(self, f.name) != f.default:
                    raise ValueError(f"source.{f.name}: goes with images or hf_dataset, not {kinds[0]}")

    @property
    def kind(self) -> str:
        return next(k for k in SOURCE_KINDS if getattr(self, k) is not None)

    @property
    def ingested(self) -> bool:
        """Images the ingest stage reads, rather than metadata that filter and download fetch."""
        return self.images is not None or self.hf_dataset is not None


@dataclass
class ModelsConfig:
    text_encoder: str = opt(help="CLIP text folder (text_encoder/ + tokenizer/), or 'tiny': a small random one")
    vqgan: str = opt(help="VQModel folder, 'tiny' (small random), or 'train': the run's own `vqgan` stage")
    inception: str = opt("", "FID Inception weights file; 'tiny': random weights in the real format (demo only)")
    clip: str = opt("", "CLIP folder for the CLIP score; 'tiny': a small random one (demo only); '' = none")

    def __post_init__(self):
        for name in ("text_encoder", "vqgan"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")


@dataclass
class RayConfig:
    address: str = opt("", "Ray cluster address; empty = start a local Ray", output=False)
    train_workers: int = opt(1, "Ray Train workers (one DeepSpeed rank each)")
    gpus_per_worker: float = opt(0.0, "GPUs per training worker (0 = CPU with gloo)")
    cpus_per_worker: float = opt(1.0, "CPUs reserved per training worker")

    def __post_init__(self):
        if self.train_workers < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError("ray: train_workers >= 1, gpus_per_worker >= 0, cpus_per_worker > 0")


@dataclass
class RunBase:
    """The top of a run config: what every stage section's derived keys come from."""

    run_dir: str
    data_dir: str
    ray: RayConfig
    source: SourceConfig
    models: ModelsConfig
    # Deterministic kernels and fixed thread counts in the trainings, the encoders and the
    # evaluation (the `deterministic` of the vqgan, pretokenize, train and evaluate sections,
    # derived from this).
    deterministic: bool


@dataclass
class RunConfig(RunBase):
    # One field per stage section of STAGES, in stage order (a test checks they agree).
    filter: FilterConfig | None  # None: the source is ingested
    download: DownloadConfig | None
    ingest: IngestConfig | None  # None: the source is fetched
    vqgan: VQGANConfig | None
    pretokenize: PretokenizeConfig
    train: TrainConfig
    evaluate: EvalConfig | None
    sample: SampleConfig
    prompts: list[str] = field(default_factory=list)  # the sample grid's prompts
    given: dict = field(default_factory=dict, repr=False)  # the mapping as written, for the run's snapshot

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("given")
        return out


def derive_section(cls: type, name: str, data: dict, derived: dict[str, Any]):
    """`cls` from the user's section plus the derived keys, refusing a derived key set by hand."""
    merged = _copy(data)
    for dotted, value in derived.items():
        node, leaf = dotted_parent(merged, dotted, name)
        if leaf in node:
            raise ValueError(f"{name}.{dotted} is set by the run (to {value!r}); remove it from the config")
        node[leaf] = value
    return from_mapping(cls, merged, name)


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _copy(data: Any) -> Any:
    return {k: _copy(v) for k, v in data.items()} if isinstance(data, dict) else data


TOP = tuple(f.name for f in dataclasses.fields(RunBase))
SECTIONS = (*TOP, *(s.section for s in STAGES if s.section), "sample", "prompts")
REQUIRED = ("run_dir", "source", "models", *(s.section for s in STAGES if s.absent == "required"))


def _folder(data: dict, key: str, default: str | None = None) -> str:
    """The top-level folder `key` (absolute when local: Ray Train runs its workers in
    another directory); null or absent is `default`."""
    value = data.get(key)
    if value is None and default is not None:
        return _absolute(default)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key}: expected a folder path, got {value!r}")
    return _absolute(value)


def _given(data: dict, key: str) -> dict | None:
    """The section `key` as written: a mapping, or None where it is absent or null."""
    value = data.get(key)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _stage_section(stage: Stage, run: RunBase, data: dict, parsed: dict[str, Any]):
    """The stage's section from what is written, its run-dependent defaults and the keys
    the run derives; None where the stage is off for want of it."""
    given = _given(data, stage.section)
    if stage.applies is not None and not stage.applies(run):
        if given:
            raise ValueError(f"{stage.section}: the {stage.name} stage does not run for source.{run.source.kind}; "
                             f"remove the section")
        return None
    if stage.absent == "off" and not given:
        return None
    return derive_section(stage.config, stage.section, {**stage.defaults(run), **_copy(given or {})},
                    stage.derived(run, parsed))


def parse_run_config(data: Any) -> RunConfig:
    if not isinstance(data, dict):
        raise ValueError(f"run config: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; allowed at the top: {', '.join(SECTIONS)}")
    for key in REQUIRED:
        if key not in data:
            raise ValueError(f"missing required key {key!r}")
    run_dir = _folder(data, "run_dir")
    data_dir = _folder(data, "data_dir", join(run_dir, "data"))
    ray = from_mapping(RayConfig, _given(data, "ray") or {}, "ray")
    source = from_mapping(SourceConfig, data["source"], "source")
    source = dataclasses.replace(source, **{k: _absolute(getattr(source, k)) for k in ("images", "captions", "hf_dataset")
                                            if getattr(source, k) is not None})
    models = from_mapping(ModelsConfig, data["models"], "models")
    models = dataclasses.replace(models, **{f.name: _absolute(getattr(models, f.name)) for f in dataclasses.fields(models)
                                            if getattr(models, f.name) not in ("", "tiny", "train")})
    if models.vqgan == "train" and not _given(data, "vqgan"):
        raise ValueError("models.vqgan is 'train' but there is no vqgan section to train it")
    deterministic = data.get("deterministic", False)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic: expected true or false, got {deterministic!r}")
    run = RunBase(run_dir=run_dir, data_dir=data_dir, ray=ray, source=source, models=models,
                  deterministic=deterministic)
    sections: dict[str, Any] = {}
    for stage in STAGES:  # in order: a stage's derived keys may name an earlier stage's output
        if stage.section:
            sections[stage.section] = _stage_section(stage, run, data, sections)
    if sections["vqgan"] is not None and models.vqgan != "train":
        raise ValueError(f"a vqgan section trains a VQ-GAN, but models.vqgan is {models.vqgan!r}; set it to 'train'")
    _check_tokens_fit(models, sections["vqgan"], sections["pretokenize"], sections["train"])
    _check_batches(ray, sections["vqgan"], sections["train"])
    prompts = [] if data.get("prompts") is None else data["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts: expected a list of non-empty strings (the sample grid's prompts), got {prompts!r}")
    return RunConfig(run_dir=run_dir, data_dir=data_dir, ray=ray, source=source, models=models,
                     deterministic=deterministic,
                     sample=from_mapping(SampleConfig, _given(data, "sample") or {}, "sample"),
                     prompts=prompts, given=_copy(data), **sections)


def _check_batches(ray: RayConfig, vqgan: VQGANConfig | None, train: TrainConfig) -> None:
    """Each training's global batch must split over the ranks the run gives it (the train
    stage: ray.train_workers; the vqgan stage trains in the run's process, on one), by the
    trainers' own start-up check, `Layout.plan`; a resumed run keeps its recorded lanes."""
    for name, data, world in (("train", train.data, ray.train_workers), ("vqgan", vqgan and vqgan.data, 1)):
        if data is None:
            continue
        try:
            Layout.plan(data.global_batch_size, data.micro_batch_size, world, getattr(data, "lanes", None) or world)
        except ValueError as exc:
            ranks = f"ray.train_workers: {world}" if name == "train" else "the vqgan stage trains on 1 rank"
            raise ValueError(f"{name}.{exc} ({ranks})") from None


def _check_tokens_fit(models: ModelsConfig, vqgan: VQGANConfig | None, pretokenize: PretokenizeConfig,
                      train: TrainConfig) -> None:
    """The U-ViT preset must take the tokens the run's VQ-GAN will make (grid and codebook);
    known before any work whenever both come from presets, not from folders."""
    preset = {"tiny": "tiny", "train": vqgan and not vqgan.model.pretrained and vqgan.model.preset}.get(models.vqgan)
    if not preset or train.model.pretrained:
        return
    vq, uvit = VQGAN_CONFIGS[preset], UVIT_CONFIGS[train.model.preset]
    grid = pretokenize.resolution // downsample_of(vq["block_out_channels"])
    if (grid, vq["num_vq_embeddings"]) != (uvit["sample_size"], uvit["codebook_size"]):
        raise ValueError(f"train.model.preset {train.model.preset!r} takes {uvit['sample_size']}x"
                         f"{uvit['sample_size']} tokens of {uvit['codebook_size']} codes, but the VQ-GAN preset "
                         f"{preset!r} at pretokenize.resolution {pretokenize.resolution} makes {grid}x{grid} tokens "
                         f"of {vq['num_vq_embeddings']} codes")


def load_run_config(path: str) -> RunConfig:
    return parse_run_config(read_yaml(path))
