"""The URL policy as the HTTP client meets it: hosts decoded and mapped the way the client
resolves them, IPv4 inside IPv6, every redirect hop, DNS answers judged at connect time,
retries under the current run's policy. Only loopback addresses: the allowed server
listens on 127.0.0.2, trap servers on 127.0.0.1 and ::1 count every request that
should never have been made."""

import dataclasses
import ipaddress
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amused.pipeline.download import DownloadConfig, classify, download, prepare_input
from amused.pipeline.fetch_guard import guarded_opener
from amused.pipeline.urls import AddressPolicy, normalize
from tests.samples import jpeg

REFUSED = [
    "http://%31%32%37.0.0.1/a.jpg",  # percent-encoded 127
    "http://%6c%6f%63%61%6c%68%6f%73%74/a.jpg",  # percent-encoded localhost
    "http://%31%30.0.0.1:8080/a.jpg",
    "http://127.0.0.1%3a80/a.jpg",  # a port hidden in the host
    "http://%ff.example.com/a.jpg",  # not UTF-8 once decoded
    "http://%2531%2532%2537.0.0.1/a.jpg",  # a `%` left after the client's one decoding
    "http://example.com%40127.0.0.1/a.jpg",
    "http://１２７.０.０.１/a.jpg",  # full-width digits and dot
    "http://127。0。0。1/a.jpg",  # ideographic full stop
    "http://127．0．0．1/a.jpg",
    "http://127｡0｡0｡1/a.jpg",
    "http://①②⑦.0.0.1/a.jpg",  # circled digits
    "http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/a.jpg",  # circled letters
    "http://ｌｏｃａｌｈｏｓｔ/a.jpg",
    "http://１６９.２５４.１６９.２５４/latest/meta-data/",
    "http://ｍｅｔａｄａｔａ.google.internal/",
    "http://١٢٧.0.0.1/a.jpg",  # Arabic-Indic digits: no clean IDNA form
    "http://exa mple.com/a.jpg",
    "http://a\\@example.com/a.jpg",
    "http://[::127.0.0.1]/a.jpg",  # IPv4-compatible
    "http://[::ffff:127.0.0.1]/a.jpg",  # IPv4-mapped
    "http://[::ffff:a9fe:a9fe]/a.jpg",
    "http://[64:ff9b::7f00:1]/a.jpg",  # NAT64 of 127.0.0.1
    "http://[64:ff9b::a00:1]/a.jpg",  # NAT64 of 10.0.0.1
    "http://[64:ff9b:1::808:808]/a.jpg",  # local-use NAT64: not globally routable
    "http://[2002:7f00:1::]/a.jpg",  # 6to4 of 127.0.0.1
    "http://[2002:a9fe:a9fe::1]/a.jpg",  # 6to4 of 169.254.169.254
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/a.jpg",  # Teredo, client 127.0.0.1
    "http://[::]/a.jpg",
    "http://[fe80::1%25eth0]/a.jpg",
]
KEPT = [
    "http://example.com/a.jpg",
    "https://images.example.org:8443/x/y.png?size=large",
    "http://müller.de/a.jpg",
    "http://例え.jp/a.jpg",
    "http://example.com/caf%C3%A9.jpg",  # percent signs in the path only
    "http://8.8.8.8/a.jpg",
    "http://[2606:4700::1111]/a.jpg",
    "http://[::ffff:8.8.8.8]/a.jpg",
    "http://[64:ff9b::808:808]/a.jpg",
    "http://[2002:808:808::1]/a.jpg",
]


def test_hosts_are_judged_as_the_client_resolves_them():
    policy = AddressPolicy()
    verdicts = policy(normalize(pa.array(REFUSED + KEPT))).to_pylist()
    assert dict(zip(REFUSED + KEPT, verdicts)) == {**{u: False for u in REFUSED}, **{u: True for u in KEPT}}
    assert [policy.url_allowed(u) for u in REFUSED + KEPT] == verdicts
    # the allow list meets the decoded host; a network covers its embedded forms
    allowed = AddressPolicy(("127.0.0.1",))
    assert allowed.url_allowed("http://%31%32%37.0.0.1/") and allowed.url_allowed("http://[::ffff:127.0.0.1]/")
    assert not allowed.url_allowed("http://localhost/") and not allowed.url_allowed("http://127.0.0.2/")


