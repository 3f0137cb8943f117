"""Training on a three-node Ray cluster on this machine (Ray's own test cluster) that loses
a node hosting one of its two workers once the first checkpoint is complete; run as its
own process by tests/test_worker_loss.py so that its Ray never meets the test session's.
Writes OUT/result.json: the train result, the steps complete when the node went, and
whether it was removed while training still ran."""

import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray._private import state as ray_state
from ray.cluster_utils import Cluster

from amused.training.checkpoint import MARKER, Checkpoint, tag
from amused.training.config import parse_config
from amused.training.launch import train_on_ray


def main(config: str, out: str) -> None:
    cfg = parse_config(json.loads(Path(config).read_text()))
    # The head runs the driver and Ray Train's controller, no worker: each worker node has
    # room for one worker, so the two workers land on two nodes and the third is the spare
    # the restarted group needs.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    removed: dict = {}

    def remove_a_workers_node():
        marker = Path(cfg.run_dir) / "checkpoints" / tag(cfg.checkpoint.every) / MARKER
        deadline = time.monotonic() + 600
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        hosts = {a["Address"]["NodeID"] for a in ray_state.actors().values()
                 if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"}
        victim = next(n for n in nodes if n.node_id in hosts)
        removed["complete_before"] = [c.step for c in Checkpoint.every(cfg.run_dir)]
        cluster.remove_node(victim)
        removed["while_running"] = not (Path(cfg.run_dir) / "checkpoints" / tag(cfg.steps) / MARKER).exists()

    remover = threading.Thread(target=remove_a_workers_node, daemon=True)
    remover.start()
    result = train_on_ray(cfg, workers=2)
    remover.join(timeout=60)
    Path(out, "result.json").write_text(json.dumps({"result": dataclasses.asdict(result), **removed}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
