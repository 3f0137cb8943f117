"""The download as a polite client, against one HTTP server on 127.0.0.1 that plays
several web sites (names pinned to it, like curl --resolve) and counts, per site, every
request it receives, when it started and how many were in flight."""

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amused.pipeline.download import DownloadConfig, download
from amused.pipeline.fetch_guard import guarded_opener, pinned_resolver
from amused.pipeline.politeness import (
    BREAKER_OPEN,
    ROBOTS_DISALLOWED,
    ROBOTS_MAX_BYTES,
    ROBOTS_UNREACHABLE,
    Courtesy,
    Politeness,
)
from amused.pipeline.urls import AddressPolicy
from tests.samples import jpeg

HOSTS = ("a.test", "b.test", "c.test", "d.test", "e.test", "f.test", "g.test", "h.test", "i.test")
TOKEN, CONTACT = "amusedtest", "https://example.org/amused-crawler"
ROBOTS = {  # host -> (status, robots.txt)
    "a.test": (200, "User-agent: *\nDisallow: /private/\n\nUser-agent: otherbot\nDisallow: /\n"),
    "b.test": (404, ""),
    "c.test": (404, ""),
    "d.test": (404, ""),
    "e.test": (200, "# nothing disallowed\n"),
    "f.test": (503, ""),  # unreachable: nothing of f.test may be fetched
    # a rule past the size cap is never read; one before it is
    "g.test": (200, "User-agent: *\nDisallow: /private/\n" + "#" * ROBOTS_MAX_BYTES + "\nDisallow: /late/\n"),
    # moved within the origin: the text is the new place
    "h.test": (301, "/robots.txt/"),
    "i.test": (301, "/en/robots.txt"),
}
MOVED = {"/robots.txt/": "User-agent: *\nDisallow: /private/\n", "/en/robots.txt": "User-agent: *\nDisallow: /private/\n"}


class Site(BaseHTTPRequestHandler):
    """/img/N.jpg an image; /private/N.jpg, /late/N.jpg too (robots decide); /noml/N.jpg
    with `X-Robots-Tag: noml`; /theirs/N.jpg opted out for otherbot only; /ours/N.jpg for
    our token only; /down/N.jpg a 503; /slow/N.jpg an image whose body follows its
    headers 0.3 s later."""

    lock = threading.Lock()
    requests: list = []  # (host, path, start time, user agent)
    in_flight: Counter = Counter()
    most_in_flight: Counter = Counter()

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes, headers=(), pause: float = 0.0):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()  # sent now: a slot freed at the headers would let the next request in
        time.sleep(pause)
        # Out of flight before the body goes: once the client has read it, it may close and send
        # the next request before this thread runs again, and that one would be counted as a third.
        self._land()
        self.wfile.write(body)

    def _land(self):
        with Site.lock:
            if self.flying:
                self.flying = False
                Site.in_flight[self.host] -= 1

    def do_GET(self):
        host = self.host = self.headers["Host"].split(":")[0]
        with Site.lock:
            Site.requests.append((host, self.path, time.monotonic(), self.headers["User-Agent"]))
            Site.in_flight[host] += 1
            Site.most_in_flight[host] = max(Site.most_in_flight[host], Site.in_flight[host])
            self.flying = True
        try:
            self._answer(host)
        finally:
            self._land()

    def _answer(self, host: str):
        if self.path == "/robots.txt":
            status, text = ROBOTS[host]
            if status == 301:
                return self._send(301, b"", [("Location", text)])
            return self._send(status, text.encode())
        if self.path in MOVED:
            return self._send(200, MOVED[self.path].encode())
        kind, name = self.path.strip("/").split("/", 1)
        body = jpeg(int(name.split(".")[0]))
        if kind == "down":
            return self._send(503, b"busy")
        opt_out = {"noml": "noml", "theirs": "otherbot: noml", "ours": f"{TOKEN}: noai"}.get(kind)
        self._send(200, body, [("X-Robots-Tag", opt_out)] if opt_out else [], pause=0.3 if kind == "slow" else 0.0)


@pytest.fixture(scope="module")
def site():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


@pytest.fixture
def served(site):
    """The port, with the server's records emptied."""
    with Site.lock:
        Site.requests.clear()
        Site.in_flight.clear()
        Site.most_in_flight.clear()
    return site


def asked(host: str, prefix: str = "/") -> int:
    return sum(1 for h, path, _, _ in Site.requests if h == host and path.startswith(prefix))


