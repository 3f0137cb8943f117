"""Pre-tokenization on a two-node Ray cluster on this machine (Ray's own test cluster),
run as its own process by tests/test_cluster.py so that its Ray never meets the test
session's. Prints one JSON line: the nodes the encoder actors ran on and the keys written."""

import json
import sys
import threading
import time

import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

from amused.pipeline.pretokenize import PretokenizeConfig, pretokenize
from amused.plumbing.fsio import list_files


def main(images: str, models: str, out: str, remove_after: float) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    worker = cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    # Two encoders of 2 CPUs each cannot share a 3-CPU node: one lands on each.
    cfg = PretokenizeConfig(input=images, output=out, vqgan=f"{models}/vqgan", text_encoder=models, resolution=32,
                            batch_size=4, encoders=2, encoder_cpus=2.0, encoder_threads=1, decode_cpus=0.25,
                            progress=False)
    nodes: set[str] = set()
    removed_at: list[float] = []

    def watch_then_remove():
        deadline = time.monotonic() + 120
        while len(nodes) < 2 and time.monotonic() < deadline:
            # The GCS's actor table (the state API needs the dashboard, which test nodes lack).
            for actor in ray._private.state.actors().values():
                if "ChunkEncoder" in actor["ActorClassName"] and actor["Address"]["NodeID"]:
                    nodes.add(actor["Address"]["NodeID"])
            time.sleep(0.2)
        time.sleep(remove_after)
        cluster.remove_node(worker)
        removed_at.append(time.monotonic())

    remover = threading.Thread(target=watch_then_remove, daemon=True)
    remover.start()
    report = pretokenize(cfg)
    finished_at = time.monotonic()
    remover.join(timeout=180)
    keys = [k for f in list_files(out, ".parquet") for k in pq.read_table(f, columns=["key"])["key"].to_pylist()]
    print(json.dumps({"encoder_nodes": len(nodes), "failed": report.failed_shards, "keys": keys,
                      "worker_removed": worker not in cluster.worker_nodes,
                      "removed_mid_job": bool(removed_at) and removed_at[0] < finished_at}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
