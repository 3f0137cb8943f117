"""`amused compare`'s rules on hand-made run folders: what may differ between two runs
(clock readings, logs, the order of img2dataset's sample tables) and what may not."""

import json

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
