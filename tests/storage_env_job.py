"""Run by tests/test_s3_faults.py in an environment without our storage settings: a Ray
cluster started before anything of ours is imported (as `ray start` on a node would be),
then a job joins it through ray_session. Prints what a worker's environment and S3 client
hold."""

import json
import os

import ray
from ray.cluster_utils import Cluster


def probe() -> dict:
    import s3fs

    return {"env": {k: os.environ.get(k) for k in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "FSSPEC_S3")},
            "retries": s3fs.S3FileSystem(skip_instance_cache=True).s3.meta.config.retries}


if __name__ == "__main__":
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        from amused.plumbing.raysession import ray_session  # after the cluster: its raylet lacks our settings

        with ray_session(cluster.address):
            print(json.dumps(ray.get(ray.remote(probe).remote())))
    finally:
        cluster.shutdown()
