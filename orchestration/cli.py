"""The `amused` command: one subcommand per stage, each calling the stage's Python API.

Exit status 0 on success; 2 for a bad command line (argparse, before anything loads);
otherwise 1 with a one-line reason on stderr (set AMUSED_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import importlib
import importlib.metadata
import json
import logging
import os
import sys
import tempfile

from PIL import Image

from amused.pipeline.download import DownloadConfig, download
from amused.pipeline.filter import FilterConfig, filter_metadata
from amused.pipeline.ingest import IngestConfig, ingest
from amused.pipeline.inspect import format_inspect, inspect_dataset, reconstruction_grid, verify_dataset
from amused.pipeline.pretokenize import PretokenizeConfig, pretokenize
from amused.plumbing.config import HelpFormatter, add_config_args, config_from_args, read_yaml
from amused.plumbing.plots import image_grid, save_png
from amused.plumbing.raysession import ray_log
from amused.plumbing.storage import join
from amused.plumbing.terminal import local_log
from amused.training.config import EvalConfig, SampleConfig, dump_config, load_config
from amused.training.inference.card import DEFAULT_LICENSE


class LazyModule:
    """A module imported when one of its names is first read."""

    def __init__(self, name: str):
        self.__name__ = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.__name__), attr)


# What the parser needs is imported above; the subcommands' models and engines load when one runs:
# `amused --help` takes 0.9 s so, 17 s with them all imported here (torch, DeepSpeed, Ray, diffusers; measured).
torch = LazyModule("torch")
datasets = LazyModule("amused.demo.datasets")
tiny_models = LazyModule("amused.demo.tiny_models")
run_graph = LazyModule("amused.orchestration.run")
run_config = LazyModule("amused.orchestration.run_config")
run_status = LazyModule("amused.orchestration.status")
styledrop = LazyModule("amused.orchestration.styledrop")
tokenizer_image = LazyModule("amused.tokenizer.image")
inception = LazyModule("amused.tokenizer.inception")
uvit_task = LazyModule("amused.training.uvit.task")
evaluation = LazyModule("amused.training.evaluation.evaluate")
metrics = LazyModule("amused.training.evaluation.metrics")
vq_evaluation = LazyModule("amused.training.evaluation.vqgan")
export = LazyModule("amused.training.inference.export")
inference = LazyModule("amused.training.inference.sample")
quantize = LazyModule("amused.training.inference.quantize")
lora = LazyModule("amused.training.lora")
launch = LazyModule("amused.training.launch")
vqgan_task = LazyModule("amused.training.vqgan.task")


def _models_tiny(args) -> int:
    out = tiny_models.write_tiny_models(args.out, seed=args.seed)
    # What `amused evaluate` needs too, so every stage can be tried on these alone.
    tiny_models.write_tiny_clip(os.path.join(out, "clip"), seed=args.seed)
    inception.write_random_inception(os.path.join(out, "inception.pth"), seed=args.seed)
    print(f"tiny models written to {out}: vqgan/ text_encoder/ tokenizer/ transformer/ clip/ (CLIP score) "
          "inception.pth (random weights in FID Inception's format)")
    return 0


def _synth(args) -> int:
    urls = datasets.write_shape_shards(args.out, shards=args.shards, per_shard=args.per_shard, seed=args.seed,
                                       min_size=args.min_size, max_size=args.max_size)
    print(f"{len(urls)} webdataset shards of {args.per_shard} captioned images written to {args.out}")
    return 0


def _filter(args) -> int:
    print(filter_metadata(config_from_args(FilterConfig, args)).table())
    return 0


def _download(args) -> int:
    print(download(config_from_args(DownloadConfig, args)).table())
    return 0


def _ingest(args) -> int:
    report = ingest(config_from_args(IngestConfig, args))
    print(report.summary())
    if not report.ok:
        print("amused: error: no usable image was ingested (see the skipped reasons above)", file=sys.stderr)
        return 1
    return 0


def _pretokenize(args) -> int:
    report = pretokenize(config_from_args(PretokenizeConfig, args))
    print(report.summary())
    if not report.ok:
        print(f"amused: error: {len(report.failed_shards)} shard(s) failed; rerun to retry them", file=sys.stderr)
        return 1
    return 0


def _shards_verify(args) -> int:
    report = verify_dataset(args.url, checksums=args.checksums)
    print(report.summary())
    if not report.ok:
        print(f"amused: error: {len(report.errors)} problem(s) in {args.url}", file=sys.stderr)
        return 1
    return 0


def _shards_inspect(args) -> int:
    info = inspect_dataset(args.url, max_rows=args.max_rows)
    print(json.dumps(info, indent=1) if args.json else format_inspect(info))
    if args.grid:
        print(f"decoded tokens of the first rows: {reconstruction_grid(args.url, args.grid, vqgan=args.vqgan)}")
    return 0


def _train(args) -> int:
    cfg = _progress_off(load_config(args.config)) if args.quiet else load_config(args.config)
    if args.ray_workers:
        with _ray_log(args, cfg.run_dir):
            result = launch.train_on_ray(cfg, workers=args.ray_workers, gpus_per_worker=args.gpus_per_worker,
                                         address=args.ray_address)
    else:
        result = uvit_task.train(cfg)
    if os.environ.get("RANK", "0") == "0":
        resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
        print(f"trained to step {result.step}{resumed}; checkpoint {result.checkpoint}; "
              f"metrics {os.path.join(result.run_dir, 'metrics.jsonl')} (plot: metrics.png): "
              f"{json.dumps(result.last_metrics)}")
    return 0


def _sample(args) -> int:
    if not args.output and not args.output_dir:
        raise ValueError("give --output (the grid) and/or --output-dir (one PNG per image)")
    if args.output_dir:
        inference.check_new_samples(args.output_dir)  # before any model loads
    grid = args.output or join(args.output_dir, inference.GRID)
    if args.mask and not args.image:
        raise ValueError("--mask needs --image (the picture to inpaint)")
    if args.pretrained and args.no_ema:
        raise ValueError("--no-ema picks a training checkpoint's raw weights; --pretrained has one set of weights")
    cfg, generator = config_from_args(SampleConfig, args), torch.Generator().manual_seed(args.seed)
    if args.checkpoint:
        model = inference.load_trained_model(args.checkpoint, ema=not args.no_ema)
        vqgan, text_encoder = inference.checkpoint_models(args.checkpoint, args.vqgan, args.text_encoder)
    else:
        model = inference.load_pretrained_model(args.pretrained)
        vqgan, text_encoder = args.vqgan or args.pretrained, args.text_encoder or args.pretrained
    if args.lora:
        inference.load_exported_adapters(model, args.lora)
    if args.lora_scale is not None and not lora.has_adapters(model):
        raise ValueError("--lora-scale weighs adapters: add --lora DIR (or sample a LoRA checkpoint)")
    scale = 1.0 if args.lora_scale is None else args.lora_scale
    if args.quantize:
        if lora.has_adapters(model):  # quantized adapters would lose the scale: fold them in at it first
            model, scale = export.merge_adapters(model, scale), 1.0
        model = quantize.quantize_uvit(model, args.quantize, args.device)
    sampler = inference.Sampler.from_folders(model, vqgan, text_encoder, device=args.device, lora_scale=scale)
    if args.image:
        image = tokenizer_image.fit_image(Image.open(args.image).convert("RGB"), sampler.side)
    if args.mask:
        mask = tokenizer_image.fit_image(Image.open(args.mask).convert("L"), sampler.side, Image.Resampling.NEAREST)
        tokens = sampler.inpaint(args.prompt, image, mask, cfg, generator)
    elif args.image:
        tokens = sampler.vary(args.prompt, image, args.strength, cfg, generator)
    else:
        tokens = sampler.generate(args.prompt, cfg, generator)
    images = sampler.decode(tokens)
    if args.output_dir:  # before the grid, which may lie in the folder
        made_by = {"model": args.checkpoint or args.pretrained, "weights": "raw" if args.no_ema else "ema",
                   "device": args.device}
        made_by |= {k: v for k, v in (("lora", args.lora), ("lora_scale", args.lora_scale), ("quantize", args.quantize),
                                       ("image", args.image), ("mask", args.mask)) if v is not None}
        if args.image and not args.mask:
            made_by["strength"] = args.strength
        inference.save_images(images, args.prompt, args.output_dir, cfg, args.seed, extra=made_by)
    save_png(image_grid(images, args.prompt, columns=min(4, len(images)), cell=max(128, images.shape[1])), grid)
    each = f" and one PNG each in {args.output_dir}" if args.output_dir else ""
    print(f"{len(images)} image(s) of {images.shape[2]}x{images.shape[1]} written to {grid}{each}")
    return 0


def _export(args) -> int:
    weights = "raw" if args.no_ema else "EMA"
    if args.lora and args.quantize:
        raise ValueError("--quantize applies to a whole pipeline (and --merge-lora), not to --lora adapters")
    if args.lora and (args.variant or args.base_model):
        raise ValueError("--variant/--base-model apply to a whole pipeline (and --merge-lora), not to --lora adapters")
    if args.lora:
        if args.vqgan or args.text_encoder:
            raise ValueError("--vqgan/--text-encoder do not apply to --lora: the folder holds the U-ViT's adapters only")
        out = export.export_adapters(args.checkpoint, args.output, ema=not args.no_ema)
        print(f"exported the {weights} LoRA adapters of {args.checkpoint} to {out} (diffusers' "
              "AmusedLoraLoaderMixin reads them; amused sample --lora DIR samples with them)")
        return 0
    vqgan, text_encoder = inference.checkpoint_models(args.checkpoint, args.vqgan, args.text_encoder)
    out = export.export_pipeline(args.checkpoint, args.output, vqgan, text_encoder, ema=not args.no_ema,
                                 merge_lora=args.merge_lora, quantize=args.quantize, variant=args.variant,
                                 license=args.license, base_model=args.base_model)
    merged = " with its LoRA adapters merged" if args.merge_lora else ""
    opens = ("diffusers.AmusedPipeline.from_pretrained(folder, torch_dtype=torch.float32) opens it with the U-ViT "
             f"{args.quantize}-quantized; for inference only" if args.quantize
             else "diffusers.AmusedPipeline.from_pretrained opens it" + (
                 f" (half precision: variant='{args.variant}', torch_dtype=torch.float16)" if args.variant else ""))
    print(f"exported {weights} weights of {args.checkpoint}{merged} to {out} ({opens})")
    return 0


def _finetune_style(args) -> int:
    result = styledrop.finetune_style(args.image, args.pretrained, args.output, args.subjects, prompt=args.prompt,
                                      steps=args.steps, lr=args.lr, config=args.config or styledrop.DEFAULT_CONFIG,
                                      keys=styledrop.parse_keys(args.keys))
    print(f"style adapters: {result['checkpoint']} (step {result['step']}); samples: {result['grid']}")
    return 0


def _evaluate(args) -> int:
    results = evaluation.evaluate(config_from_args(EvalConfig, args), config_from_args(SampleConfig, args),
                                  checkpoint=args.checkpoint or "", run_dir=args.run or "", poll_seconds=args.poll,
                                  timeout_seconds=args.timeout, ray_address=args.ray_address)
    for r in results:
        print(f"step {r['step']}: {', '.join(m.show(r) for m in metrics.METRICS)}  ({r['seconds']} s)")
    if not results:
        print("nothing to evaluate: every complete checkpoint already has a result")
    return 0


def _fid_stats(args) -> int:
    report = evaluation.fid_reference(args.images, args.output, args.inception, resolution=args.resolution,
                                      max_images=args.max_images, batch_size=args.batch_size)
    print(json.dumps(report, indent=2))
    return 0


def _vqgan_train(args) -> int:
    cfg = vqgan_task.parse_vqgan_config(read_yaml(args.config))
    result = vqgan_task.train_vqgan(_progress_off(cfg) if args.quiet else cfg)
    m = result.last_metrics
    print(f"VQ-GAN trained to step {result.step}: PSNR {m.get('psnr_db', float('nan')):.2f} dB, codebook usage "
          f"{m.get('codebook_usage', float('nan')):.1%}; checkpoint {result.checkpoint}; "
          f"metrics in {result.run_dir}/metrics.jsonl and metrics.png")
    return 0


def _vqgan_export(args) -> int:
    print(f"VQModel written to {vqgan_task.export_vqgan(args.checkpoint, args.output)}")
    return 0


def _vqgan_evaluate(args) -> int:
    r = vq_evaluation.evaluate_vqgan(args.vqgan, args.images, args.output, resolution=args.resolution,
                                     batch_size=args.batch_size, max_images=args.max_images,
                                     inception=args.inception or "", device=args.device)
    rfid = "n/a (no --inception)" if r["rfid"] is None else f"{r['rfid']:.3f}"
    print(f"{r['images']} held-out images at {r['resolution']} px: PSNR {r['psnr_db']:.2f} dB, codebook usage "
          f"{r['codebook_usage']:.1%} (perplexity {r['codebook_perplexity']:.1f} of {r['codebook_size']}), rFID {rfid}; "
          f"skipped {r['skipped'] or 'none'}; {args.output}/reconstructions.png")
    return 0


def _run(args) -> int:
    cfg = run_config.load_run_config(args.config)
    with _ray_log(args, cfg.run_dir):
        run_graph.run(_progress_off(cfg) if args.quiet else cfg, only=args.only, start=args.start)
    print(run_status.status(cfg.run_dir))
    return 0


def _status(args) -> int:
    print(run_status.status(args.run_dir))
    return 0


def _compare(args) -> int:
    from amused.orchestration.compare import compare

    return compare(args.run_a, args.run_b)


def _config(args) -> int:
    cfg = run_config.load_run_config(args.file)
    print(dump_config(cfg) if args.config_command == "show" else f"{args.file}: valid")
    return 0


class Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: help shows each option's default once (HelpFormatter);
    subparsers are made of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


LOG_LEVELS = ("debug", "info", "warning", "error")
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "DIFFUSERS_VERBOSITY": "error", "TORCH_LOGS": "-all"}


def _version() -> str:
    try:
        return importlib.metadata.version("amused-pipeline")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="amused", description="aMUSEd data-and-training pipeline")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars and no log messages below errors: the result line and errors only")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="Python logging level (default: warning, error with --quiet); debug also leaves Ray's "
                             "start-up and C++ messages on the terminal instead of logs/ray.log in the run or "
                             "output folder")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="model folders").add_subparsers(dest="models_command", required=True)
    tiny = models.add_parser("tiny", help="write small random VQ-GAN, CLIP text, U-ViT and CLIP folders and an "
                                                 "Inception weights file")
    tiny.add_argument("out", help="new folder (vqgan/ text_encoder/ tokenizer/ transformer/ in it)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.set_defaults(func=_models_tiny)

    synth = sub.add_parser("synth", help="write webdataset shards of generated captioned images")
    synth.add_argument("out", help="folder for the shards NNNNN.tar")
    synth.add_argument("--shards", type=int, default=2, help="shards written")
    synth.add_argument("--per-shard", type=int, default=16, help="images per shard")
    synth.add_argument("--min-size", type=int, default=64, help="smallest image side in pixels")
    synth.add_argument("--max-size", type=int, default=160, help="largest image side in pixels")
    synth.add_argument("--seed", type=int, default=0, help="seed of the shapes, colours and sizes")
    synth.set_defaults(func=_synth)

    filt = sub.add_parser("filter", help="image-text metadata Parquet -> filtered, shuffled download shards (Ray)")
    add_config_args(filt, FilterConfig)
    filt.set_defaults(func=_filter)

    down = sub.add_parser("download", help="filtered metadata -> webdataset image shards (img2dataset)")
    add_config_args(down, DownloadConfig)
    down.set_defaults(func=_download)

    ing = sub.add_parser("ingest", help="your own images (a captioned folder, or a Hugging Face datasets "
                                        "dataset) -> webdataset shards like download's (Ray)")
    add_config_args(ing, IngestConfig)
    ing.set_defaults(func=_ingest)

    pre = sub.add_parser("pretokenize", help="webdataset image shards -> token dataset (Ray)")
    add_config_args(pre, PretokenizeConfig)
    pre.set_defaults(func=_pretokenize)

    train = sub.add_parser("train", help="DeepSpeed U-ViT training on a token dataset (resumes a run folder)")
    train.add_argument("config", help="training config YAML (see configs/train-small.yaml)")
    train.add_argument("--ray-workers", type=int, default=0, help="run under Ray Train with this many workers")
    train.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray Train: GPUs per worker")
    train.add_argument("--ray-address", default="", help="Ray cluster to join (empty: start a local one)")
    # The deepspeed launcher appends --local_rank; the rank comes from the environment.
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="images from a training checkpoint or a pipeline folder (MaskGIT decoding)")
    model = sample.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="RUN_DIR/checkpoints/step_N (local or s3://), full or LoRA")
    model.add_argument("--pretrained", help="an exported or released aMUSEd pipeline folder (local or s3://)")
    sample.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    sample.add_argument("--output", help="PNG grid, prompts under images (local or s3://); "
                                         "default: DIR/grid.png with --output-dir")
    sample.add_argument("--output-dir",
                        help="also write each image as its own PNG, NNN-<prompt>.png, into this folder (local or "
                             "s3://), its prompt, seed, index, device and sampler settings in the PNG's text "
                             "metadata; a folder that holds an earlier sample's images (NNN-*.png, grid.png) is "
                             "refused, so runs never overwrite or mix: one folder per run")
    sample.add_argument("--vqgan", help="default: the checkpoint config's model.vqgan, or the --pretrained folder")
    sample.add_argument("--text-encoder", help="default: the checkpoint config's model.text_encoder, or --pretrained")
    sample.add_argument("--seed", type=int, default=0, help="seed of the generator")
    sample.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    sample.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    sample.add_argument("--lora", help="LoRA adapters to add (a folder amused export --lora wrote; local or s3://)")
    sample.add_argument("--lora-scale", type=float,
                        help="the adapters' weight, as diffusers' lora scale (default: 1; 0 = the base alone)")
    sample.add_argument("--quantize", choices=("int8",),
                        help="int8 U-ViT linears with torchao (CPU: dynamic int8 activations, compiled; GPU: "
                             "int8 weights); the VQ-GAN and text encoder stay float")
    sample.add_argument("--image", help="start from this picture: a variation, or inpainting with --mask")
    sample.add_argument("--mask", help="inpainting: white = regenerate, black = keep (resized like --image)")
    sample.add_argument("--strength", type=float, default=0.5,
                        help="variation: fraction of the steps re-run (0.5 = the last 6 of 12)")
    add_config_args(sample, SampleConfig)
    sample.set_defaults(func=_sample)

    export = sub.add_parser("export", help="a checkpoint as a folder diffusers.AmusedPipeline.from_pretrained opens")
    export.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoints/step_N (local or s3://)")
    export.add_argument("--output", required=True, help="new folder (local or s3://)")
    export.add_argument("--vqgan", help="default: the checkpoint config's model.vqgan")
    export.add_argument("--text-encoder", help="default: the checkpoint config's model.text_encoder")
    export.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    lora = export.add_mutually_exclusive_group()
    lora.add_argument("--lora", action="store_true",
                      help="a LoRA checkpoint's adapters alone (pytorch_lora_weights.safetensors, diffusers' layout)")
    lora.add_argument("--merge-lora", action="store_true",
                      help="a LoRA checkpoint as a whole pipeline, its adapters merged into the base's weights")
    export.add_argument("--quantize", choices=("int8",),
                        help="write the U-ViT int8-quantized (torchao, as sample --quantize on CPU): for inference")
    export.add_argument("--variant", choices=("fp16",),
                        help="also write every weights file in half precision (*.fp16.safetensors, beside the fp32 "
                             "ones, as the released aMUSEd repositories ship); diffusers loads them with "
                             "from_pretrained(folder, variant='fp16', torch_dtype=torch.float16)")
    export.add_argument("--license", default=DEFAULT_LICENSE,
                        help="the model card's license field (README.md in the folder); as given here, the released "
                             "aMUSEd weights' license, which a fine-tune of them inherits: set your own for a model "
                             "trained from scratch. Rerun into the same folder to change it (only the card is "
                             "rewritten)")
    export.add_argument("--base-model",
                        help="the model card's base_model: the Hub id of the base a fine-tune started from (default: "
                             "found when model.pretrained lies in the Hugging Face cache, else none)")
    export.set_defaults(func=_export)

    style = sub.add_parser("finetune-style", help="StyleDrop: LoRA adapters that learn the style of one image "
                                                   "(configs/styledrop.yaml); a rerun continues")
    style.add_argument("--image", required=True, help="the style image (local or s3://)")
    style.add_argument("--subject", dest="subjects", action="append", required=True,
                       help="what the image shows; repeat for more wordings (one caption each)")
    style.add_argument("--prompt", help='caption template, {} = the subject (default "A {} in [V] style")')
    style.add_argument("--pretrained", required=True, help="the base: an exported or released aMUSEd pipeline folder")
    style.add_argument("--output", required=True, help="the fine-tune's folder: data/, train/, samples/")
    style.add_argument("--steps", type=int, help="default: the config's train.steps")
    style.add_argument("--lr", type=float, help="default: the config's train.optim.lr")
    style.add_argument("--config", help="default: configs/styledrop.yaml")
    style.add_argument("--set", dest="keys", action="append", default=[], metavar="KEY=VALUE",
                       help="any config key, dotted (train.checkpoint.every=50); the value is YAML")
    style.set_defaults(func=_finetune_style)

    ev = sub.add_parser("evaluate", help="FID, CLIP score and a sample grid of a checkpoint or a run (Ray actors)")
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="RUN_DIR/checkpoints/step_N (local or s3://)")
    which.add_argument("--run", help="RUN_DIR (local or s3://): every complete checkpoint without a result")
    ev.add_argument("--poll", type=float, default=30.0, help="watcher: seconds between looks")
    ev.add_argument("--timeout", type=float, default=0.0, help="watcher: give up after this many seconds (0 = never)")
    ev.add_argument("--ray-address", default=None, help="Ray cluster (default: a local one)")
    add_config_args(ev, EvalConfig)
    add_config_args(ev, SampleConfig)
    ev.set_defaults(func=_evaluate)

    fid = sub.add_parser("fid-stats", help="FID reference statistics of real images (webdataset shards)")
    fid.add_argument("--images", required=True, help="webdataset shards: a folder, a .tar or a glob (local or s3)")
    fid.add_argument("--output", required=True, help="statistics file (.npz)")
    fid.add_argument("--inception", required=True, help="FID Inception weights file")
    fid.add_argument("--resolution", type=int, default=256, help="shorter side resized to this, centre-cropped")
    fid.add_argument("--max-images", type=int, default=0, help="0 = all")
    fid.add_argument("--batch-size", type=int, default=32, help="images per Inception batch")
    fid.set_defaults(func=_fid_stats)

    vq = sub.add_parser("vqgan", help="the image tokenizer").add_subparsers(dest="vqgan_command", required=True)
    vq_train = vq.add_parser("train", help="train or fine-tune a VQ-GAN on webdataset image shards (DeepSpeed)")
    vq_train.add_argument("config", help="YAML (training/vqgan/task.py: VQGANConfig)")
    vq_train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    vq_train.set_defaults(func=_vqgan_train)
    vq_export = vq.add_parser("export", help="a VQ-GAN checkpoint as a VQModel folder")
    vq_export.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoints/step_N (local or s3://)")
    vq_export.add_argument("--output", required=True, help="new VQModel folder (local or s3://)")
    vq_export.set_defaults(func=_vqgan_export)
    vq_eval = vq.add_parser("evaluate", help="PSNR, codebook usage, rFID and a reconstruction PNG on held-out images")
    vq_eval.add_argument("--vqgan", required=True, help="VQModel folder or pipeline folder with vqvae/")
    vq_eval.add_argument("--images", required=True, help="held-out webdataset shards (folder, .tar or glob)")
    vq_eval.add_argument("--output", required=True, help="folder for vqgan_eval.json and reconstructions.png")
    vq_eval.add_argument("--resolution", type=int, default=256, help="shorter side resized to this, centre-cropped")
    vq_eval.add_argument("--batch-size", type=int, default=16, help="images per VQ-GAN batch")
    vq_eval.add_argument("--max-images", type=int, default=0, help="0 = all")
    vq_eval.add_argument("--inception", help="FID Inception weights file: adds reconstruction FID")
    vq_eval.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    vq_eval.set_defaults(func=_vqgan_evaluate)

    run = sub.add_parser("run", help="the whole run graph from one config; resumes and skips what is done")
    run.add_argument("config", help="run config YAML (orchestration/run_config.py; configs/demo.yaml)")
    run.add_argument("--only", action="append", metavar="STAGE", help="run just this stage (repeatable)")
    run.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and the ones after it")
    run.set_defaults(func=_run)
    st = sub.add_parser("status", help="a run's stages, progress, counts, latest checkpoint and metrics")
    st.add_argument("run_dir", help="the run folder (a config's run_dir; local or s3://)")
    st.set_defaults(func=_status)
    cmp = sub.add_parser("compare", help="two runs of a config, stage by stage: which files differ and the first "
                                         "stage that does (exit 1 if any)")
    cmp.add_argument("run_a", help="a run folder (local or s3://), moved aside if the second run used its path")
    cmp.add_argument("run_b", help="the other run folder")
    cmp.set_defaults(func=_compare)
    config = sub.add_parser("config", help="run configs").add_subparsers(dest="config_command", required=True)
    for name, text in (("validate", "check a run config (types, ranges, derived keys) without running"),
                       ("show", "print a run config with every default and derived path filled in")):
        c = config.add_parser(name, help=text)
        c.add_argument("file", help="run config YAML")
        c.set_defaults(func=_config)

    shards = sub.add_parser("shards", help="token datasets").add_subparsers(dest="shards_command", required=True)
    verify = shards.add_parser("verify", help="check manifest, files, checksums, row counts, dtypes and shapes")
    verify.add_argument("url", help="token dataset folder (local or s3://)")
    verify.add_argument("--checksums", action=argparse.BooleanOptionalAction, default=True,
                        help="hash every shard against its sha256 in the manifest (--no-checksums: the other checks only)")
    verify.set_defaults(func=_shards_verify)
    inspect = shards.add_parser("inspect", help="rows, bytes per column, caption lengths, codebook usage")
    inspect.add_argument("url", help="token dataset folder (local or s3://)")
    inspect.add_argument("--max-rows", type=int, default=100_000, help="rows read for the codebook statistics")
    inspect.add_argument("--json", action="store_true", help="print the figures as JSON")
    inspect.add_argument("--grid", help="write a PNG of the first rows' tokens decoded by the VQ-GAN")
    inspect.add_argument("--vqgan", help="VQ-GAN for --grid (default: the one recorded in the manifest)")
    inspect.set_defaults(func=_shards_inspect)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each message (Ray sessions move it; tests capture it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _setup_logging(level: str) -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not root.handlers:  # as logging.basicConfig: a host that configured logging (pytest, an embedding app) keeps it
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """os.environ with `values` set (child processes and Ray workers inherit them), then as before."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ray_log(args, *folders: str | None):
    """Ray sessions opened inside write Ray's messages to logs/ray.log of the first of `folders`
    given (a run folder, an output folder; plumbing.terminal.local_log), else of the run
    folder of --checkpoint, else of a folder of this user's in the temp folder (a shared
    head node's /tmp: another user's file would not open); with --log-level debug, to the
    terminal. The path and its size before go into args.ray_logs, for `main`'s error line."""
    if args.log_level == "debug":
        return ray_log(None)
    run, found, _ = (getattr(args, "checkpoint", None) or "").rstrip("/").rpartition("/checkpoints/")
    given = [f for f in (*folders, run if found else None) if f]
    path = (local_log(given[0], "ray.log") if given
            else os.path.join(tempfile.gettempdir(), f"amused-{_user()}", "logs", "ray.log"))
    args.ray_logs = [*getattr(args, "ray_logs", []), (path, _size(path))]
    return ray_log(path)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return str(os.getuid())


