"""A training checkpoint as a diffusers aMUSEd pipeline folder.

The folder (vqvae/, text_encoder/, tokenizer/, transformer/, scheduler/,
model_index.json) is what `diffusers.AmusedPipeline.from_pretrained` opens and what
`model.pretrained` / `model.vqgan` / `model.text_encoder` of a training config accept,
like the released aMUSEd folders. It is written under a temporary name, safetensors
only, and renamed (local) or uploaded then marked (remote) when complete, so a crash
never leaves a folder that looks exported.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from diffusers import AmusedPipeline, AmusedScheduler, VQModel

from amused.plumbing.fsio import upload_tree
from amused.plumbing.storage import VQGAN_SUBFOLDERS, is_local, local_folder, resolve_subfolder, url_to_fs
from amused.tokenizer.text import TextEncoder
from amused.training.inference.sample import load_trained_model

# What the folder was exported from: a rerun of the same export is a no-op.
SOURCE = "amused_export.json"
# Written last into a remote export: an s3 prefix cannot be renamed atomically.
EXPORT_COMPLETE = "model_index.json"


def export_pipeline(checkpoint: str, output: str, vqgan: str, text_encoder: str, ema: bool = True) -> str:
    """Writes the pipeline folder for `checkpoint` (EMA weights unless `ema=False`) to `output`."""
    fs, root = url_to_fs(output)
    source = {"checkpoint": str(Path(url_to_fs(checkpoint)[1]).resolve()) if is_local(checkpoint) else checkpoint,
              "weights": "ema" if ema else "raw",
              "vqgan": vqgan, "text_encoder": text_encoder}
    if fs.exists(f"{root.rstrip('/')}/{EXPORT_COMPLETE}"):
        recorded = f"{root.rstrip('/')}/{SOURCE}"
        if fs.exists(recorded) and json.loads(fs.cat_file(recorded)) == source:
            return output  # a rerun: this very export is already complete
        raise FileExistsError(f"{output} already holds another exported pipeline; choose another --output")
    transformer = load_trained_model(checkpoint, ema=ema)
    text = TextEncoder.from_pretrained(text_encoder, device="cpu")
    pipe = AmusedPipeline(
        vqvae=VQModel.from_pretrained(local_folder(resolve_subfolder(vqgan, VQGAN_SUBFOLDERS))),
        tokenizer=text.tokenizer, text_encoder=text.model, transformer=transformer,
        scheduler=AmusedScheduler(mask_token_id=transformer.config.vocab_size - 1, masking_schedule="cosine"))

    def write(staging: Path) -> None:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / SOURCE).write_text(json.dumps(source, indent=2))

    return publish_folder(output, write, EXPORT_COMPLETE)


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
