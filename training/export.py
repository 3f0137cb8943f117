"""A training checkpoint as a diffusers aMUSEd pipeline folder.

The folder (vqvae/, text_encoder/, tokenizer/, transformer/, scheduler/,
model_index.json) is what `diffusers.AmusedPipeline.from_pretrained` opens and what
`model.pretrained` / `model.vqgan` / `model.text_encoder` of a training config accept,
like the released aMUSEd folders. It is written under a temporary name, safetensors
only, and renamed (local) or uploaded then marked (remote) when complete, so a crash
never leaves a folder that looks exported.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tokenizer.storage import VQGAN_SUBFOLDERS, is_local, local_folder, resolve_subfolder, url_to_fs

# Written last into a remote export: an s3 prefix cannot be renamed atomically.
EXPORT_COMPLETE = "model_index.json"


def export_pipeline(checkpoint: str, output: str, vqgan: str, text_encoder: str, ema: bool = True) -> str:
    """Writes the pipeline folder for `checkpoint` (EMA weights unless `ema=False`) to `output`."""
    from diffusers import AmusedPipeline, AmusedScheduler, VQModel

    from tokenizer import TextEncoder
    from training.sample import load_trained_model

    fs, root = url_to_fs(output)
    if fs.exists(f"{root.rstrip('/')}/{EXPORT_COMPLETE}"):
        raise FileExistsError(f"{output} already holds an exported pipeline; choose another --output")
    transformer = load_trained_model(checkpoint, ema=ema)
    text = TextEncoder.from_pretrained(text_encoder, device="cpu")
    pipe = AmusedPipeline(
        vqvae=VQModel.from_pretrained(local_folder(resolve_subfolder(vqgan, VQGAN_SUBFOLDERS))),
        tokenizer=text.tokenizer, text_encoder=text.model, transformer=transformer,
        scheduler=AmusedScheduler(mask_token_id=transformer.config.vocab_size - 1, masking_schedule="cosine"))
    if is_local(output):
        final = Path(root)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            pipe.save_pretrained(staging, safe_serialization=True)
            if final.exists():
                shutil.rmtree(final)  # a folder without model_index.json: an earlier export's leftover
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(final)
    with tempfile.TemporaryDirectory() as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        index = Path(staging) / EXPORT_COMPLETE
        for file in sorted(p for p in Path(staging).rglob("*") if p.is_file() and p != index):
            fs.put_file(str(file), f"{root.rstrip('/')}/{file.relative_to(staging)}")
        fs.put_file(str(index), f"{root.rstrip('/')}/{EXPORT_COMPLETE}")
    return output