def _size(path: str) -> int:
    """The file's size, -1 when there is none."""
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _ray_messages(args) -> str:
    """' (Ray's messages: PATH)' for the Ray log this command wrote to, if any: the first line
    of an error may hide a cause (a C++ build error, an img2dataset failure) that is in it."""
    written = [path for path, before in getattr(args, "ray_logs", []) if _size(path) > before]
    return f" (Ray's messages: {written[-1]})" if written else ""


def _progress_off(cfg):
    """`cfg` with every (nested) config's `progress` switch off (--quiet); progress never changes
    what a stage writes, so its fingerprints stay."""
    if not dataclasses.is_dataclass(cfg):
        return cfg
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        new = False if f.name == "progress" and isinstance(value, bool) else _progress_off(value)
        if new is not value:
            changes[f.name] = new
    return dataclasses.replace(cfg, **changes) if changes else cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level or ("error" if args.quiet else "warning"))
    # Each library's own switch, here and in child processes: tqdm's for every bar that does not
    # decide for itself (img2dataset's, the evaluation's), Hugging Face's and torch's loggers,
    # which keep their own handlers; a stage's own bars follow its progress flag. A variable the
    # user set wins.
    quiet = {k: v for k, v in QUIET_ENV.items() if k not in os.environ} if args.quiet else {}
    if args.quiet and "progress" in vars(args):
        args.progress = False
    try:
        with _environ(quiet), _ray_log(args, getattr(args, "run", None), getattr(args, "output", None)):
            return args.func(args)
    except Exception as exc:
        if os.environ.get("AMUSED_DEBUG"):
            raise
        print(f"amused: error: {type(exc).__name__}: {exc}".splitlines()[0] + _ray_messages(args), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
