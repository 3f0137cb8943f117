"""`amused download` against an HTTP server on 127.0.0.1 that serves images and failures."""

import dataclasses
import json
import os
import re
import socket
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from amused.pipeline.download import (
    STATE,
    DownloadConfig,
    Tasks,
    _plans,
    classify,
    download,
    merge,
    record_url,
    retry_groups,
    shard_records,
)
from amused.pipeline.pretokenize import PretokenizeConfig, pretokenize
from amused.pipeline.shards import TokenDataset
from amused.pipeline.wds import ShardFormatError, iter_samples, metadata_of, tar_bytes
from amused.plumbing.fsio import list_files, read_json
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
        if self.path == "/robots.txt":  # no robots.txt: everything allowed (not counted as a hit)
            return self._send(404, b"", "text/plain")
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
    Handler.hits.clear()  # other modules serve with this Handler too (test_cli): its counts start here
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


def final_states(output: str) -> dict:
    """The test oracle: every attempt of every finished shard read into one table, one row
    per sample key (its attempt in the highest shard, the last), counted by outcome."""
    tables = []
    for stats in list_files(output, "_stats.json"):
        shard = int(stats.rsplit("/", 1)[-1][:5])
        t = pq.read_table(f"{output}/{shard:05d}.parquet", columns=["sample_key", "status", "error_message"])
        tables.append(t.append_column("shard", pa.array([shard] * t.num_rows, pa.int32())))
    t = pa.concat_tables(tables).sort_by([("sample_key", "ascending"), ("shard", "ascending")])
    keys = t.column("sample_key").to_numpy(zero_copy_only=False)
    last = np.ones(len(keys), dtype=bool)
    last[:-1] = keys[1:] != keys[:-1]
    final = t.filter(pa.array(last))
    outcomes, transient = Counter(), 0
    for status, message in zip(final.column("status").to_pylist(), final.column("error_message").to_pylist()):
        reason, kind = ("success", "success") if status == "success" else classify(message)
        outcomes[reason] += 1
        transient += kind == "transient"
    return {"samples": final.num_rows, "successes": outcomes.pop("success", 0), "failures": dict(outcomes),
            "transient_pending": transient}


def counted(summary) -> dict:
    return {"samples": summary.samples, "successes": summary.successes, "failures": summary.failures,
            "transient_pending": summary.transient_pending}


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
    # the politeness refusals, matched only at the start of the message (urllib may wrap it)
    assert classify("<urlopen error robots.txt disallows http://a/URL policy refused for x>") == \
        ("robots_disallowed", "permanent")
    assert classify("robots.txt unreachable for http://a (HTTP 503)") == ("robots_unreachable", "transient")
    assert classify("domain circuit breaker open for a after 3 consecutive failures") == ("domain_breaker", "transient")
    assert classify("URL policy refused http://a/robots.txt disallows") == ("policy_url", "permanent")


def test_download_matches_server_then_resumes_retries_and_pretokenizes(server, tmp_path, tiny_models,
                                                                       ray_session):
    src = write_input(tmp_path / "meta", server)
    out = str(tmp_path / "wds")
    cfg = DownloadConfig(input=src, output=out, image_size=64, processes=1, threads=8, timeout=3,
                         allow_hosts="127.0.0.1", samples_per_shard=100)
    first = download(cfg)
    assert counted(first) == final_states(out)
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
    # the merged per-shard records count each sample once, in its last attempt, as the oracle does
    assert counted(retried) == final_states(out)
    records = [read_json(record_url(out, s)) for s in range(4)]
    assert [r["round"] for r in records] == [0, 0, 1, 2]
    assert sum(records[2]["supersedes"].values()) == PLAN["error"] + PLAN["flaky"] + PLAN["slow"]
    assert records[3]["supersedes"] == {"http_5xx": PLAN["error"], "timeout": 1}
    assert {p.name: p.stat().st_mtime_ns for p in shard0} == before
    hits = sum(Handler.hits.values())
    assert download(dataclasses.replace(cfg, retry_failed=True)).successes == retried.successes
    assert sum(Handler.hits.values()) == hits
    # A crash in the last retry round after its shard landed, before its record and done.json:
    # the rerun resumes that round, fetching nothing again, and finishes the shard in place.
    landed = tmp_path / "wds" / "00003.tar"
    tar = landed.read_bytes()
    (tmp_path / "wds" / "_amused" / "retry-001" / "done.json").unlink()
    (tmp_path / "wds" / "_amused" / "records" / "00003.json").unlink()
    resumed = download(dataclasses.replace(cfg, retry_failed=True))
    assert (counted(resumed), resumed.shards) == (counted(retried), 4) and sum(Handler.hits.values()) == hits
    assert landed.read_bytes() == tar and read_json(record_url(out, 3))["supersedes"] == records[3]["supersedes"]

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


