"""`amused download` against an HTTP server on 127.0.0.1 that serves images and failures."""

import dataclasses
import os
import re
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from amused.pipeline.download import DownloadConfig, _sort_shards, classify, download
from amused.pipeline.pretokenize import PretokenizeConfig, pretokenize
from amused.pipeline.shards import TokenDataset
from amused.pipeline.wds import ShardFormatError, iter_samples, metadata_of, tar_bytes
from amused.plumbing.fsio import list_files
from tests.samples import jpeg


class Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes = b"", ctype="image/jpeg", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the slow path)
            pass

    def do_GET(self):
        kind, name = self.path.strip("/").split("/", 1)
        Handler.hits[self.path] += 1
        n = int(name.split(".")[0])
        if kind == "img":
            self._send(200, jpeg(n))
        elif kind == "missing":
            self._send(404, b"not found", "text/plain")
        elif kind == "gone":
            self._send(410, b"gone", "text/plain")
        elif kind == "error":
            self._send(500, b"boom", "text/plain")
        elif kind == "flaky":  # fails once, then serves the image
            self._send(503, b"busy", "text/plain") if Handler.hits[self.path] == 1 else self._send(200, jpeg(n))
        elif kind == "html":
            self._send(200, b"<html><body>a page, not a picture</body></html>", "text/html")
        elif kind == "trunc":
            self._send(200, jpeg(n)[:400])
        elif kind == "slow":
            time.sleep(5)
            self._send(200, jpeg(n))
        elif kind == "noai":
            self._send(200, jpeg(n), headers=[("X-Robots-Tag", "noai")])


# path kind -> count; (failure reason, class) after the first run
PLAN = {"img": 6, "missing": 2, "gone": 1, "error": 2, "flaky": 2, "html": 1, "trunc": 1, "slow": 1, "noai": 1}


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def image_hits() -> int:
    return sum(n for path, n in Handler.hits.items() if path.startswith("/img/"))


def write_input(folder, base: str) -> str:
    rows = [(f"{base}/{kind}/{i}.jpg", f"{kind} number {i}") for kind, n in PLAN.items() for i in range(n)]
    rows.append(("http://10.1.2.3/private.jpg", "a private address the filter never saw"))
    rows.append(("file:///etc/passwd", "not http"))
    half = len(rows) // 2
    folder.mkdir()
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.table({"url": [u for u, _ in part], "caption": [c for _, c in part],
                                 "aesthetic_score": [5.0 + i] * len(part)}), folder / f"{i:05d}.parquet")
    return str(folder)


def test_classify_failures():
    assert classify("HTTP Error 404: Not Found") == ("http_404", "permanent")
    assert classify("HTTP Error 503: Service Unavailable") == ("http_5xx", "transient")
    assert classify("<urlopen error [Errno -3] Temporary failure in name resolution>") == ("dns", "transient")
    assert classify("The read operation timed out") == ("timeout", "transient")
    assert classify("HTTP Error 429: Too Many Requests") == ("http_429", "transient")
    assert classify("Use of image disallowed by X-Robots-Tag directive") == ("opted_out", "permanent")
    assert classify("Image decoding error") == ("not_an_image", "permanent")
    assert classify("something new") == ("other", "permanent")
    # the fetch guard's refusals, whatever the URL they quote says
    assert classify("URL policy refused http://timeout.example/a.jpg") == ("policy_url", "permanent")
    assert classify("URL policy refused redirect (302) from http://a/ to http://localhost/") == \
        ("policy_redirect", "permanent")
    assert classify("<urlopen error URL policy refused address 10.0.0.1 of host dns-timeout.test>") == \
        ("policy_address", "permanent")
    assert classify("HTTP Error 302: Found - Redirection to url 'file:///etc/passwd' is not allowed") == \
        ("policy_redirect", "permanent")


