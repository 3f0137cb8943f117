"""Material of the ingest tests: a captioned folder with awkward files, and a run config
whose source is a folder of images (through pretokenize, on tiny models)."""

from __future__ import annotations

from pathlib import Path

from tests.samples import awkward_samples, demo_config, photo, save

# Sorted file names, so that a caption table in this order lists the samples as the folder does.
GOOD = {f"g{i}.{'png' if i % 2 else 'jpg'}": (photo(60 + 8 * i, 48 + 4 * i, seed=i), f"photo number {i}")
        for i in range(5)}


def write_folder(root: Path) -> dict[str, str | None]:
    """The good photos (one in a sub-folder) and tests.samples' awkward files; returns each
    file's expected skip reason (None: ingested)."""
    expected = {}
    for name, (img, caption) in GOOD.items():
        path = root / ("sub/" + name if name == "g4.jpg" else name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(save(img, "PNG" if name.endswith("png") else "JPEG", quality=90))
        path.with_suffix(".txt").write_text(caption)
        expected[str(path.relative_to(root))] = None
    for name, (data, caption, reason) in awkward_samples().items():
        (root / f"w_{name}.jpg").write_bytes(data)
        if caption is not None:
            (root / f"w_{name}.txt").write_bytes(caption)
        expected[f"w_{name}.jpg"] = reason
    (root / ".hidden.jpg").write_bytes(b"editor leftovers are not samples")
    return expected


def images_run(tmp_path: Path, tiny_models: Path | None = None, **source) -> dict:
    """demo_config with `source: {images: tmp_path/in, **source}`: no filter, download, vqgan,
    evaluate or samples; the tiny models (their folders where given, else the models stage's)."""
    cfg = demo_config(tmp_path / "run")
    for key in ("filter", "download", "vqgan", "evaluate", "prompts"):
        cfg.pop(key)
    cfg["source"] = {"images": str(tmp_path / "in"), **source}
    cfg["models"] = {"text_encoder": str(tiny_models), "vqgan": str(tiny_models / "vqgan")} if tiny_models \
        else {"text_encoder": "tiny", "vqgan": "tiny"}
    cfg["pretokenize"] = {"resolution": 64, "batch_size": 8}
    cfg["train"]["model"] = {"preset": "tiny"}
    return cfg