def write_shard(folder, shard: int, outcomes: list[tuple[str, str | None]], tar: bytes | None = None) -> None:
    """A finished shard as img2dataset leaves it: per sample (sample key, error message or
    None for a success), the successes' files in the tar in reverse key order."""
    keys = [f"{shard:05d}{i:04d}" for i in range(len(outcomes))]
    members = [(f"{k}{ext}", data) for k, (_, error) in zip(keys, outcomes) if error is None
               for ext, data in ((".jpg", jpeg(int(k) % 97)), (".txt", b"c"))]
    (folder / f"{shard:05d}.tar").write_bytes(tar if tar is not None else tar_bytes(members[::-1]))
    pq.write_table(pa.table({"key": keys, "url": [f"http://x/{key}" for key, _ in outcomes], "caption": ["c"] * len(keys),
                             "sample_key": [key for key, _ in outcomes],
                             "status": ["success" if e is None else "failed_to_download" for _, e in outcomes],
                             "error_message": [e for _, e in outcomes]}), folder / f"{shard:05d}.parquet")
    (folder / f"{shard:05d}_stats.json").write_text(f'{{"duration": {1.5 + shard}}}')


def records_of(folder, processes: int = 1) -> dict:
    cfg = DownloadConfig(input=str(folder), output=str(folder), processes=processes)
    tasks = Tasks(cfg)
    try:
        return shard_records(cfg, ["sample_key"], tasks)
    finally:
        tasks.close()


def test_per_shard_records_in_a_process_pool_merge_like_the_oracle_and_a_rerun_reads_one_object(tmp_path):
    errors = [None, None, "HTTP Error 404: Not Found", "HTTP Error 503: Service Unavailable", "timed out",
              "Image decoding error"]
    for shard in range(6):
        write_shard(tmp_path, shard, [(f"k{shard}-{i}", errors[(shard + i) % len(errors)]) for i in range(6)])
    records = records_of(tmp_path, processes=2)
    assert sorted(records) == list(range(6))
    assert counted(merge(str(tmp_path), records, {})) == final_states(str(tmp_path))
    assert {r["node"] for r in records.values()} == {socket.gethostname()}
    for shard, r in records.items():
        assert read_json(record_url(str(tmp_path), shard)) == r
        with open(tmp_path / f"{shard:05d}.tar", "rb") as fh:
            keys = [s.key for s in iter_samples(fh, "x.tar")]
        assert keys == sorted(keys) and len(keys) == r["successes"] == r["members"] // 2
        pending = pq.read_table(tmp_path / "_amused" / "pending" / f"{shard:05d}.parquet")
        assert sorted(pending.column("reason").to_pylist()) == ["http_5xx", "timeout"]
        assert r["pending"] == {"1": 2} and pending.column("attempts").to_pylist() == [1, 1]
    # A rerun takes the records from the one cached object: an edit of a record file is not
    # seen until the cache is gone (then each record is read by a task).
    edited = {**records[1], "successes": 99}
    (tmp_path / "_amused" / "records" / "00001.json").write_text(json.dumps(edited))
    assert records_of(tmp_path) == records
    (tmp_path / "_amused" / "records.parquet").unlink()
    assert records_of(tmp_path)[1] == edited
    # deleting a record makes its shard be finished again: a tar damaged since is found
    (tmp_path / "_amused" / "records" / "00002.json").unlink()
    (tmp_path / "00002.tar").write_bytes((tmp_path / "00002.tar").read_bytes()[:700])
    with pytest.raises(ShardFormatError, match=r"^1 damaged .*00002\.tar"):
        records_of(tmp_path)


