"""Fast checks of ingest without Ray: IngestConfig and a run's `source` refuse what cannot
work before any work, with one line naming the key, and whether the inputs are there only
where ingest is to run; the ingest stage replaces filter and download for a folder of
images, and takes over download's shards only after the run removed them; its settings
reach the fingerprints of the stages after it, while a fetched source's runs keep the
fingerprints they had. The input side: which files of a datasets folder are read, how
little of them a shard task reads, caption tables, and what a rerun refuses."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from amused.orchestration.run import _fingerprint, _remove_stale, plan, read_state, run
from amused.orchestration.run_config import parse_run_config
from amused.orchestration.stages import STAGES
from amused.orchestration.status import status
from amused.pipeline.ingest import (
    IngestConfig,
    _check_or_start_job,
    _dataset_files,
    _plan,
    _table_rows,
    ingest,
    write_shard,
)
from tests.ingest_samples import images_run, write_folder
from tests.samples import demo_config, photo, save

pytestmark = pytest.mark.unit


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "t.csv").write_text("file,caption\n")
    return tmp_path


@pytest.mark.parametrize("kw,message", [
    ({}, "give exactly one of images"),
    ({"images": "IN", "hf_dataset": "IN"}, "give exactly one of images"),
    ({"hf_dataset": "IN", "captions": "CSV"}, "captions: a caption table goes with images"),
    ({"images": "IN", "captions": "IN/c.txt"}, r"captions: .* is not a \.csv, \.jsonl, \.json, \.parquet file"),
    ({"images": "IN", "samples_per_shard": 0}, "samples_per_shard: 0 must be >= 1"),
    ({"images": "IN", "encode_quality": 0}, "encode_quality: 0 must be a JPEG quality"),
    ({"images": "IN", "caption_column": " "}, "caption_column: empty name"),
])
def test_ingest_config_refuses_with_one_line(folder, kw, message):
    paths = {"IN": str(folder / "in"), "NO": str(folder / "missing"), "CSV": str(folder / "t.csv")}
    kw = {k: paths.get(v, v.replace("IN", paths["IN"])) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=message):
        IngestConfig(output=str(folder / "out"), **kw)


@pytest.mark.parametrize("kw,message", [
    ({"images": "NO"}, "ingest.images: no folder at "),
    ({"hf_dataset": "NO"}, "ingest.hf_dataset: no dataset at "),
    ({"images": "IN", "captions": "IN/c.csv"}, "ingest.captions: no file at "),
])
def test_ingest_refuses_a_missing_input_before_any_work(folder, kw, message):
    paths = {"IN": str(folder / "in"), "NO": str(folder / "missing")}
    cfg = IngestConfig(output=str(folder / "out"), **{k: paths.get(v, v.replace("IN", paths["IN"]))
                                                      for k, v in kw.items()})
    with pytest.raises(ValueError, match=message):
        ingest(cfg)
    assert not (folder / "out").exists()


def test_source_folder_is_checked_where_ingest_is_to_run_not_on_parse(folder):
    """A run's source folder is needed only while ingest is to do: `amused run` then fails
    before it writes anything; once ingest is done, the run and `amused status` go on
    without it (photos moved, an S3 run read on another machine)."""
    cfg = images_run(folder)
    cfg["source"] = {"images": str(folder / "nowhere")}
    parsed = parse_run_config(cfg)
    with pytest.raises(ValueError, match="source.images: no folder at .*/nowhere"):
        run(parsed)
    assert not (folder / "run/config.yaml").exists() and not (folder / "run/stages").exists()
    # Ingest done with these settings: the snapshot parses and status reads it.
    (folder / "run/stages").mkdir(parents=True)
    (folder / "run/config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "run/stages/ingest.json").write_text(json.dumps(
        {"status": "done", "fingerprint": plan(parsed)["ingest"][0], "seconds": 1.0, "counts": {"shards": 1}}))
    assert "ingest" in status(str(folder / "run"))


def test_source_errors_at_parse_time(folder):
    cfg = images_run(folder)
    with pytest.raises(ValueError, match="give exactly one of .*; got metadata, images"):
        parse_run_config({**cfg, "source": {"images": str(folder / "in"), "metadata": "m.parquet"}})
    with pytest.raises(ValueError, match="source.captions: goes with images or hf_dataset, not metadata"):
        parse_run_config({**cfg, "source": {"metadata": "m.parquet", "captions": "c.csv"}})
    with pytest.raises(ValueError, match="filter: the filter stage does not run for source.images; remove"):
        parse_run_config({**cfg, "filter": {"min_width": 32}})
    with pytest.raises(ValueError, match="ingest.images is set by the run"):
        parse_run_config({**cfg, "ingest": {"images": "x"}})
    with pytest.raises(ValueError, match="ingest: the ingest stage does not run for source.synthetic"):
        parse_run_config({**demo_config(folder / "r", port=8765), "ingest": {"min_side": 8}})


def test_an_images_source_runs_ingest_instead_of_filter_and_download(folder, monkeypatch):
    monkeypatch.chdir(folder)
    cfg = parse_run_config(images_run(folder, captions="t.csv", caption_column="text"))
    on = {s.name for s in STAGES if s.enabled(cfg)}
    assert on == {"models", "ingest", "pretokenize", "train"}
    assert cfg.ingest.captions == str(folder / "t.csv") and cfg.ingest.caption_column == "text"
    assert cfg.ingest.output == cfg.pretokenize.input == str(folder / "run/data/images")
    hf = images_run(folder)
    hf["source"] = {"hf_dataset": "in", "image_column": "picture", "caption_column": "text"}
    cfg = parse_run_config(hf)
    assert (cfg.ingest.hf_dataset, cfg.ingest.images) == (str(folder / "in"), None)
    assert (cfg.ingest.image_column, cfg.ingest.caption_column) == ("picture", "text")


def _changed(base: dict, **edits) -> set[str]:
    new = {**base, **{k: {**base.get(k, {}), **v} for k, v in edits.items()}}
    before, after = plan(parse_run_config(base)), plan(parse_run_config(new))
    return {name for name in before if before[name][0] != after[name][0]}


def test_what_changes_the_shards_reruns_ingest_and_what_follows(folder):
    base = images_run(folder)
    after_ingest = {"ingest", "pretokenize", "train"}
    assert _changed(base, source={"caption_column": "text"}) == after_ingest
    assert _changed(base, ingest={"image_size": 256}) == after_ingest
    assert _changed(base, ingest={"samples_per_shard": 7}) == after_ingest
    assert _changed(base, ingest={"workers": 3, "progress": False}) == set()


def test_a_fetched_source_keeps_the_fingerprints_it_had(folder):
    """The ingest input was added to vqgan and pretokenize later: where it is off it adds
    nothing, so existing runs do not redo their finished stages."""
    planned = plan(parse_run_config(demo_config(folder / "r", port=8765)))
    assert planned["ingest"] == ("off", None)
    for name in ("vqgan", "pretokenize"):
        stage = next(s for s in STAGES if s.name == name)
        assert planned[name][0] == _fingerprint(planned[name][1], [planned[a][0] for a in stage.after])


# ----- a source kind changed: download's and ingest's shards --------------------------------------

def _state(run_dir, name: str, outputs: list[str]) -> None:
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    (run_dir / f"stages/{name}.json").write_text(json.dumps(
        {"stage": name, "status": "done", "fingerprint": "0" * 16, "settings": {}, "outputs": outputs, "seconds": 1}))


@pytest.mark.parametrize("was,now", [("download", "ingest"), ("ingest", "download")])
def test_a_changed_source_kind_removes_the_other_stages_shards(folder, was, now):
    """download and ingest both write DATA_DIR/images: when the source's kind changes, the
    stage turned off loses its shards and state before the other runs, as a changed stage
    does; an off stage whose outputs nothing writes now keeps them."""
    cfg = parse_run_config(images_run(folder) if now == "ingest" else demo_config(folder / "run", port=8765))
    images = folder / "run/data/images"
    images.mkdir(parents=True)
    (images / "00000_stats.json").write_text("{}")
    _state(folder / "run", was, [str(images)])
    filtered = folder / "run/data/filtered"  # filter's: off too for an images source, and nothing writes it
    filtered.mkdir()
    if now == "ingest":
        _state(folder / "run", "filter", [str(filtered)])
    log: list[str] = []
    _remove_stale(cfg, plan(cfg), {s.name for s in STAGES}, log.append)
    assert log == [f"[{was}] is off now, and {now} writes its outputs ({images}): removing them"]
    assert not images.exists() and read_state(str(folder / "run"), was) is None
    assert filtered.exists() and (now == "download" or read_state(str(folder / "run"), "filter"))
    # Not while the stage that writes them is not selected (the run then stops: it is not done).
    images.mkdir()
    _state(folder / "run", was, [str(images)])
    _remove_stale(cfg, plan(cfg), {"train"}, log.append)
    assert images.exists() and read_state(str(folder / "run"), was)


def test_ingest_refuses_a_folder_of_shards_it_did_not_write(folder):
    """Download's shards (a stats file marks one done) or state, without ingest's job file."""
    write_folder(folder / "in")
    for leftover in ("00000_stats.json", "00003.tar", "_amused/download.json"):
        out = folder / leftover.replace("/", "_")
        (out / leftover).parent.mkdir(parents=True)
        (out / leftover).write_text("{}")
        with pytest.raises(ValueError, match=f"{out} holds shards or state that ingest did not write "
                                             f"\\({leftover.split('/')[0]};.*use another output folder"):
            ingest(IngestConfig(output=str(out), images=str(folder / "in"), progress=False))
        assert not (out / "_amused/ingest.json").exists()


# ----- what a rerun refuses ---------------------------------------------------------------------

def _begun(cfg: IngestConfig) -> None:
    """What a first ingest records before its shards."""
    _check_or_start_job(cfg, _plan(cfg)[1])
    _check_or_start_job(cfg, _plan(cfg)[1])  # the same input again: resumed


def test_an_edited_caption_is_a_changed_input(folder):
    write_folder(folder / "in")
    cfg = IngestConfig(output=str(folder / "out"), images=str(folder / "in"), progress=False)
    _begun(cfg)
    sidecar = folder / "in/g1.txt"
    sidecar.write_text(sidecar.read_text().replace("1", "7"))  # the same size
    os.utime(sidecar, (1e9, 1e9))
    with pytest.raises(ValueError, match="from another input .*: changed input files"):
        ingest(cfg)
    (folder / "t.csv").write_text("file,caption\ng0.jpg,a photo\ng1.png,another\n")
    table = IngestConfig(output=str(folder / "out_t"), images=str(folder / "in"), captions=str(folder / "t.csv"))
    _begun(table)
    (folder / "t.csv").write_text("file,caption\ng0.jpg,a photo\ng1.png,anotheR\n")
    with pytest.raises(ValueError, match="another sample list"):
        ingest(table)
    with pytest.raises(ValueError, match=r"other settings \(min_side: 32 -> 40\)"):
        ingest(IngestConfig(**{**table.__dict__, "min_side": 40}))


# ----- caption tables -------------------------------------------------------------------------------

def test_a_json_caption_table_is_json_lines_or_an_array(folder):
    rows = [{"file": "a.jpg", "caption": "one"}, {"file": "b.jpg", "caption": "two"}]
    (folder / "t.json").write_text(json.dumps(rows, indent=2))
    cfg = IngestConfig(output=str(folder / "out"), images=str(folder / "in"), captions=str(folder / "t.json"))
    assert _table_rows(cfg) == [("a.jpg", "one"), ("b.jpg", "two")]
    (folder / "t.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _table_rows(cfg) == [("a.jpg", "one"), ("b.jpg", "two")]
    (folder / "t.json").write_text('{"file": "a.jpg", "caption": "one"}\n{"file": "b.jpg",\n')
    with pytest.raises(ValueError, match=r"t\.json: expected JSON lines \(one object per line\) or a JSON "
                                         r"array; line 2"):
        _table_rows(cfg)
    (folder / "t.json").write_text('[{"file": "a.jpg"}, 3]')
    with pytest.raises(ValueError, match=r"t\.json: row 2 is not a JSON object"):
        _table_rows(cfg)


# ----- a datasets folder -----------------------------------------------------------------------------

def _touch(root, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_a_datasets_folder_gives_the_files_of_its_split(tmp_path):
    """A Hub snapshot's data/{split}-*.parquet, a datasets cache's NAME-{split}.arrow beside
    its cache-*.arrow; files naming no split are one split; no file of the split: refused."""
    hub, cache, plain = tmp_path / "hub", tmp_path / "cache", tmp_path / "plain"
    _touch(hub, "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
           "data/test-00000-of-00001.parquet", ".cache/huggingface/data/train-00000-of-00002.parquet")
    _touch(cache, "pics-train.arrow", "pics-test.arrow", "cache-1f2e3d.arrow", "pics-validation-00000-of-00002.arrow")
    _touch(plain, "b.parquet", "a.parquet", "cache-9.arrow")

    def files(root, split="train"):
        return [p[len(str(root)) + 1:] for p in _dataset_files(str(root), split)]

    assert files(hub) == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert files(hub, "test") == ["data/test-00000-of-00001.parquet"]
    assert files(cache, "test") == ["pics-test.arrow"]
    assert files(cache, "validation") == ["pics-validation-00000-of-00002.arrow"]
    assert files(plain) == files(plain, "test") == ["a.parquet", "b.parquet"]
    with pytest.raises(ValueError, match="no data file names split 'valid'; found split.s. test, train "
                                         r"\(data/test-00000-of-00001.parquet, .*\); choose one with --split"):
        files(hub, "valid")
    _touch(tmp_path, "by_folder/train/0.parquet", "by_folder/test/0.parquet")
    assert files(tmp_path / "by_folder") == ["train/0.parquet"]


# ----- a shard task reads its own rows -----------------------------------------------------------------

def _rows(n: int) -> pa.Table:
    images = [save(photo(40, 40, seed=i), "PNG") for i in range(n)]
    return pa.table({"image": images, "caption": [f"photo {i}" for i in range(n)]})


def test_a_shard_task_reads_only_the_parquet_row_groups_of_its_rows(tmp_path):
    """Four row groups of 3 rows; shards of 4 rows: shard 1 (rows 4..7) needs groups 1 and 2.
    The others are made unreadable: reading them (the whole file) would fail the task."""
    path = tmp_path / "data.parquet"
    pq.write_table(_rows(12), path, row_group_size=3)
    meta, data = pq.ParquetFile(path).metadata, bytearray(path.read_bytes())
    for group in (0, 3):
        for c in range(meta.num_columns):
            col = meta.row_group(group).column(c)
            start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            data[start:start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(data))
    with pytest.raises(OSError):
        pq.read_table(path)
    cfg = IngestConfig(output=str(tmp_path / "out"), hf_dataset=str(path), samples_per_shard=4, progress=False)
    calls = _plan(cfg)[0]  # row counts from the footer: no data read
    assert [(c["start"], c["stop"]) for c in calls] == [(0, 4), (4, 8), (8, 12)]
    result = write_shard(cfg, **calls[1])
    assert result["stats"]["successes"] == 4
    captions = pq.read_table(tmp_path / "out/00001.parquet").column("caption").to_pylist()
    assert captions == [f"photo {i}" for i in range(4, 8)]


def test_a_shard_task_reads_an_arrow_stream_only_up_to_its_last_row(tmp_path):
    """save_to_disk's Arrow stream, four batches of 3 rows, cut off inside the third: the
    first shard (rows 0..3) reads the first two batches and stops."""
    batches = _rows(12).to_batches(max_chunksize=3)
    path = tmp_path / "data-00000-of-00001.arrow"
    for name, some in (("two.arrow", batches[:2]), (path.name, batches)):
        with pa.ipc.new_stream(tmp_path / name, batches[0].schema) as writer:
            for batch in some:
                writer.write_batch(batch)
    cfg = IngestConfig(output=str(tmp_path / "out"), hf_dataset=str(path), samples_per_shard=4, progress=False)
    calls = _plan(cfg)[0]
    assert calls[-1]["stop"] == 12
    # The two batches, then the start of the third (where "two.arrow" has its end marker).
    path.write_bytes(path.read_bytes()[:(tmp_path / "two.arrow").stat().st_size + 16])
    with pytest.raises(pa.ArrowInvalid, match="Expected to read"):
        pa.ipc.open_stream(path.read_bytes()).read_all()
    assert write_shard(cfg, **calls[0])["stats"]["successes"] == 4
    captions = pq.read_table(tmp_path / "out/00000.parquet").column("caption").to_pylist()
    assert captions == [f"photo {i}" for i in range(4)]