def politeness(**kw) -> Politeness:
    return Politeness(**{"contact_url": CONTACT, "token": TOKEN, "concurrency": 8, "rate": 0.0, "breaker": 0,
                         "robots": True, **kw})


def fetch_all(port: int, paths: list[str], courtesy: Courtesy, threads: int = 8) -> list[str]:
    """Fetches `host/path` entries on 8 threads like img2dataset; 'ok' or the error text of each."""
    opener = guarded_opener(AddressPolicy(("127.0.0.1",)), pinned_resolver({h: ("127.0.0.1",) for h in HOSTS}),
                            courtesy)

    def one(path: str) -> str:
        host, rest = path.split("/", 1)
        try:
            with opener.open(f"http://{host}:{port}/{rest}", timeout=5) as r:
                r.read()
            return "ok"
        except Exception as exc:  # what img2dataset records: str() of anything raised
            return str(exc)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, paths))


def test_robots_txt_is_asked_once_per_site_and_honoured(served):
    paths = [f"a.test/img/{i}.jpg" for i in range(8)] + [f"a.test/private/{i}.jpg" for i in range(4)] + \
            [f"b.test/img/{i}.jpg" for i in range(4)] + [f"f.test/img/{i}.jpg" for i in range(3)] + \
            [f"g.test/private/{i}.jpg" for i in range(2)] + [f"g.test/late/{i}.jpg" for i in range(2)]
    got = dict(zip(paths, fetch_all(served, paths, Courtesy(politeness(), None))))
    for path, result in got.items():
        host, kind = path.split("/")[:2]
        if kind == "private":
            assert result.startswith(f"{ROBOTS_DISALLOWED} http://{host}:{served}/private/"), result
        elif host == "f.test":
            assert result.startswith(f"{ROBOTS_UNREACHABLE} for http://f.test:{served} (HTTP 503)"), result
        else:
            assert result == "ok", (path, result)
    assert {h: asked(h, "/robots.txt") for h in ("a.test", "b.test", "f.test", "g.test")} == dict.fromkeys(
        ("a.test", "b.test", "f.test", "g.test"), 1)
    assert asked("a.test", "/private/") == asked("g.test", "/private/") == asked("f.test", "/img/") == 0
    assert asked("a.test", "/img/") == 8 and asked("g.test", "/late/") == 2
    # robots.txt and images alike carry the identifiable User-Agent
    assert {ua for *_, ua in Site.requests} == {f"amused-pipeline/0.1.0 (compatible; {TOKEN}; +{CONTACT})"}