def test_retry_groups_pack_consecutive_shards_and_skip_what_a_landed_round_took():
    def record(pending, origin=None):
        return {"pending": pending, "origin": origin}

    records = {0: record({"1": 60}), 1: record({"1": 50}), 2: record({}), 3: record({"1": 30, "2": 10}),
               4: record({"2": 5, "3": 7}, {"plan": "retry-000", "group": 0})}
    # at most 100 samples a file; samples with 3 attempts are given up
    assert retry_groups(records, [], below=3, per_shard=100) == [[[0, 0]], [[1, 0], [3, 0], [4, 0]]]
    # shard 4 is round retry-000's first file landed: the samples with fewer than 2 attempts of
    # shards 0 and 1 were retried there; a file that did not land (group 1) took nothing
    plans = [("retry-000", {"first_shard": 4, "groups": [[[0, 0], [1, 0]], [[3, 0]]], "below": 2})]
    assert retry_groups(records, plans, below=3, per_shard=100) == [[[3, 0], [4, 0]]]
    assert retry_groups(records, plans, below=4, per_shard=100) == [[[3, 0], [4, 0]]]
    records[4]["origin"]["group"] = 1  # a shard of another file of that round: shards 0 and 1 are pending again
    assert retry_groups(records, plans, below=3, per_shard=100) == [[[0, 0]], [[1, 0], [3, 0], [4, 0]]]


def test_a_damaged_finished_shard_is_named_and_left_as_it_is(tmp_path):
    whole = tar_bytes([("b.jpg", jpeg(1)), ("b.txt", b"y"), ("a.jpg", jpeg(0)), ("a.txt", b"x")])
    cut = whole[:whole.index(b"a.jpg")]  # ends at a member boundary: no end-of-archive blocks
    for shard, data in ((0, cut), (1, whole)):
        write_shard(tmp_path, shard, [("a", None), ("b", None)], tar=data)
    files = " ".join(str(tmp_path / f"00000{suffix}") for suffix in (".tar", ".parquet", "_stats.json"))
    with pytest.raises(ShardFormatError, match=rf"1 damaged finished shard\(s\) left as they are, the others sorted: "
                                               rf".*00000\.tar: .*end-of-archive.*delete {files} and rerun"):
        records_of(tmp_path)
    assert (tmp_path / "00000.tar").read_bytes() == cut
    assert sorted(p.name for p in (tmp_path / "_amused" / "records").iterdir()) == ["00001.json"]
    with open(tmp_path / "00001.tar", "rb") as fh:  # the intact shard after the damaged one is in key order
        assert [s.key for s in iter_samples(fh, "00001.tar")] == ["a", "b"]
    with pytest.raises(ShardFormatError, match=r"^1 damaged .*00000\.tar"):  # a rerun names it again, alone
        records_of(tmp_path)


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
    (out / "_amused" / "records" / "00001.json").unlink()
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


def test_a_retry_round_of_the_older_layout_is_refused_by_name(tmp_path):
    """Before per-shard records a retry plan kept no groups; its shards cannot be traced, so
    the summary refuses the folder, naming the plan, instead of failing on a missing key."""
    plan = tmp_path / "wds" / STATE / "retry-000" / "plan.json"
    plan.parent.mkdir(parents=True)
    plan.write_text(json.dumps({"first_shard": 3, "samples": 5}))
    with pytest.raises(ValueError, match=f"{re.escape(str(plan))}: a retry round of an older amused download"):
        _plans(str(tmp_path / "wds"))
