"""`amused download` with img2dataset's ray distributor on a three-node Ray cluster on this
machine (Ray's own test cluster), run as its own process by tests/test_download_cluster.py
(python -m tests.download_cluster_job FOLDER) so that its Ray never meets the test session's. Serves the images itself, on 127.0.0.1.
Prints one JSON line: the cluster's node ids, the summary's counts, every shard's record
and the server's hits."""

import dataclasses
import json
import os
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
from ray.cluster_utils import Cluster

from amused.pipeline.download import DownloadConfig, download, record_url
from amused.plumbing.fsio import list_files, read_json
from tests.samples import jpeg

HITS: Counter = Counter()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        kind = self.path.strip("/").split("/")[0]
        if kind != "robots.txt":  # no robots.txt (a 404): everything allowed, and not counted as a hit
            HITS[self.path] += 1
        n = sum(map(ord, self.path))
        if kind == "img" or (kind == "flaky" and HITS[self.path] > 1):  # flaky: a 503, then the image
            code, body = 200, jpeg(n)
        else:
            code, body = {"missing": 404, "error": 500, "flaky": 503}.get(kind, 404), b"no"
        self.send_response(code)
        self.send_header("Content-Type", "image/jpeg" if code == 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# per input file: URL kind -> count
PLAN = {"img": 3, "missing": 1, "error": 1, "flaky": 1}
FILES = 6


def main(folder: str) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    meta, out = f"{folder}/meta", f"{folder}/wds"
    os.makedirs(meta)
    for f in range(FILES):
        urls = [f"{base}/{kind}/{f}-{i}.jpg" for kind, n in PLAN.items() for i in range(n)]
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {u}" for u in urls]}), f"{meta}/{f:05d}.parquet")
    # One CPU a node: img2dataset's shard tasks and ours (SPREAD) cannot all stay on the head.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    nodes = [n.node_id for n in cluster.list_all_nodes()]
    cfg = DownloadConfig(input=meta, output=out, image_size=64, processes=1, threads=4,
                         timeout=5, allow_hosts="127.0.0.1", samples_per_shard=100, distributor="ray",
                         ray_address=cluster.address, retry_failed=True, max_attempts=3)
    summary = download(cfg)
    shards = sorted(int(u.rsplit("/", 1)[-1][:5]) for u in list_files(out, "_stats.json"))
    print(json.dumps({"nodes": nodes, "summary": dataclasses.asdict(summary),
                      "records": [read_json(record_url(out, s)) for s in shards], "hits": HITS}))
    cluster.shutdown()
    httpd.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