def test_robots_txt_moved_within_its_origin_is_followed_without_waiting_on_itself(served):
    """robots.txt redirected to another path of the same origin: its fetch is not checked
    against the robots.txt being fetched (that waited forever on itself, and every other
    thread of the origin with it); the moved rules are honoured."""
    paths = [f"{h}/{kind}/{i}.jpg" for h in ("h.test", "i.test") for kind in ("img", "private") for i in range(3)]
    got = []
    worker = threading.Thread(target=lambda: got.extend(fetch_all(served, paths, Courtesy(politeness(), None))),
                              daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "fetching behind a moved robots.txt hangs"
    for path, result in zip(paths, got):
        if "/private/" in path:
            assert result.startswith(ROBOTS_DISALLOWED), (path, result)
        else:
            assert result == "ok", (path, result)
    assert asked("h.test", "/robots.txt") == 2 and asked("i.test", "/robots.txt") == 1  # /robots.txt/ included
    assert asked("i.test", "/en/robots.txt") == 1 and asked("h.test", "/private/") == asked("i.test", "/private/") == 0


def test_the_breaker_stops_a_failing_site_after_exactly_n_requests(served):
    """Eight threads on a site that answers 503: it gets `breaker` requests, not one more,
    however many were waiting; the healthy site beside it gets all of its own."""
    paths = [p for i in range(20) for p in (f"b.test/down/{i}.jpg", f"a.test/img/{i}.jpg")]
    got = dict(zip(paths, fetch_all(served, paths, Courtesy(politeness(breaker=3), None))))
    assert asked("b.test", "/down/") == 3
    assert Counter(r.split(" for ")[0] if r.startswith(BREAKER_OPEN) else r
                   for p, r in got.items() if p.startswith("b.test")) == {"HTTP Error 503: Service Unavailable": 3,
                                                                           BREAKER_OPEN: 17}
    assert {r for p, r in got.items() if p.startswith("a.test")} == {"ok"} and asked("a.test", "/img/") == 20
    # a good answer resets the count: 2 failures, a success, 2 failures never trip it
    paths = ["b.test/down/0.jpg", "b.test/down/1.jpg", "b.test/img/0.jpg", "b.test/down/2.jpg", "b.test/down/3.jpg",
             "b.test/img/1.jpg"]
    got = fetch_all(served, paths, Courtesy(politeness(breaker=3), None), threads=1)
    assert got[2] == got[5] == "ok"


def test_per_site_concurrency_and_rate(served):
    # a slow body holds its slot until it is read and closed, not only until its headers
    fetch_all(served, [f"c.test/slow/{i}.jpg" for i in range(8)], Courtesy(politeness(concurrency=2), None))
    assert Site.most_in_flight["c.test"] == 2  # reached, never passed
    interval, n = 0.25, 6
    fetch_all(served, [f"d.test/img/{i}.jpg" for i in range(n - 1)], Courtesy(politeness(rate=1 / interval), None))
    starts = sorted(t for h, _, t, _ in Site.requests if h == "d.test")  # robots.txt counts as a start
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(starts) == n and starts[-1] - starts[0] >= 0.8 * (n - 1) * interval, gaps
    assert min(gaps) >= interval / 4, gaps


def write_urls(folder, rows: list[list[str]]) -> str:
    folder.mkdir()
    for i, urls in enumerate(rows):
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {u}" for u in urls]}), folder / f"{i:05d}.parquet")
    return str(folder)


def test_download_is_a_polite_client(served, tmp_path):
    """The whole `amused download`, one process, two shards: the state per site holds
    across the shards, and every skip is counted by reason."""
    base = {h: f"http://{h}:{served}" for h in HOSTS}
    shards = [
        [f"{base['a.test']}/img/{i}.jpg" for i in range(3)] + [f"{base['a.test']}/private/{i}.jpg" for i in range(2)]
        + [f"{base['a.test']}/noml/0.jpg", f"{base['a.test']}/theirs/0.jpg"]
        + [f"{base['b.test']}/down/{i}.jpg" for i in range(4)] + [f"{base['c.test']}/slow/{i}.jpg" for i in range(4)],
        [f"{base['a.test']}/img/{i}.jpg" for i in range(3, 6)] + [f"{base['b.test']}/down/{i}.jpg" for i in range(4, 8)]
        + [f"{base['c.test']}/slow/{i}.jpg" for i in range(4, 8)] + [f"{base['e.test']}/ours/{i}.jpg" for i in range(5)]
        + [f"{base['f.test']}/img/{i}.jpg" for i in range(2)],
    ]
    cfg = DownloadConfig(input=write_urls(tmp_path / "meta", shards), output=str(tmp_path / "wds"), image_size=64,
                         processes=1, threads=8, timeout=5, allow_hosts="127.0.0.1",
                         resolve=",".join(f"{h}=127.0.0.1" for h in HOSTS), samples_per_shard=100,
                         user_agent_token=TOKEN, contact_url=CONTACT, domain_concurrency=2, domain_rate=20,
                         domain_breaker=3)
    summary = download(cfg)
    assert summary.successes == 6 + 1 + 8  # a.test's images and `theirs`, c.test's slow ones
    # b.test's failures open its breaker (transient), e.test's opt-outs its own (permanent)
    assert summary.failures == {"robots_disallowed": 2, "opted_out": 1 + 3, "http_5xx": 3, "domain_breaker": 5,
                                "domain_opted_out": 2, "robots_unreachable": 2}
    assert summary.transient_pending == 3 + 5 + 2
    assert {h: asked(h, "/robots.txt") for h in ("a.test", "b.test", "c.test", "e.test", "f.test")} == dict.fromkeys(
        ("a.test", "b.test", "c.test", "e.test", "f.test"), 1)
    assert asked("a.test", "/private/") == asked("f.test", "/img/") == 0
    assert asked("b.test", "/down/") == 3 and asked("e.test", "/ours/") == 3  # failures, then opt-outs, trip it
    assert max(Site.most_in_flight.values()) == 2
    starts = sorted(t for h, _, t, _ in Site.requests if h == "a.test")  # fast answers: only the rate spaces them
    gaps = sorted(b - a for a, b in zip(starts, starts[1:]))
    assert gaps[len(gaps) // 2] >= 0.5 / 20, gaps  # lenient: at most 20 starts a second
    assert {ua for *_, ua in Site.requests} == {f"amused-pipeline/0.1.0 (compatible; {TOKEN}; +{CONTACT})"}
    assert "robots_disallowed" in summary.table() and "domain_opted_out" in summary.table()