# address -> verdict of the project's own table, whatever the interpreter's `is_global`
# says (CPython 3.11.10 / 3.12.4 changed it, e.g. for 6to4 and 2001::/23).
TABLE = {
    "8.8.8.8": True, "1.1.1.1": True, "100.63.255.255": True, "192.0.0.9": True, "192.0.0.10": True,
    "0.1.2.3": False, "10.1.2.3": False, "100.64.0.1": False, "127.0.0.2": False, "169.254.169.254": False,
    "172.31.0.1": False, "192.0.0.8": False, "192.0.0.170": False, "192.0.2.1": False, "192.88.99.1": False,
    "192.168.1.1": False, "198.19.0.1": False, "198.51.100.1": False, "203.0.113.1": False, "224.0.0.1": False,
    "240.0.0.1": False, "255.255.255.255": False,
    "2606:4700::1111": True, "2a00:1450::1": True, "2001:1::1": True, "2001:3::1": True, "2001:4:112::1": True,
    "2001:20::1": True, "2001:30::1": True,
    "::": False, "::1": False, "1::1": False, "100::1": False, "100:0:0:1::1": False, "2001:2::1": False,
    "2001:10::1": False, "2001:db8::1": False, "2001:4::1": False, "3fff::1": False, "5f00::1": False,
    "fc00::1": False, "fd12:3456::1": False, "fe80::1": False, "fec0::1": False, "ff02::1": False,
    # IPv4 inside IPv6, judged by the same table
    "::ffff:8.8.8.8": True, "::ffff:192.0.0.9": True, "::ffff:10.0.0.1": False, "::ffff:192.0.0.8": False,
    "::8.8.8.8": True, "::10.0.0.1": False,
    "64:ff9b::808:808": True, "64:ff9b::c000:8": False, "64:ff9b:1::808:808": False,
    "2002:808:808::1": True, "2002:a00:1::": False, "2002:c000:208::1": False, "2002:6464:101::": False,
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7": True,  # Teredo, server 65.54.227.120, client 8.8.8.8
    "2001:0:4136:e378:8000:63bf:80ff:fffe": False,  # client 127.0.0.1
    "2001:0:a00:1:8000:63bf:f7f7:f7f7": False,  # server 10.0.0.1
}


def test_the_address_table_gives_the_same_verdicts_on_every_python():
    policy = AddressPolicy()
    assert {a: policy.address_allowed(ipaddress.ip_address(a)) for a in TABLE} == TABLE
    urls = [f"http://[{a}]/" if ":" in a else f"http://{a}/" for a in TABLE]
    assert policy(normalize(pa.array(urls))).to_pylist() == list(TABLE.values())
    # the allow list reaches an IPv4 address inside IPv6 too
    assert AddressPolicy(("10.0.0.0/8",)).address_allowed(ipaddress.ip_address("2002:a00:1::"))


@pytest.mark.parametrize("entry", ["127.0.0.1:8080", "http://example.com", "exa mple.com"])
def test_allow_list_entries_must_be_addresses_networks_or_names(entry):
    with pytest.raises(ValueError, match="allow_hosts: .*neither an address"):
        AddressPolicy((entry,))


@pytest.mark.parametrize("field, value, message", [
    ("timeout", 0, "timeout: 0 must be >= 1"),
    ("timeout", -5, "timeout: -5 must be >= 1"),
    ("encode_quality", 500, r"encode_quality: 500 must be a JPEG quality in 1\.\.100"),
    ("encode_quality", 0, "encode_quality: 0"),
    ("threads", 0, "threads: 0"),
    ("max_attempts", 0, "max_attempts: 0"),
    ("distributor", "spark", "distributor: 'spark'"),
    ("user_agent_token", "me\r\nX-Evil: 1", "user_agent_token: "),
    ("allow_hosts", "127.0.0.1, localhost:8000", "allow_hosts: 'localhost:8000'"),
    ("resolve", "evil.test", "resolve: 'evil.test' is not HOST=ADDRESS"),
    ("resolve", "a.test=127.0.0.1, 127.0.0.2=127.0.0.1", "resolve: '127.0.0.2=127.0.0.1' is not HOST=ADDRESS"),
    ("resolve", "2130706433=127.0.0.1", "with HOST a host name"),
    ("resolve", "evil.test=localhost", "resolve: 'evil.test=localhost': 'localhost' is not an IP address"),
    ("resolve", "evil.test=127.1", "'127.1' is not an IP address"),
    ("resolve", "evil.test=127.0.0.1:80", "is not an IP address"),
    ("output", " ", "output: empty path"),
])
def test_download_config_checks_at_construction(field, value, message):
    with pytest.raises(ValueError, match=message):
        DownloadConfig(**{"input": "in", "output": "out", field: value})


