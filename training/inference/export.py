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
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
from diffusers.loaders import AmusedLoraLoaderMixin

from amused.plumbing.fsio import upload_tree
from amused.plumbing.storage import VQGAN_SUBFOLDERS, is_local, local_folder, resolve_subfolder, url_to_fs
from amused.tokenizer.text import TextEncoder
from amused.training.checkpoint import TRAINER, Checkpoint
from amused.training.config import parse_config
from amused.training.inference.quantize import ao_config, quantize_folder
from amused.training.inference.sample import LORA_PREFIX, LORA_WEIGHTS, load_trained_model, uses_ema
from amused.training.lora import ADAPTER, adapter_state_dict

# What the folder was exported from: a rerun of the same export is a no-op.
SOURCE = "amused_export.json"
# Written last into a remote export: an s3 prefix cannot be renamed atomically.
EXPORT_COMPLETE = "model_index.json"


def export_pipeline(checkpoint: str, output: str, vqgan: str, text_encoder: str, ema: bool = True,
                    merge_lora: bool = False, quantize: str | None = None) -> str:
    """Writes the pipeline folder for `checkpoint` (EMA weights unless `ema=False`) to `output`;
    a LoRA checkpoint only with `merge_lora` (its adapters merged into its base). `quantize`
    ("int8"): the transformer saved torchao-quantized for CPU, which diffusers reopens
    quantized (training/inference/quantize.py `quantize_folder`): an inference folder."""
    lora = _lora_of(checkpoint)
    if lora and not merge_lora:
        raise ValueError(f"{checkpoint} is a LoRA checkpoint: export --lora writes its adapters, "
                         "--merge-lora a whole pipeline with them merged into the base")
    if merge_lora and not lora:
        raise ValueError(f"--merge-lora: {checkpoint} is not a LoRA checkpoint (its config has lora.enabled false)")
    source = _source(checkpoint, ema) | {"vqgan": vqgan, "text_encoder": text_encoder}
    if merge_lora:
        source["lora"] = "merged"
    if quantize:
        ao_config(quantize, "cpu")  # an unknown mode fails before any work
        source["quantize"] = quantize
    if _already_exported(output, source, EXPORT_COMPLETE):
        return output
    transformer = load_trained_model(checkpoint, ema=ema)
    if merge_lora:
        transformer = merge_adapters(transformer)
    text = TextEncoder.from_pretrained(text_encoder, device="cpu")
    pipe = AmusedPipeline(
        vqvae=VQModel.from_pretrained(local_folder(resolve_subfolder(vqgan, VQGAN_SUBFOLDERS))),
        tokenizer=text.tokenizer, text_encoder=text.model, transformer=transformer,
        scheduler=AmusedScheduler(mask_token_id=transformer.config.vocab_size - 1, masking_schedule="cosine"))

    def write(staging: Path) -> None:
        pipe.save_pretrained(staging, safe_serialization=True)
        if quantize:
            quantize_folder(staging / "transformer", quantize, "cpu")
        (staging / SOURCE).write_text(json.dumps(source, indent=2))

    return publish_folder(output, write, EXPORT_COMPLETE)


def export_adapters(checkpoint: str, output: str, ema: bool = True) -> str:
    """Writes the adapters of a LoRA checkpoint (EMA unless `ema=False`) to the folder `output`."""
    lora = _lora_of(checkpoint)
    if not lora:
        raise ValueError(f"--lora: {checkpoint} is not a LoRA checkpoint (its config has lora.enabled false); "
                         "export it whole without --lora")
    source = _source(checkpoint, ema) | lora
    if _already_exported(output, source, LORA_WEIGHTS):
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


def _source(checkpoint: str, ema: bool) -> dict:
    ema = uses_ema(Checkpoint.at(checkpoint).config(parse_config), ema)
    return {"checkpoint": str(Path(url_to_fs(checkpoint)[1]).resolve()) if is_local(checkpoint) else checkpoint,
            "weights": "ema" if ema else "raw"}


def _already_exported(output: str, source: dict, complete: str) -> bool:
    """True when `output` holds this very export (a rerun is a no-op); refuses a folder
    holding another one."""
    fs, root = url_to_fs(output)
    if not fs.exists(f"{root.rstrip('/')}/{complete}"):
        return False
    recorded = f"{root.rstrip('/')}/{SOURCE}"
    if fs.exists(recorded) and json.loads(fs.cat_file(recorded)) == source:
        return True
    raise FileExistsError(f"{output} already holds another export; choose another --output")


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
