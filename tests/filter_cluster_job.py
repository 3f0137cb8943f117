"""`amused filter` on a three-node Ray cluster on this machine (Ray's own test cluster), run
as its own process by tests/test_filter_cluster.py so that its Ray never meets the test
session's. The head node gets no CPUs: every task runs on one of the two worker nodes,
which share the output folder as cluster nodes share S3. Writes OUT/result.json: the
cluster's live nodes, the report's totals, and the sha256 of every download shard."""

import json
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from amused.pipeline.filter import FilterConfig, filter_metadata
from amused.plumbing.fsio import list_files, sha256_of


def main(src: str, out: str, settings: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    report = filter_metadata(FilterConfig(input=src, output=f"{out}/filtered", progress=False,
                                          **json.loads(settings)))
    Path(out, "result.json").write_text(json.dumps({
        "nodes": nodes, "total": report.total,
        "digests": {u.rsplit("/", 1)[-1]: sha256_of(u) for u in list_files(f"{out}/filtered", ".parquet")},
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