# ----- servers -----------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """/img/N.jpg an image, /error/N.jpg a 500, /to/<url> a 302 to <url>, no robots.txt (404)."""

    hits: Counter = Counter()  # (server address, path) -> requests

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.hits[self.server.server_address[0], self.path] += 1
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/robots.txt":
            self.send_error(404)
            return
        kind, name = self.path.strip("/").split("/", 1)
        body = jpeg(int(name.split(".")[0])) if kind == "img" else b"boom"
        self.send_response(200 if kind == "img" else 500)
        self.send_header("Content-Type", "image/jpeg" if kind == "img" else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve(address: str) -> tuple[ThreadingHTTPServer, int]:
    httpd = (Server6 if ":" in address else ThreadingHTTPServer)((address, 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


@pytest.fixture(scope="module")
def servers():
    """Ports of the allowed server (127.0.0.2) and of the traps (127.0.0.1, ::1)."""
    running = {address: serve(address) for address in ("127.0.0.2", "127.0.0.1", "::1")}
    yield {address: port for address, (_, port) in running.items()}
    for httpd, _ in running.values():
        httpd.shutdown()


def trap_hits() -> int:
    return sum(n for (address, _), n in Handler.hits.items() if address != "127.0.0.2")


def fetch(opener, url: str) -> tuple[str, str]:
    """(reason, class) of one fetch through the opener: 'success' or classify()'s."""
    try:
        with opener.open(url, timeout=5) as r:
            r.read()
        return "success", "success"
    except Exception as exc:  # what img2dataset records: str() of anything raised
        return classify(str(exc))


def test_guard_judges_every_hop_and_every_dns_answer(servers):
    ok, trap, trap6 = servers["127.0.0.2"], servers["127.0.0.1"], servers["::1"]
    answers = {"evil.test": ["127.0.0.1"], "mixed.test": ["127.0.0.1", "127.0.0.2"], "good.test": ["127.0.0.2"],
               "meta.test": ["169.254.169.254"]}
    asked = Counter()

    def resolve(host, port):  # a test DNS: names of our own to loopback addresses
        asked[host] += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers.get(host, [host])]

    opener = guarded_opener(AddressPolicy(("127.0.0.2",)), resolve)
    base = f"http://127.0.0.2:{ok}"
    cases = {
        f"{base}/img/1.jpg": "success",
        f"http://good.test:{ok}/img/2.jpg": "success",
        f"http://mixed.test:{ok}/img/3.jpg": "success",  # only the judged answer is connected to
        f"http://evil.test:{trap}/img/4.jpg": "policy_address",
        f"http://meta.test:{trap}/latest/meta-data/": "policy_address",
        f"http://localhost:{trap}/img/5.jpg": "policy_url",
        f"http://%31%32%37.0.0.1:{trap}/img/6.jpg": "policy_url",
        f"{base}/to/{base}/img/7.jpg": "success",
        f"{base}/to/http://good.test:{ok}/img/8.jpg": "success",
        f"{base}/to/http://localhost:{trap}/img/9.jpg": "policy_redirect",
        f"{base}/to/http://[::1]:{trap6}/img/10.jpg": "policy_redirect",
        f"{base}/to/http://%6c%6f%63%61%6c%68%6f%73%74:{trap}/img/11.jpg": "policy_redirect",
        f"{base}/to/{base}/to/http://[::ffff:127.0.0.1]:{trap}/img/13.jpg": "policy_redirect",  # the 2nd hop
        f"{base}/to/ftp://127.0.0.1/img/14.jpg": "policy_redirect",
        f"{base}/to/file:///etc/passwd": "policy_redirect",
        f"{base}/to/http://evil.test:{trap}/img/15.jpg": "policy_address",
        "file:///etc/passwd": "bad_url",
    }
    got = {url: fetch(opener, url) for url in cases}
    assert got == {url: (reason, "success" if reason == "success" else "permanent") for url, reason in cases.items()}
    assert trap_hits() == 0
    assert asked["mixed.test"] == 1 and asked["good.test"] == 2  # one DNS question per connection
    # a name in the allow list vouches for its own DNS answers
    by_name = guarded_opener(AddressPolicy(("good.test",)), resolve)
    assert fetch(by_name, f"http://good.test:{ok}/img/16.jpg") == ("success", "success")
    assert fetch(by_name, f"http://mixed.test:{ok}/img/17.jpg")[0] == "policy_address"


def write_urls(folder, urls: list[str]) -> str:
    folder.mkdir()
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}),
                   folder / "00000.parquet")
    return str(folder)


