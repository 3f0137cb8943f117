"""Download throughput: plain `img2dataset.download` vs `amused download`, same settings.

    (a) baseline: `img2dataset.download` as a user would call it (webdataset, keep-ratio
        resize only if bigger, JPEG quality 95): no URL guard, no politeness, no sorting
    (b) ours: `amused.pipeline.download.download` (URL policy at fetch time, politeness,
        shards rewritten in key order, summary), `domain_rate` 0 by default: every URL
        here is on one host, where a per-domain cap would measure the cap

Both fetch the same JPEGs from an HTTP server on 127.0.0.1, in its own process: noisy
shape images of 300-640 px (`amused.demo.shapes`, ~60 KB at texture 8: web photographs'
bytes per pixel), one input file per shard. Figures per run, from img2dataset's own
counters (`NNNNN_stats.json`: successes, duration) and from CPU clocks:

- shard rate: successes / shard duration, per download process (start-up excluded)
- samples per CPU-second: successes over the CPU time of the worker processes while they
  ran shards (all their threads, measured around each shard), i.e. samples/s per core
  when the download is CPU-bound; the driver's own CPU (input checks, sorting, summary)
  is reported apart, and so is the CPU of every process of the call (driver, img2dataset's
  workers and logger, our per-shard task pool), start-up included
- end to end: wall seconds of the whole call, start-up included

Best of `--repeats` runs, the two paths alternated. Also prints the bytes per sample of
the finished shards (tar: jpg + txt + json; img2dataset's per-shard Parquet apart).

    python benchmarks/download.py                          # ~4 min on 2 busy cores
    python benchmarks/download.py --images 4000 --processes 4 --threads 32 --sizes 256
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import socket
import tarfile
import tempfile
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports it; it would phone home

from amused.demo.shapes import encode_image, shape_image  # noqa: E402
from amused.pipeline.download import DownloadConfig, download  # noqa: E402

# Imported now so that neither timed path pays its ~4 s import; import_module because the
# package's `main` attribute is a function, not the module.
i2d = importlib.import_module("img2dataset.main")


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 drops connections of 16+ concurrent clients (1 s SYN retries)
    daemon_threads = True


def serve(folder: str, port: int) -> None:
    _Server(("127.0.0.1", port), functools.partial(_Handler, directory=folder)).serve_forever()


def _write_images(args) -> list[tuple[str, int]]:
    www, first, count, texture = args
    out = []
    for i in range(first, first + count):
        rng = np.random.default_rng([11, i])
        w, h = (int(v) for v in rng.integers(300, 641, size=2))
        img, caption = shape_image(rng, w, h, texture)
        data = encode_image(img)
        (Path(www) / f"{i}.jpg").write_bytes(data)
        out.append((caption, len(data)))
    return out


def write_site(work: Path, images: int, shards: int, texture: float, base_url: str) -> float:
    """JPEGs under work/www and `shards` metadata files (url, caption) under work/meta;
    returns the mean JPEG size served."""
    www, meta = work / "www", work / "meta"
    www.mkdir(parents=True)
    meta.mkdir()
    per = images // shards
    with mp.get_context("fork").Pool(os.cpu_count() or 1) as pool:  # spawn would re-import torch
        made = pool.map(_write_images, [(str(www), s * per, per, texture) for s in range(shards)])
    for s, rows in enumerate(made):
        urls = [f"{base_url}/{i}.jpg" for i in range(s * per, (s + 1) * per)]
        pq.write_table(pa.table({"url": urls, "caption": [c for c, _ in rows]}), meta / f"{s:05d}.parquet")
    return float(np.mean([n for rows in made for _, n in rows]))


class CpuTimed:
    """img2dataset's Downloader, recording the CPU seconds of the worker process (all its
    threads) while it runs each shard; travels pickled to the workers like the original."""

    def __init__(self, downloader, folder: str):
        self.downloader = downloader
        self.folder = folder

    def __getattr__(self, name):  # reads of the Downloader's settings (ours reads a few) go through
        if name == "downloader" or name.startswith("__"):  # not set yet while unpickling
            raise AttributeError(name)
        return getattr(self.downloader, name)

    def __call__(self, row):
        start = time.process_time()
        try:
            return self.downloader(row)
        finally:
            Path(self.folder, f"{row[0]}.cpu").write_text(str(time.process_time() - start))


def cpu_seconds(who: int) -> float:
    """CPU seconds of this process (RUSAGE_SELF) or of its ended children (RUSAGE_CHILDREN)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_once(path: str, work: Path, size: int, args) -> dict:
    out, probe = work / f"out-{path}-{size}", work / f"cpu-{path}-{size}"
    for folder in (out, probe):
        shutil.rmtree(folder, ignore_errors=True)
    probe.mkdir()
    original = i2d.Downloader  # ours wraps whatever it finds here, so the probe sits inside its guard
    i2d.Downloader = lambda **kwargs: CpuTimed(original(**kwargs), str(probe))
    common = dict(processes_count=args.processes, thread_count=args.threads, timeout=10, retries=0,
                  number_sample_per_shard=args.images // args.shards, encode_quality=95)
    before = {who: cpu_seconds(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)}
    start = time.perf_counter()
    try:
        if path == "baseline":
            i2d.download(url_list=str(work / "meta"), output_folder=str(out), input_format="parquet",
                         output_format="webdataset", url_col="url", caption_col="caption", image_size=size,
                         resize_mode="keep_ratio", resize_only_if_bigger=True, enable_wandb=False, **common)
        else:
            download(DownloadConfig(input=str(work / "meta"), output=str(out), image_size=size,
                                    samples_per_shard=common["number_sample_per_shard"],
                                    processes=args.processes, threads=args.threads, timeout=10,
                                    allow_hosts="127.0.0.1", domain_rate=args.domain_rate,
                                    domain_concurrency=args.threads))
    finally:
        i2d.Downloader = original
    wall = time.perf_counter() - start
    cpu = {who: cpu_seconds(who) - seconds for who, seconds in before.items()}
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    successes = sum(s["successes"] for s in stats)
    if successes < sum(s["count"] for s in stats):  # a rate over failures would not be a download rate
        raise RuntimeError(f"{path}: {successes} of {sum(s['count'] for s in stats)} samples downloaded; "
                           f"the errors are in {out}/*.parquet")
    shard_seconds = sum(s["duration"] for s in stats)
    worker_cpu = sum(float(p.read_text()) for p in probe.glob("*.cpu"))
    tars = sorted(out.glob("*.tar"))
    member = {"jpg": 0, "txt": 0, "json": 0}
    for tar in tars:
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                ext = m.name.rsplit(".", 1)[-1]
                if ext in member:
                    member[ext] += m.size
    return {
        "successes": successes, "samples": sum(s["count"] for s in stats),
        "shard_rate": successes / shard_seconds, "per_cpu_s": successes / worker_cpu, "wall": wall,
        "driver_cpu_ms": 1e3 * cpu[resource.RUSAGE_SELF] / successes,
        "all_cpu_ms": 1e3 * (cpu[resource.RUSAGE_SELF] + cpu[resource.RUSAGE_CHILDREN]) / successes,
        "tar_bytes": sum(t.stat().st_size for t in tars) / successes,
        "parquet_bytes": sum(p.stat().st_size for p in out.glob("*.parquet")) / successes,
        **{f"{k}_bytes": v / successes for k, v in member.items()},
    }


def wait_listening(port: int, seconds: float = 120.0) -> None:
    """Until the server accepts connections (its spawned process imports this module first)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"image server on 127.0.0.1:{port} not listening after {seconds:.0f}s") from None
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--sizes", default="256,384", help="image_size values (shorter side after resizing)")
    p.add_argument("--texture", type=float, default=8.0, help="noise std-dev of the served JPEGs")
    p.add_argument("--domain-rate", type=float, default=0.0, help="ours: requests/s per domain (0: no cap)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    if args.images % args.shards:
        p.error("--images must be a multiple of --shards (one input file per shard)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-download-"))
    port = free_port()
    t = time.perf_counter()
    served = write_site(work, args.images, args.shards, args.texture, f"http://127.0.0.1:{port}")
    print(f"data: {args.images} JPEGs of 300-640 px, mean {served / 1e3:.1f} KB, written in "
          f"{time.perf_counter() - t:.1f}s; {args.processes} process(es) x {args.threads} threads; "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}", flush=True)
    server = mp.get_context("spawn").Process(target=serve, args=(str(work / "www"), port), daemon=True)
    server.start()
    try:
        wait_listening(port)
        for size in (int(s) for s in args.sizes.split(",")):
            runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
            for r in range(args.repeats):
                for path in runs:
                    res = run_once(path, work, size, args)
                    runs[path].append(res)
                    print(f"  {size}px {path:8s} run {r}: {res['successes']}/{res['samples']} ok, shard rate "
                          f"{res['shard_rate']:6.1f}/s, {res['per_cpu_s']:6.1f} samples/CPU-s, end to end "
                          f"{res['wall']:5.1f}s, driver {res['driver_cpu_ms']:.2f} ms, all processes {res['all_cpu_ms']:.2f} ms "
                          f"CPU/sample, "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
            best = {k: {"shard_rate": max(x["shard_rate"] for x in v), "per_cpu_s": max(x["per_cpu_s"] for x in v),
                        "wall": min(x["wall"] for x in v), "driver_cpu_ms": min(x["driver_cpu_ms"] for x in v),
                        "all_cpu_ms": min(x["all_cpu_ms"] for x in v)}
                    for k, v in runs.items()}
            b, o = best["baseline"], best["ours"]
            print(f"{size}px best of {args.repeats}:")
            for name, x in best.items():
                print(f"  {name:8s} shard rate {x['shard_rate']:7.1f} samples/s per process, "
                      f"{x['per_cpu_s']:7.1f} samples per worker CPU-second, end to end {x['wall']:5.1f}s, "
                      f"driver {x['driver_cpu_ms']:.2f} ms, all processes {x['all_cpu_ms']:.2f} ms CPU/sample")
            print(f"  ours/baseline: shard rate {o['shard_rate'] / b['shard_rate']:.2f}x, samples per CPU-second "
                  f"{o['per_cpu_s'] / b['per_cpu_s']:.2f}x, end-to-end time {o['wall'] / b['wall']:.2f}x")
            last = runs["ours"][-1]
            print(f"  bytes per sample (ours): tar {last['tar_bytes']:,.0f} (jpg {last['jpg_bytes']:,.0f}, "
                  f"txt {last['txt_bytes']:,.0f}, json {last['json_bytes']:,.0f}), img2dataset parquet "
                  f"{last['parquet_bytes']:,.0f}", flush=True)
    finally:
        server.terminate()
        server.join()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
