"""Pre-tokenization on a three-node Ray cluster on this machine (Ray's own test cluster),
run as its own process by tests/test_cluster.py so that its Ray never meets the test
session's. Two jobs on the same input: the first on all three nodes, the second losing a
node part-way. Writes OUT/result.json (stdout carries Ray's own messages): the cluster's
node ids, and per job the nodes its completion records name, its failed shards and the keys
it wrote."""

import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

from amused.pipeline import shards as fmt
from amused.pipeline.pretokenize import PretokenizeConfig, pretokenize
from amused.plumbing.fsio import list_files


def digests(out: str) -> dict[str, str]:
    """sha256 of every shard and marker, by name relative to the dataset."""
    root = Path(out)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted([*root.glob("*.parquet"), *(root / fmt.STATS_DIR).glob("*.json")])}


def keys_of(out: str) -> list[str]:
    return [k for f in list_files(out, ".parquet") for k in pq.read_table(f, columns=["key"])["key"].to_pylist()]


def main(images: str, models: str, out: str) -> None:
    # Ray returns objects under 100 KB inline to their owner, the driver; the tiny models' blocks
    # are that small, real ones (64 x 118 KB) are not. 1 KB keeps these blocks where they are
    # computed, in the node's object store, as at real sizes.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "_system_config": {"max_direct_call_object_size": 1024}})
    workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    # Three encoders of 2 CPUs each cannot share a 3-CPU node: one lands on each, and the job
    # waits for all three before it starts (decode tasks could otherwise hold a node's CPUs
    # until the short job is over). A shard is one chunk of 24 samples here, written on the
    # node that encoded it: every node writes.
    ray.data.DataContext.get_current().wait_for_min_actors_s = 300
    cfg = dict(input=images, vqgan=f"{models}/vqgan", text_encoder=models, resolution=32, batch_size=24, encoders=3,
               encoder_cpus=2.0, encoder_threads=1, decode_cpus=0.25, progress=False)
    whole = pretokenize(PretokenizeConfig(output=f"{out}/whole", **cfg))
    # Not for the second job: a rerun pass after the node is gone can host only two.
    ray.data.DataContext.get_current().wait_for_min_actors_s = -1

    # The second job loses a worker node once it has written its first shard.
    lossy = f"{out}/lossy"
    removed: dict[str, int] = {}

    def remove_when_a_shard_is_done():
        stats = Path(lossy) / fmt.STATS_DIR
        deadline = time.monotonic() + 300
        while not (stats.exists() and any(stats.glob("*.json"))) and time.monotonic() < deadline:
            time.sleep(0.05)
        removed["done_before"] = len(list(stats.glob("*.json")))
        cluster.remove_node(workers[-1])

    remover = threading.Thread(target=remove_when_a_shard_is_done, daemon=True)
    remover.start()
    report = pretokenize(PretokenizeConfig(output=lossy, **cfg))
    remover.join(timeout=300)
    Path(out, "result.json").write_text(json.dumps({
        "nodes": nodes,
        "whole": {"writer_nodes": sorted(set(whole.writer_nodes.values())), "failed": whole.failed_shards,
                  "keys": keys_of(f"{out}/whole"), "driver_bytes_per_sample": whole.driver_bytes / whole.rows_written,
                  "digests": digests(f"{out}/whole")},
        "lossy": {"failed": report.failed_shards, "keys": keys_of(lossy), "shards": report.shards_total,
                  "digests": digests(lossy),
                  "removed_after_shards": removed.get("done_before"),
                  "worker_removed": workers[-1] not in cluster.worker_nodes},
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