def test_download_matches_server_then_resumes_retries_and_pretokenizes(server, tmp_path, tiny_models,
                                                                       ray_session):
    src = write_input(tmp_path / "meta", server)
    out = str(tmp_path / "wds")
    cfg = DownloadConfig(input=src, output=out, image_size=64, processes=1, threads=8, timeout=3,
                         allow_hosts="127.0.0.1", samples_per_shard=100)
    first = download(cfg)
    assert first.policy_rejected == {"url_scheme": 1, "url_address": 1}
    assert first.shards == 2 and first.samples == sum(PLAN.values())
    assert first.successes == PLAN["img"]
    assert first.failures == {"http_404": 2, "http_410": 1, "http_5xx": PLAN["error"] + PLAN["flaky"],
                              "not_an_image": PLAN["html"] + PLAN["trunc"], "timeout": 1, "opted_out": 1}
    assert first.transient_pending == PLAN["error"] + PLAN["flaky"] + PLAN["slow"]

    # Shards in key order whatever order the 8 threads finished in: a second clean
    # download gives the same bytes.
    keys = []
    for tar in list_files(out, ".tar"):
        with open(tar, "rb") as fh:
            keys.append([s.key for s in iter_samples(fh, tar)])
    assert all(k == sorted(k) for k in keys) and sum(map(len, keys)) == first.successes
    seen = Counter(Handler.hits)
    Handler.hits.clear()  # the server as the first download met it (flaky URLs fail once)
    fresh = download(dataclasses.replace(cfg, output=str(tmp_path / "wds-again")))
    Handler.hits.clear()
    Handler.hits.update(seen)
    assert fresh.successes == first.successes
    for name in ("00000.tar", "00001.tar"):
        assert (tmp_path / "wds-again" / name).read_bytes() == (tmp_path / "wds" / name).read_bytes()

    fetched = image_hits()
    again = download(cfg)
    assert image_hits() == fetched and sum(Handler.hits.values()) == sum(PLAN.values())
    assert (again.successes, again.failures) == (first.successes, first.failures)

    shard0 = sorted(tmp_path.joinpath("wds").glob("00000.*"))
    before = {p.name: p.stat().st_mtime_ns for p in shard0}
    retried = download(dataclasses.replace(cfg, retry_failed=True, max_attempts=3))
    # flaky URLs recovered; 500s and the slow one were tried three times in all, then given up
    assert retried.successes == PLAN["img"] + PLAN["flaky"]
    assert retried.failures["http_5xx"] == PLAN["error"] and retried.failures["timeout"] == 1
    assert all(Handler.hits[f"/error/{i}.jpg"] == 3 for i in range(PLAN["error"]))
    assert Handler.hits["/slow/0.jpg"] == 3
    assert retried.shards == 4  # two retry rounds, each a new shard after the first two
    assert {p.name: p.stat().st_mtime_ns for p in shard0} == before
    hits = sum(Handler.hits.values())
    assert download(dataclasses.replace(cfg, retry_failed=True)).successes == retried.successes
    assert sum(Handler.hits.values()) == hits

    samples = []
    for tar in list_files(out, ".tar"):
        with open(tar, "rb") as fh:
            samples += [metadata_of(s) for s in iter_samples(fh, tar)]
    assert len(samples) == retried.successes
    assert all(len(m["sample_key"]) == 32 and m["original_width"] == 120 and m["aesthetic_score"] in (5.0, 6.0)
               for m in samples)
    with tarfile.open(list_files(out, ".tar")[0]) as tf:
        assert any(m.name.endswith(".txt") for m in tf.getmembers())

    report = pretokenize(PretokenizeConfig(input=out, output=str(tmp_path / "tokens"),
                                           vqgan=str(tiny_models / "vqgan"), text_encoder=str(tiny_models),
                                           resolution=64, batch_size=4, progress=False))
    assert report.ok and report.rows_written == retried.successes
    tokens = TokenDataset(str(tmp_path / "tokens"))
    keys = [k for s in tokens.shards for k in tokens.read_shard(s.name, ["content_id"]).column(0).to_pylist()]
    assert sorted(keys) == sorted(m["sample_key"] for m in samples)


