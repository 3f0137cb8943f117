"""`amused filter` on a local three-node Ray cluster writes the same download shards, byte
for byte, as on the test session's one-node Ray (with another partition count too)."""

import json
import subprocess
import sys
from pathlib import Path

from amused.demo.site import write_laion_metadata
from amused.pipeline.filter import FilterConfig, filter_metadata
from amused.plumbing.fsio import list_files, sha256_of

ROOT = Path(__file__).resolve().parents[1]
# The aMUSEd-512 recipe; small shards and partitions, so shards span partitions and tasks.
SETTINGS = dict(min_width=256, min_height=256, max_watermark=0.5, min_aesthetic=4.5, max_nsfw=0.45,
                rows_per_shard=700)


def test_three_nodes_write_the_bytes_one_node_writes(tmp_path, ray_session):
    src = str(tmp_path / "meta")
    write_laion_metadata(src, files=6, rows_per_file=2_000)  # ~2% repeated URLs, across files too
    one = filter_metadata(FilterConfig(input=src, output=str(tmp_path / "one"), progress=False, workers=1,
                                       **SETTINGS))
    expected = {u.rsplit("/", 1)[-1]: sha256_of(u) for u in list_files(str(tmp_path / "one"), ".parquet")}
    assert one.total["rejected"]["duplicate_url"] > 0 and len(expected) == one.shards > 5

    settings = json.dumps({**SETTINGS, "partition_rows": 1_500})
    done = subprocess.run([sys.executable, str(ROOT / "tests/filter_cluster_job.py"), src, str(tmp_path / "cluster"),
                           settings], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "cluster" / "result.json").read_text())
    assert len(result["nodes"]) == 3
    assert result["total"] == one.total
    assert result["digests"] == expected
