"""Pre-tokenization on a local three-node Ray cluster: each shard is written on a node that
holds its encoded chunks, so every node writes shards (the completion records say which),
and losing a node mid-job still yields every sample exactly once."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from amused.demo.datasets import write_shape_shards
from amused.pipeline.pretokenize import PretokenizeConfig, pretokenize
from amused.plumbing.fsio import list_files

ROOT = Path(__file__).resolve().parents[1]
SHARDS, PER_SHARD = 9, 24


@pytest.mark.slow
def test_three_nodes_write_then_one_lost_every_sample_once(tmp_path, tiny_models, ray_session):
    images = str(tmp_path / "images")
    write_shape_shards(images, shards=SHARDS, per_shard=PER_SHARD, min_size=40, max_size=64, seed=3)
    # The reference: the same job on the test session's one-node Ray.
    pretokenize(PretokenizeConfig(input=images, output=str(tmp_path / "ref"), vqgan=str(tiny_models / "vqgan"),
                                  text_encoder=str(tiny_models), resolution=32, batch_size=4, progress=False))
    expected = sorted(k for f in list_files(str(tmp_path / "ref"), ".parquet")
                      for k in pq.read_table(f, columns=["key"])["key"].to_pylist())
    assert len(expected) == len(set(expected)) == SHARDS * PER_SHARD
    done = subprocess.run([sys.executable, str(ROOT / "tests/cluster_job.py"), images, str(tiny_models),
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())

    whole, lossy = result["whole"], result["lossy"]
    assert len(result["nodes"]) == 3
    assert whole["failed"] == {} and sorted(whole["keys"]) == expected
    assert whole["writer_nodes"] == result["nodes"], "every node writes the shards whose chunks it holds"
    assert whole["driver_bytes_per_sample"] < 1024

    assert lossy["worker_removed"] and 0 < lossy["removed_after_shards"] < SHARDS, "the node must go mid-job"
    assert lossy["failed"] == {}
    assert sorted(lossy["keys"]) == expected  # every sample, none twice
    # The same bytes, shards and markers, as the job that lost no node, wherever each shard was written.
    assert len(lossy["digests"]) == 2 * SHARDS and lossy["digests"] == whole["digests"]