def test_s3_input_and_output(server, tmp_path, s3_bucket):
    fs = s3fs.S3FileSystem()
    table = pa.table({"url": [f"{server}/img/{i}.jpg" for i in range(3)] + [f"{server}/missing/9.jpg"],
                      "caption": ["a", "b", "c", "d"]})
    with fs.open(f"{s3_bucket}/dl-meta/00000.parquet", "wb") as fh:
        pq.write_table(table, fh)
    out = f"{s3_bucket}/dl-wds"
    cfg = DownloadConfig(input=f"{s3_bucket}/dl-meta", output=out, image_size=64, processes=1, threads=4,
                         timeout=5, allow_hosts="127.0.0.1", samples_per_shard=10)
    summary = download(cfg)
    assert (summary.shards, summary.successes, summary.failures) == (1, 3, {"http_404": 1})
    assert fs.exists(f"{out}/00000.tar") and fs.exists(f"{out}/00000_stats.json")
    hits = sum(Handler.hits.values())
    assert download(cfg).successes == 3 and sum(Handler.hits.values()) == hits


def test_a_damaged_finished_shard_is_named_and_left_as_it_is(tmp_path):
    whole = tar_bytes([("b.jpg", jpeg(1)), ("b.txt", b"y"), ("a.jpg", jpeg(0)), ("a.txt", b"x")])
    cut = whole[:whole.index(b"a.jpg")]  # ends at a member boundary: no end-of-archive blocks
    for shard, data in (("00000", cut), ("00001", whole)):
        (tmp_path / f"{shard}.tar").write_bytes(data)
        (tmp_path / f"{shard}_stats.json").write_text('{"successes": 2}')
    files = " ".join(str(tmp_path / f"00000{suffix}") for suffix in (".tar", ".parquet", "_stats.json"))
    with pytest.raises(ShardFormatError, match=rf"1 damaged finished shard\(s\) left as they are, the others sorted: "
                                               rf".*00000\.tar: .*end-of-archive.*delete {files} and rerun"):
        _sort_shards(str(tmp_path))
    assert (tmp_path / "00000.tar").read_bytes() == cut
    assert sorted(p.name for p in (tmp_path / "_amused" / "sorted").iterdir()) == ["00001.json"]
    with open(tmp_path / "00001.tar", "rb") as fh:  # the intact shard after the damaged one is in key order
        assert [s.key for s in iter_samples(fh, "00001.tar")] == ["a", "b"]
    with pytest.raises(ShardFormatError, match=r"^1 damaged .*00000\.tar"):  # a rerun names it again, alone
        _sort_shards(str(tmp_path))


def test_deleting_the_files_a_damaged_shard_error_names_fetches_it_again(server, tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    for i in range(2):
        urls = [f"{server}/img/{100 + 10 * i + j}.jpg" for j in range(3)]
        pq.write_table(pa.table({"url": urls, "caption": ["c"] * 3}), meta / f"{i:05d}.parquet")
    out = tmp_path / "wds"
    cfg = DownloadConfig(input=str(meta), output=str(out), image_size=64, processes=1, threads=4, timeout=5,
                         allow_hosts="127.0.0.1", samples_per_shard=10)
    assert download(cfg).successes == 6
    intact = (out / "00001.tar").read_bytes()
    # shard 1 as a crash between img2dataset and the sorting would leave it, but damaged
    (out / "00001.tar").write_bytes(intact[:len(intact) // 2])
    (out / "_amused" / "sorted" / "00001.json").unlink()
    with pytest.raises(ShardFormatError) as error:
        download(cfg)
    named = re.search(r"delete (.*) and rerun amused download\)$", str(error.value)).group(1).split()
    assert sorted(named) == sorted(str(out / f"00001{s}") for s in (".tar", ".parquet", "_stats.json"))
    for path in named:
        os.remove(path)
    hits = image_hits()
    again = download(cfg)
    assert (again.shards, again.successes) == (2, 6) and image_hits() == hits + 3
    assert (out / "00001.tar").read_bytes() == intact