def test_download_refuses_hops_and_answers_then_retries_under_the_current_policy(servers, tmp_path, ray_session):
    """The whole `amused download` through img2dataset's worker processes (multiprocessing,
    then Ray for the retry round), DNS answers pinned with --resolve."""
    ok, trap, trap6 = servers["127.0.0.2"], servers["127.0.0.1"], servers["::1"]
    base = f"http://127.0.0.2:{ok}"
    urls = [f"{base}/img/0.jpg", f"{base}/to/{base}/img/1.jpg", f"{base}/error/2.jpg",
            f"{base}/to/http://localhost:{trap}/img/3.jpg", f"{base}/to/http://[::1]:{trap6}/img/4.jpg",
            f"{base}/to/http://%31%32%37.0.0.1:{trap}/img/5.jpg",
            # refused before img2dataset sees them
            f"http://%31%32%37.0.0.1:{trap}/img/6.jpg", f"http://１２７.０.０.１:{trap}/img/7.jpg",
            f"http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ:{trap}/img/8.jpg", f"http://[::127.0.0.1]:{trap}/img/9.jpg",
            # names answered by the pins, never by DNS: a pin is judged like any DNS answer
            f"http://evil.test:{trap}/img/10.jpg", f"http://good.test:{ok}/img/11.jpg",
            f"http://good.test:{ok}/error/12.jpg"]
    cfg = DownloadConfig(input=write_urls(tmp_path / "meta", urls), output=str(tmp_path / "wds"), image_size=64,
                         processes=1, threads=4, timeout=5, allow_hosts="127.0.0.2",
                         resolve="evil.test=127.0.0.1,good.test=127.0.0.2", samples_per_shard=100)
    first = download(cfg)
    assert first.policy_rejected == {"url_scheme": 0, "url_address": 4}
    assert first.successes == 3 and first.transient_pending == 2
    assert first.failures == {"http_5xx": 2, "policy_redirect": 3, "policy_address": 1}
    assert Handler.hits["127.0.0.2", "/img/11.jpg"] == 1
    assert trap_hits() == 0
    assert "policy_redirect" in first.table() and "(permanent)" in first.table()

    # A retry without the first run's allow list must not fetch what only that list let
    # through, whether named by address or by a pinned name.
    errors = Handler.hits["127.0.0.2", "/error/2.jpg"], Handler.hits["127.0.0.2", "/error/12.jpg"]
    retried = download(dataclasses.replace(cfg, allow_hosts="", retry_failed=True, distributor="ray"))
    assert (Handler.hits["127.0.0.2", "/error/2.jpg"], Handler.hits["127.0.0.2", "/error/12.jpg"]) == errors
    assert retried.failures == {"policy_url": 1, "policy_address": 2, "policy_redirect": 3}
    assert retried.transient_pending == 0 and retried.successes == 3


def test_prepare_input_refuses_encoded_spellings(tmp_path):
    src = write_urls(tmp_path / "meta", REFUSED + KEPT)
    counts = prepare_input(src + "/00000.parquet", str(tmp_path / "checked.parquet"), AddressPolicy())
    assert counts == {"url_scheme": 0, "url_address": len(REFUSED)}
    assert sorted(pq.read_table(tmp_path / "checked.parquet").column("url").to_pylist()) == sorted(KEPT)
