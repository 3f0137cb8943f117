"""`amused ingest` and the run's images / hf_dataset sources: a user's own captioned
folder (sidecar files, a CSV / JSONL / Parquet table) or a `datasets` dataset made here
becomes img2dataset-style shards that the strict shard reader, pretokenize and a run read
unchanged; bad images are counted by reason; a rerun writes only the missing shards, to
the same bytes; S3 output."""

import json
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from amused.orchestration.cli import main
from amused.orchestration.run import run
from amused.orchestration.run_config import parse_run_config
from amused.pipeline.ingest import IngestConfig, ingest
from amused.pipeline.pretokenize import list_input_shards
from amused.pipeline.wds import caption_of, metadata_of, shard_samples
from amused.training.vqgan.data import ImageCropReader, held_out_batches
from tests.ingest_samples import GOOD, images_run, write_folder
from tests.samples import awkward_samples, photo, save


def read_output(url: str) -> list:
    """(key, image extension, caption, json) of every sample, through the readers the later stages use."""
    out = []
    for tar in list_input_shards(url):
        for s in shard_samples(tar):  # checks the stats file's count too
            out.append((s.key, s.image[0], caption_of(s), metadata_of(s)))
    return out


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sidecar_folder_counts_bad_images_and_the_readers_take_the_shards(ray_session, tmp_path):
    expected = write_folder(tmp_path / "in")
    report = ingest(IngestConfig(output=str(tmp_path / "out"), images=str(tmp_path / "in"), samples_per_shard=4,
                                 progress=False))
    good = sorted(n for n, r in expected.items() if r is None)
    assert report.ok and report.samples == len(expected) and report.successes == len(good)
    assert report.skipped == dict(Counter(r for r in expected.values() if r))
    assert report.shards_total == report.shards_written == 5
    samples = read_output(str(tmp_path / "out"))
    by_url = {meta["url"]: (key, ext, caption, meta) for key, ext, caption, meta in samples}
    assert sorted(by_url) == good
    key, ext, caption, meta = by_url["g1.png"]
    assert (ext, caption, meta["status"]) == ("png", "photo number 1", "success")
    assert (meta["original_width"], meta["original_height"], meta["width"], meta["height"]) == (68, 52, 68, 52)
    assert by_url["sub/g4.jpg"][1] == "jpg"
    assert by_url["w_animated.jpg"][1] == "gif"  # the decoded format's extension, bytes kept
    assert (by_url["w_exifrot.jpg"][3]["original_width"], by_url["w_exifrot.jpg"][3]["original_height"]) == (120, 160)
    # Keys: shard number, then the sample's place in its shard (skipped ones keep theirs).
    assert [k for k, *_ in samples] == sorted(k for k, *_ in samples) and samples[0][0] == "000000"
    stats = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*_stats.json"))]
    assert sum(s["count"] for s in stats) == len(expected) and sum(s["successes"] for s in stats) == len(good)
    assert all(s["count"] == s["successes"] + s["failed_to_download"] + s["failed_to_resize"] for s in stats)
    rows = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet"))).to_pylist()
    assert {r["url"]: r["status"] for r in rows} == {n: r or "success" for n, r in expected.items()}
    # The VQ-GAN trainer's reader and the FID reference's take them as they are.
    assert tuple(next(ImageCropReader(str(tmp_path / "out"), resolution=32, batch_size=4)).shape) == (4, 3, 32, 32)
    skipped = Counter()
    assert sum(len(b) for b in held_out_batches(str(tmp_path / "out"), 32, 8, skipped=skipped)) == len(good)
    assert not skipped


def test_rerun_writes_only_missing_shards_to_the_same_bytes(ray_session, tmp_path):
    write_folder(tmp_path / "in")
    cfg = IngestConfig(output=str(tmp_path / "out"), images=str(tmp_path / "in"), samples_per_shard=4, progress=False)
    ingest(cfg)
    before = file_bytes(tmp_path / "out")
    # A crash while shard 2 was written: its stats file (the marker) missing, its tar cut short.
    (tmp_path / "out/00002_stats.json").unlink()
    (tmp_path / "out/00002.tar").write_bytes(before["00002.tar"][:700])
    again = ingest(cfg)
    assert (again.shards_written, again.shards_already_done) == (1, 4)
    assert again.successes == len(GOOD) + 6 and file_bytes(tmp_path / "out") == before
    with pytest.raises(ValueError, match="ingested from another input or with other settings"):
        ingest(IngestConfig(**{**cfg.__dict__, "min_side": 40}))
    (tmp_path / "in/g0.txt").unlink()
    (tmp_path / "in/new.jpg").write_bytes(save(photo(), "JPEG"))
    with pytest.raises(ValueError, match="ingested from another input"):
        ingest(cfg)


