"""Pre-tokenization on a local two-node Ray cluster: the encoders spread over both nodes,
and losing one node mid-job still yields every sample exactly once."""

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


@pytest.mark.slow
def test_two_nodes_then_one_every_sample_once(tmp_path, tiny_models, ray_session):
    images = str(tmp_path / "images")
    write_shape_shards(images, shards=6, per_shard=24, min_size=40, max_size=64, seed=3)
    # The reference: the same job on the test session's one-node Ray.
    pretokenize(PretokenizeConfig(input=images, output=str(tmp_path / "ref"), vqgan=str(tiny_models / "vqgan"),
                                  text_encoder=str(tiny_models), resolution=32, batch_size=4, progress=False))
    expected = sorted(k for f in list_files(str(tmp_path / "ref"), ".parquet")
                      for k in pq.read_table(f, columns=["key"])["key"].to_pylist())
    done = subprocess.run([sys.executable, str(ROOT / "tests/cluster_job.py"), images, str(tiny_models),
                           str(tmp_path / "out"), "1.0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["encoder_nodes"] == 2 and result["worker_removed"] and result["removed_mid_job"]
    assert result["failed"] == {}
    assert sorted(result["keys"]) == expected and len(set(result["keys"])) == len(expected) == 144
