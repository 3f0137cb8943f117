"""`amused compare`'s rules on hand-made run folders: what may differ between two runs
(clock readings, logs, the order of img2dataset's sample tables) and what may not, and
which pairs of runs it refuses."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from amused.orchestration.compare import compare_runs

pytestmark = pytest.mark.unit


def _run(root, demo, speed: float, keys: list[str], token: bytes, log: str, data_dir=None):
    cfg = {**demo, "run_dir": str(root), **({"data_dir": data_dir} if data_dir else {})}
    (root / "train").mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    (root / "train/metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5, "samples_per_s": speed}) + "\n")
    images = root / "data/images"
    (images / "logs").mkdir(parents=True)
    (images / "logs/img2dataset.log").write_text(log)
    pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys)}), images / "00000.parquet")
    (root / "data/tokens").mkdir(parents=True)
    (root / "data/tokens/00000.parquet").write_bytes(token)
    # What a run reads off its clock and its cluster: TensorBoard's event file names, the
    # attempts of a resumed stage, the node that fetched a shard.
    (root / f"train/tensorboard/events.out.tfevents.{speed}").parent.mkdir()
    (root / f"train/tensorboard/events.out.tfevents.{speed}").write_text(log)
    (root / "stages").mkdir()
    (root / "stages/download.json").write_text(json.dumps({"status": "done", "attempts": int(speed), "counts": {}}))
    (images / "_amused/records").mkdir(parents=True)
    (images / "_amused/records/00000.json").write_text(json.dumps({"samples": len(keys), "node": log}))
    return str(root)


def _differing(rows):
    return [(r.stage, r.differing) for r in rows if r.differing]


def test_clock_logs_and_sample_order_may_differ_and_a_byte_may_not(tmp_path, demo):
    a = _run(tmp_path / "a", demo, 90.0, ["0", "1"], b"tokens", "12:00 started")
    b = _run(tmp_path / "b", demo, 95.0, ["1", "0"], b"tokens", "12:05 started")
    rows = compare_runs(a, b)
    assert _differing(rows) == []
    assert {r.stage: r.files for r in rows}["train"] == 1  # compared, though its speed differs
    c = _run(tmp_path / "c", demo, 90.0, ["0", "1"], b"tokenz", "12:00 started")
    assert _differing(compare_runs(a, c)) == [("pretokenize", ["00000.parquet"])]
    (tmp_path / "c/train/metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.6}) + "\n")
    assert [s for s, _ in _differing(compare_runs(a, c))] == ["pretokenize", "train"]


def test_runs_sharing_a_data_folder_are_refused(tmp_path, demo):
    shared = str(tmp_path / "data")
    a = _run(tmp_path / "a", demo, 1.0, ["0"], b"t", "", data_dir=shared)
    b = _run(tmp_path / "b", demo, 1.0, ["0"], b"t", "", data_dir=shared)
    with pytest.raises(ValueError, match="both runs keep outputs in .*data"):
        compare_runs(a, b)


def test_a_data_folder_written_inside_the_run_moves_with_it(tmp_path, demo):
    """A run with data_dir written out (inside its folder) and moved aside still reads its own data."""
    _run(tmp_path / "a", demo, 1.0, ["0"], b"t", "", data_dir=str(tmp_path / "a/data"))
    moved = tmp_path / "moved"
    (tmp_path / "a").rename(moved)
    b = _run(tmp_path / "a", demo, 1.0, ["0"], b"u", "", data_dir=str(tmp_path / "a/data"))
    assert _differing(compare_runs(str(moved), b)) == [("pretokenize", ["00000.parquet"])]


def test_a_done_stage_without_its_outputs_is_an_error_not_agreement(tmp_path, demo):
    a = _run(tmp_path / "a", demo, 1.0, ["0"], b"t", "")
    b = _run(tmp_path / "b", demo, 1.0, ["0"], b"t", "")
    for run in (a, b):
        shutil.rmtree(f"{run}/data/images")
    with pytest.raises(FileNotFoundError, match="stage download is done but its output .*images is missing"):
        compare_runs(a, b)