def test_caption_tables_give_the_sidecar_folders_samples(ray_session, tmp_path):
    """CSV, JSONL and Parquet tables of the same rows (in the folder's order) write the same
    samples as sidecar files; a row naming a missing file and one without caption are counted."""
    expected = write_folder(tmp_path / "in")
    ingest(IngestConfig(output=str(tmp_path / "sidecar"), images=str(tmp_path / "in"), samples_per_shard=4,
                        progress=False))
    awkward = awkward_samples()
    rows = [{"path": n, "text": GOOD[n.rsplit("/")[-1]][1] if n[0] != "w" else
             (None if awkward[n[2:-4]][1] is None else awkward[n[2:-4]][1].decode("latin-1"))}
            for n in sorted(expected)]
    rows = [r for r in rows if r["path"] != "w_badutf8.jpg"]  # a table's text is already decoded
    rows.append({"path": "gone.jpg", "text": "a file that is not there"})
    (tmp_path / "t.csv").write_text("path,text\n" + "".join(f'{r["path"]},"{r["text"] or ""}"\n' for r in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    outputs = {}
    for name in ("t.csv", "t.jsonl", "t.parquet"):
        out = tmp_path / name.replace(".", "_")
        report = ingest(IngestConfig(output=str(out), images=str(tmp_path / "in"), captions=str(tmp_path / name),
                                     file_column="path", caption_column="text", samples_per_shard=4, progress=False))
        assert report.skipped["missing_file"] == 1
        assert report.skipped["empty_caption" if name == "t.csv" else "missing_caption"] == 1
        outputs[name] = read_output(str(out))
    sidecar = read_output(str(tmp_path / "sidecar"))
    assert outputs["t.csv"] == outputs["t.jsonl"] == outputs["t.parquet"]
    assert [(s[2], s[3]["url"], s[3]["sha256"]) for s in outputs["t.csv"]] == \
        [(s[2], s[3]["url"], s[3]["sha256"]) for s in sidecar]
    with pytest.raises(ValueError, match="no column 'caption' .*--caption-column"):
        ingest(IngestConfig(output=str(tmp_path / "x"), images=str(tmp_path / "in"),
                            captions=str(tmp_path / "t.csv"), file_column="path", progress=False))


def test_a_datasets_dataset_saved_to_disk_or_as_parquet(ray_session, tmp_path):
    """A `datasets` Dataset with an Image feature (bytes, and paths) and a caption column,
    saved with save_to_disk (two Arrow files, in a DatasetDict) or to_parquet."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files/p.png").write_bytes(save(photo(70, 50, seed=9), "PNG"))
    images = [{"bytes": save(img, "JPEG"), "path": name} for name, (img, _) in GOOD.items()]
    images += [{"bytes": b"not an image", "path": "bad.jpg"}, str(tmp_path / "files/p.png"),
               {"bytes": save(photo(), "JPEG"), "path": None}]
    captions = [c for _, c in GOOD.values()] + ["broken", "from a path", None]
    features = datasets.Features({"picture": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"picture": images, "text": captions}, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "saved"),
                                                                                   num_shards={"train": 2, "test": 1})
    ds.to_parquet(str(tmp_path / "parquet/data.parquet"))
    outputs = {}
    for name in ("saved", "parquet"):
        report = ingest(IngestConfig(output=str(tmp_path / f"out_{name}"), hf_dataset=str(tmp_path / name),
                                     image_column="picture", caption_column="text", samples_per_shard=3,
                                     progress=False))
        assert (report.samples, report.successes, report.skipped) == (8, 6, {"missing_caption": 1,
                                                                             "not_an_image": 1})
        outputs[name] = read_output(str(tmp_path / f"out_{name}"))
    # save_to_disk embeds a path's file and keeps its base name; to_parquet keeps the path.
    assert outputs["saved"][-1][3]["url"] == "p.png"
    assert [(*s[:3], {**s[3], "url": s[3]["url"].rsplit("/", 1)[-1]}) for s in outputs["parquet"]] == outputs["saved"]
    assert [s[2] for s in outputs["saved"]] == captions[:5] + ["from a path"]
    assert outputs["saved"][-1][3]["original_width"] == 70
    # One Parquet file whose image column holds paths, relative to its folder.
    pq.write_table(pa.table({"image": ["files/p.png", "files/gone.png"], "caption": ["a path", "no file"]}),
                   tmp_path / "paths.parquet")
    paths = ingest(IngestConfig(output=str(tmp_path / "out_paths"), hf_dataset=str(tmp_path / "paths.parquet"),
                                progress=False))
    assert (paths.successes, paths.skipped) == (1, {"missing_file": 1})
    test = ingest(IngestConfig(output=str(tmp_path / "out_test"), hf_dataset=str(tmp_path / "saved"), split="test",
                               image_column="picture", caption_column="text", progress=False))
    assert test.successes == 2
    with pytest.raises(ValueError, match="no split 'valid' .*--split"):
        ingest(IngestConfig(output=str(tmp_path / "x"), hf_dataset=str(tmp_path / "saved"), split="valid",
                            image_column="picture", caption_column="text", progress=False))


def test_s3_output_read_back_and_resumed(ray_session, s3_bucket, tmp_path):
    write_folder(tmp_path / "in")
    url = f"{s3_bucket}/ingest-{tmp_path.name}"
    cfg = IngestConfig(output=url, images=str(tmp_path / "in"), samples_per_shard=8, image_size=40, progress=False)
    first = ingest(cfg)
    samples = read_output(url)
    assert len(samples) == first.successes == 11
    assert all(ext == "jpg" and min(m["width"], m["height"]) == 40 for _, ext, _, m in samples)  # re-encoded, down
    assert samples[0][3]["original_width"] == 60
    fs = s3fs.S3FileSystem()
    tars = {p: fs.cat_file(p) for p in fs.glob(f"{url}/*.tar")}
    fs.rm(f"{url}/00001_stats.json")
    again = ingest(cfg)
    assert (again.shards_written, again.shards_already_done) == (1, 2)
    assert {p: fs.cat_file(p) for p in fs.glob(f"{url}/*.tar")} == tars
    # The folder itself on S3: the same shards.
    fs.put(str(tmp_path / "in"), f"{url}-in", recursive=True)
    ingest(IngestConfig(**{**cfg.__dict__, "images": f"{url}-in", "output": str(tmp_path / "local")}))
    assert {p.rsplit("/", 1)[-1]: b for p, b in tars.items()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "local").glob("*.tar")}


def test_run_with_an_images_source_through_pretokenize(ray_session, tiny_models, tmp_path, capsys):
    """`amused run` with `source: {images: DIR}` in a run that downloaded before: download's
    shards go, the ingest stage writes data/images, filter and download do not run,
    pretokenize reads the shards; a rerun skips both, and status reads the run, with the
    source folder moved away."""
    write_folder(tmp_path / "in")
    cfg = images_run(tmp_path, tiny_models)
    (tmp_path / "run/data/images").mkdir(parents=True)
    (tmp_path / "run/data/images/00000_stats.json").write_text('{"count": 5, "successes": 5}')
    (tmp_path / "run/stages").mkdir()
    (tmp_path / "run/stages/download.json").write_text(json.dumps(
        {"status": "done", "fingerprint": "0" * 16, "outputs": [str(tmp_path / "run/data/images")]}))
    log: list[str] = []
    states = run(parse_run_config(cfg), only=["ingest", "pretokenize"], log=log.append)
    assert log[0] == f"[download] is off now, and ingest writes its outputs ({tmp_path}/run/data/images): removing them"
    assert set(states) == {"ingest", "pretokenize"}
    assert states["ingest"]["counts"]["ingested"] == states["pretokenize"]["counts"]["tokenized"] == 11
    assert states["ingest"]["counts"]["skipped"]["too_small"] == 1
    assert (tmp_path / "run/data/images/00000_stats.json").exists()
    assert main(["status", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    assert "ingest       done" in table and "1 shards" in table and "filter" not in table
    log.clear()
    (tmp_path / "in").rename(tmp_path / "moved")
    run(parse_run_config(cfg), only=["ingest", "pretokenize"], log=log.append)
    assert main(["status", str(tmp_path / "run")]) == 0
    assert log == ["[ingest] done (%.1fs), skipped" % states["ingest"]["seconds"],
                   "[pretokenize] done (%.1fs), skipped" % states["pretokenize"]["seconds"]]
