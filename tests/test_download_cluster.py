"""`amused download` with img2dataset's ray distributor on a local three-node Ray cluster:
every sample accounted for exactly once, per-shard work done by tasks on several nodes."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from amused.pipeline.wds import iter_samples, metadata_of
from amused.plumbing.fsio import list_files
from tests.download_cluster_job import FILES, PLAN
from tests.test_download import final_states

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ray_distributor_on_three_nodes_every_sample_once(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tests.download_cluster_job", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    out = str(tmp_path / "wds")
    summary, records = result["summary"], result["records"]
    samples = FILES * sum(PLAN.values())
    assert summary["samples"] == samples and summary["successes"] == FILES * (PLAN["img"] + PLAN["flaky"])
    assert summary["failures"] == {"http_404": FILES * PLAN["missing"], "http_5xx": FILES * PLAN["error"]}
    assert {k: summary[k] for k in final_states(out)} == final_states(out)
    # two retry rounds (flaky recovers in the first; error fails three times in all)
    assert [r["round"] for r in records] == [0] * FILES + [1, 2] and [r["shard"] for r in records] == list(range(8))
    assert all(n == {"missing": 1, "img": 1, "flaky": 2, "error": 3}[path.split("/")[1]]
               for path, n in result["hits"].items()) and len(result["hits"]) == samples
    # every shard's record was written by a task on one of the cluster's nodes, and more than one node did
    writers = Counter(r["node"] for r in records)
    assert set(writers) <= set(result["nodes"]) and len(writers) >= 2, writers
    # every image in the shards exactly once, and every input sample accounted once
    keys = []
    for tar in list_files(out, ".tar"):
        with open(tar, "rb") as fh:
            keys += [metadata_of(s)["sample_key"] for s in iter_samples(fh, tar)]
    inputs = [r for f in list_files(f"{out}/_amused/input", ".parquet") for r in pq.read_table(f).to_pylist()]
    wanted = {r["sample_key"] for r in inputs if "/img/" in r["url"] or "/flaky/" in r["url"]}
    assert sorted(keys) == sorted(wanted) and len(keys) == len(set(keys))
    assert sum(r["samples"] - sum(r["supersedes"].values()) for r in records) == len(inputs) == samples
