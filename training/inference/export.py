"""A training checkpoint as a diffusers aMUSEd pipeline folder.

The folder (vqvae/, text_encoder/, tokenizer/, transformer/, scheduler/,
model_index.json) is what `diffusers.AmusedPipeline.from_pretrained` opens and what
`model.pretrained` / `model.vqgan` / `model.text_encoder` of a training config accept,
like the released aMUSEd folders. It is written under a temporary name, safetensors
only, and renamed (local) or uploaded then marked (remote) when complete, so a crash
never leaves a folder that looks exported.

A LoRA run's checkpoint exports either as its adapters alone (`export_adapters`: the
folder diffusers' `AmusedLoraLoaderMixin` reads, `pytorch_lora_weights.safetensors`,
keys `transformer.<module>.lora_A.weight`, rank and alpha in the file's LoRA metadata
as diffusers writes them) or merged into its base as a whole pipeline folder
(`export_pipeline(..., merge_lora=True)`).

Like the released aMUSEd repositories, a pipeline folder holds the complete tokenizer
(slow and fast files: transformers 4.x's CLIPTokenizer, which model_index.json names,
needs vocab.json and merges.txt; tokenizer/text.py `save_tokenizer`), a model card
(README.md, training/inference/card.py) and, with `variant="fp16"`, every weights file
also in half precision under diffusers' variant name (`*.fp16.safetensors`, loaded with
`from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)`). The fp32 files
are always written beside them, as the released repositories ship both: they are what
training continues from, what `load_pretrained_model` and a plain `from_pretrained`
read, and their configs name fp32. `amused_export.json` records where the weights came
from portably: the checkpoint relative to its run folder, with the run's URL when it is
remote, the weights' sha256 from the checkpoint's marker, and the VQ-GAN and text
encoder relative to the run folder (or their URLs), never a machine's absolute path, and
what the card was made of (license, base_model, the card's sha256). The exported VQ-GAN's
config asks diffusers to decode in fp32 (`force_upcast`), as the fp16 variant needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
from diffusers.loaders import AmusedLoraLoaderMixin

from amused.pipeline.shards import read_manifest
from amused.plumbing.fsio import atomic_writer, file_exists, read_json, sha256_of, upload_tree
from amused.plumbing.storage import VQGAN_SUBFOLDERS, is_local, join, local_folder, resolve_subfolder, url_to_fs
from amused.tokenizer.text import TextEncoder, save_tokenizer
from amused.training.checkpoint import EMA_WEIGHTS, MARKER, MODEL_STATES, TRAINER, Checkpoint
from amused.training.config import TrainConfig, parse_config
from amused.training.inference.card import CARD, DEFAULT_LICENSE, CardFacts, hub_id_of, model_card
from amused.training.inference.quantize import ao_config, quantize_folder
from amused.training.inference.sample import LORA_PREFIX, LORA_WEIGHTS, load_trained_model, uses_ema
from amused.training.lora import ADAPTER, adapter_state_dict

# What the folder was exported from: a rerun of the same export is a no-op, or rewrites the card alone.
SOURCE = "amused_export.json"
# The record's keys that only the model card depends on: when only they differ, a rerun rewrites README.md.
CARD_KEYS = ("license", "base_model", "card_sha256")
# Written last into a remote export: an s3 prefix cannot be renamed atomically.
EXPORT_COMPLETE = "model_index.json"
# Half-precision copies of the weights, diffusers' variant naming (the released repositories' fp16 files).
VARIANTS = {"fp16": torch.float16}


def export_pipeline(checkpoint: str, output: str, vqgan: str, text_encoder: str, ema: bool = True,
                    merge_lora: bool = False, quantize: str | None = None, variant: str | None = None,
                    license: str = DEFAULT_LICENSE, base_model: str | None = None) -> str:
    """Writes the pipeline folder for `checkpoint` (EMA weights unless `ema=False`) to `output`;
    a LoRA checkpoint only with `merge_lora` (its adapters merged into its base). `quantize`
    ("int8"): the transformer saved torchao-quantized for CPU, which diffusers reopens
    quantized (training/inference/quantize.py `quantize_folder`): an inference folder.
    `variant` ("fp16"): every weights file also in that precision (`*.fp16.safetensors`)
    beside the fp32 ones. `license`, `base_model`: the model card's license and base_model
    fields (base_model: the Hub id of a fine-tune's base, by default found in the path of
    a base folder that lies in the Hugging Face cache). A rerun into a folder holding these
    very weights rewrites only its card, when that changed (another license or base_model,
    an evaluation of the checkpoint since); a folder holding other weights is refused."""
    lora = _lora_of(checkpoint)
    if lora and not merge_lora:
        raise ValueError(f"{checkpoint} is a LoRA checkpoint: export --lora writes its adapters, "
                         "--merge-lora a whole pipeline with them merged into the base")
    if merge_lora and not lora:
        raise ValueError(f"--merge-lora: {checkpoint} is not a LoRA checkpoint (its config has lora.enabled false)")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"--variant {variant}: not one of {sorted(VARIANTS)}")
    if variant and quantize:
        raise ValueError(f"--variant {variant} and --quantize {quantize}: a quantized U-ViT has no half-precision copy")
    trained = Checkpoint.at(checkpoint)
    source = _source(trained, ema) | {"vqgan": portable(vqgan, trained.run_dir),
                                       "text_encoder": portable(text_encoder, trained.run_dir)}
    if merge_lora:
        source["lora"] = "merged"
    if quantize:
        ao_config(quantize, "cpu")  # an unknown mode fails before any work
        source["quantize"] = quantize
    if variant:
        source["variant"] = variant
    cfg = trained.config(parse_config)
    base_model = base_model or (hub_id_of(cfg.model.pretrained) if cfg.model.pretrained else None)

    def card_of(transformer_config: dict, vqvae_config: dict) -> str:
        grid = transformer_config["sample_size"]
        return model_card(CardFacts(
            name=output.rstrip("/").rpartition("/")[2], source=source, cfg=cfg,
            resolution=grid * 2 ** (len(vqvae_config["block_out_channels"]) - 1), token_grid=grid,
            base_model=portable(cfg.model.pretrained, trained.run_dir) if cfg.model.pretrained else None,
            base_model_id=base_model, dataset=portable(cfg.data.dataset, trained.run_dir), manifest=_manifest(cfg),
            evaluation=_evaluation_of(trained, source["weights"]), variant=variant, license=license))

    def record(card: str) -> dict:
        """The source with what the card was made of (a later evaluation changes its text)."""
        return source | {"license": license, "base_model": base_model,
                         "card_sha256": hashlib.sha256(card.encode()).hexdigest()}

    recorded = _recorded(output, source, EXPORT_COMPLETE)
    if recorded is not None:  # these weights are there: only the card may be new (--license, an evaluation since)
        fs, root = url_to_fs(output)
        card = card_of(*(json.loads(fs.cat_file(f"{root.rstrip('/')}/{m}/config.json"))
                         for m in ("transformer", "vqvae")))
        if recorded != record(card):
            with atomic_writer(join(output, CARD)) as fh:  # the card first: a crash before the record redoes it
                fh.write(card.encode())
            with atomic_writer(join(output, SOURCE)) as fh:
                fh.write(json.dumps(record(card), indent=2).encode())
        return output
    transformer = load_trained_model(checkpoint, ema=ema)
    if merge_lora:
        transformer = merge_adapters(transformer)
    text = TextEncoder.from_pretrained(text_encoder, device="cpu")
    vqvae = VQModel.from_pretrained(local_folder(resolve_subfolder(vqgan, VQGAN_SUBFOLDERS)))
    # The aMUSEd VQ-GAN overflows to NaN in fp16 (pipeline/pretokenize.py); diffusers decodes in
    # fp32 only when the config says so, which a released VQ-GAN folder's config does not (VQModel
    # defaults it off). A config field only: the fp32 weights are unchanged.
    vqvae.register_to_config(force_upcast=True)
    pipe = AmusedPipeline(
        vqvae=vqvae, tokenizer=text.tokenizer, text_encoder=text.model, transformer=transformer,
        scheduler=AmusedScheduler(mask_token_id=transformer.config.vocab_size - 1, masking_schedule="cosine"))
    card = card_of(transformer.config, vqvae.config)

    def write(staging: Path) -> None:
        pipe.save_pretrained(staging, safe_serialization=True)
        save_tokenizer(text.tokenizer, staging / "tokenizer")  # transformers 5 writes only the fast files
        if variant:
            _write_variant(pipe, staging, variant)
        if quantize:
            quantize_folder(staging / "transformer", quantize, "cpu")
        (staging / CARD).write_text(card)
        (staging / SOURCE).write_text(json.dumps(record(card), indent=2))

    return publish_folder(output, write, EXPORT_COMPLETE)


def _write_variant(pipe: AmusedPipeline, staging: Path, variant: str) -> None:
    """The `variant` weights files of every model of `pipe` into `staging` beside its fp32
    ones; only the weights (and shard indexes): the configs stay those of the fp32 save,
    which name fp32, so a plain from_pretrained keeps loading fp32."""
    with tempfile.TemporaryDirectory(dir=staging.parent) as tmp:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):  # diffusers' own .to warns of an empty fp32 list (0.42.1)
                torch.nn.Module.to(component, VARIANTS[variant])
        pipe.save_pretrained(tmp, safe_serialization=True, variant=variant)
        written = [p for p in Path(tmp).rglob(f"*.{variant}.*") if p.is_file()]
        if not written:
            raise RuntimeError(f"diffusers wrote no {variant} variant files")
        for path in written:
            path.rename(staging / path.relative_to(tmp))


def export_adapters(checkpoint: str, output: str, ema: bool = True) -> str:
    """Writes the adapters of a LoRA checkpoint (EMA unless `ema=False`) to the folder `output`."""
    lora = _lora_of(checkpoint)
    if not lora:
        raise ValueError(f"--lora: {checkpoint} is not a LoRA checkpoint (its config has lora.enabled false); "
                         "export it whole without --lora")
    trained = Checkpoint.at(checkpoint)
    base = lora["base"] | {"path": portable(lora["base"]["path"], trained.run_dir)}
    source = _source(trained, ema) | lora | {"base": base}
    if _recorded(output, source, LORA_WEIGHTS) is not None:
        return output
    model = load_trained_model(checkpoint, ema=ema)

    def write(staging: Path) -> None:
        write_adapters(model, staging)
        (staging / SOURCE).write_text(json.dumps(source, indent=2))

    return publish_folder(output, write, LORA_WEIGHTS)


def write_adapters(model: UVit2DModel, folder: Path) -> None:
    """FOLDER/pytorch_lora_weights.safetensors: the model's adapters as diffusers' own LoRA
    writer lays them out, with their peft config (rank, alpha, targets) as its metadata, so
    a reader keeps alpha (without metadata diffusers would take alpha = rank)."""
    AmusedLoraLoaderMixin._save_lora_weights(  # the writer behind diffusers' save_lora_weights (0.42.1)
        folder, lora_layers={LORA_PREFIX: adapter_state_dict(model)},
        lora_metadata={LORA_PREFIX: model.peft_config[ADAPTER].to_dict()})


def merge_adapters(model: UVit2DModel, scale: float = 1.0) -> UVit2DModel:
    """The model with its adapters (at `scale`) added into the weights they adapt and
    removed: a plain UVit2DModel, the same state dict names as its base."""
    model.fuse_lora(lora_scale=scale)
    model.unload_lora()
    return model


def _lora_of(checkpoint: str) -> dict | None:
    """The adapter record of a LoRA checkpoint (training/lora.py `record`: the base's path and
    sha256, rank, alpha, targets, as its trainer state holds it), None for a full one."""
    trained = Checkpoint.at(checkpoint)
    if not trained.config(parse_config).lora.enabled:
        return None
    return json.loads(trained.file(TRAINER).read_text()).get("lora")


def _source(trained: Checkpoint, ema: bool) -> dict:
    """What an export is made of, without any machine's absolute path: the checkpoint's
    place in its run folder (plus the run's URL when remote), its step and the sha256 of
    the weights read (from its marker, or hashed here when the marker predates checksums),
    which tells two runs' same-named checkpoints apart."""
    ema = uses_ema(trained.config(parse_config), ema)
    weights = EMA_WEIGHTS if ema else MODEL_STATES
    sha256 = read_json(join(trained.folder, MARKER)).get("files", {}).get(weights, {}).get("sha256")
    # A checkpoint from before checksums: hashed here, else two runs' step_N would pass for one export.
    sha256 = sha256 or sha256_of(str(trained.weights(ema)))
    source = {"checkpoint": trained.folder.removeprefix(trained.run_dir).lstrip("/"), "step": trained.step,
              "weights": "ema" if ema else "raw", "sha256": sha256}
    if not is_local(trained.run_dir):
        source["run"] = trained.run_dir
    return source


def portable(url: str, run_dir: str) -> str:
    """`url` as an export records it: a URL as given; a local path relative to the local run
    folder `run_dir`, or, beside a remote run, by its folder name alone."""
    if not is_local(url):
        return url
    path = os.path.abspath(url_to_fs(url)[1])
    if not is_local(run_dir):
        return os.path.basename(path)  # a local folder beside a remote run: its name, no machine's path
    return os.path.relpath(path, os.path.abspath(url_to_fs(run_dir)[1]))


def _manifest(cfg: TrainConfig):
    """The training dataset's manifest, None when it cannot be read here (e.g. moved since)."""
    try:
        return read_manifest(cfg.data.dataset)
    except (OSError, ValueError):
        return None


def _evaluation_of(trained: Checkpoint, weights: str) -> dict | None:
    """The evaluation result of this checkpoint (its step, the same weights): RUN/eval/step_N.json,
    or, where `amused run` put the training run in RUN/train, the one in RUN/eval beside it."""
    for run in (trained.run_dir, trained.run_dir.rpartition("/")[0]):
        result = join(run, "eval", f"{trained.name}.json")
        if not run or not file_exists(result):
            continue
        found = read_json(result)
        if (found.get("step") == trained.step and found.get("weights", "ema") == weights
                and str(found.get("checkpoint", "")).rstrip("/").endswith(f"/checkpoints/{trained.name}")):
            return found
    return None


def _recorded(output: str, source: dict, complete: str) -> dict | None:
    """The record of the export at `output` when it is this very export (the same weights;
    its card may differ, CARD_KEYS), None when `output` holds no complete export; refuses a
    folder holding another one."""
    fs, root = url_to_fs(output)
    if not fs.exists(f"{root.rstrip('/')}/{complete}"):
        return None
    path = f"{root.rstrip('/')}/{SOURCE}"
    recorded = json.loads(fs.cat_file(path)) if fs.exists(path) else None
    if isinstance(recorded, dict) and _weights_part(recorded) == _weights_part(source):
        return recorded
    raise FileExistsError(f"{output} already holds another export; choose another --output")


def _weights_part(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in CARD_KEYS}


def publish_folder(url: str, write: Callable[[Path], None], complete: str) -> str:
    """`write(staging)` fills a temporary folder, which then replaces the folder at `url`
    (a leftover of an earlier attempt, which lacks the file `complete`). Local: a sibling
    folder and one rename. Remote (an object-store prefix cannot be renamed): a local
    folder whose files are uploaded, `complete` last, so the folder counts only whole."""
    fs, root = url_to_fs(url)
    if is_local(url):
        final = Path(root)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            write(staging)
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(final)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        write(staging)
        last = staging / complete
        if not last.is_file():
            raise FileNotFoundError(f"{url}: the export wrote no {complete}")
        upload_tree(staging, url, last=frozenset({complete}))
    return url
