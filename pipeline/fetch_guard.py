"""The URL policy at fetch time, inside img2dataset's worker processes.

img2dataset fetches with `urllib.request.urlopen` in processes it spawns (multiprocessing
with the spawn start method, or Ray workers), so an opener installed in the driver never
reaches them. It builds one `Downloader` and ships it to every worker; `guarded_downloads`
wraps that object so that, in the worker, each shard runs with an opener that

- judges every request's URL (scheme and host, decoded as the client will) before it is
  sent, and every redirect hop, the final one included, before it is followed;
- resolves the host itself (or takes the addresses the user pinned it to, `--resolve`),
  judges every resolved address (a DNS answer or pin pointing at 127.x, 10.x or
  169.254.169.254 is refused; a name in the allow list is trusted) and connects only to
  a judged address, so a second, different DNS answer (rebinding) is never asked for;
- ignores proxy settings (through a proxy the address it connects to cannot be judged)
  and speaks only http and https.

A refusal is an error message that `pipeline.download.classify` turns into a permanent
failure reason: `policy_url`, `policy_redirect` or `policy_address`.

With a `Politeness`, the opener is also the polite client of `pipeline.politeness`: its
User-Agent, per-domain caps, circuit breaker and robots.txt, its state kept per process
for the run (`guarded_downloads` names each run), so it holds across the shards one
process downloads, and no longer: img2dataset's multiprocessing pool renews each process
every 5 shards (`maxtasksperchild=5`); with Ray it lives per worker process.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import ipaddress
import socket
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from functools import partial

from amused.pipeline.politeness import Courtesy, HeldResponse, NotSent, Politeness, courtesy_for
from amused.pipeline.urls import AddressPolicy

# host, port -> getaddrinfo-shaped entries (family, type, proto, canonname, sockaddr)
Resolver = Callable[[str, int], list]


class PolicyRefused(NotSent):
    """A request the URL policy does not allow; its text names the URL or address."""


def system_resolver(host: str, port: int) -> list:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def pinned_resolver(pins: dict[str, tuple[str, ...]], fallback: Resolver = system_resolver) -> Resolver:
    """`fallback`, except that a pinned host name (`pipeline.urls.parse_pins`) is answered
    with its pinned addresses, in getaddrinfo's shape, without asking DNS."""
    def resolve(host: str, port: int) -> list:
        addresses = pins.get(host.lower().removesuffix("."))
        if addresses is None:
            return fallback(host, port)
        return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port)) for a in addresses]
    return resolve


def connect_judged(policy: AddressPolicy, resolve: Resolver, address: tuple[str, int], timeout,
                   source_address=None) -> socket.socket:
    """`socket.create_connection`, to an address of `host` the policy allows."""
    host, port = address
    entries = resolve(host, port)
    trusted = policy.name_trusted(host)
    judged = [e for e in entries if trusted or policy.address_allowed(ipaddress.ip_address(e[4][0]))]
    if not judged:
        refused = ", ".join(sorted({e[4][0] for e in entries}))
        raise PolicyRefused(f"URL policy refused address {refused} of host {host}")
    error = None
    for entry in judged:
        try:  # an address literal: create_connection resolves nothing
            return socket.create_connection(entry[4][:2], timeout, source_address)
        except OSError as exc:
            error = exc
    raise error


def _guarded(connection_class: type, connect) -> Callable[..., http.client.HTTPConnection]:
    def make(host, **kwargs):
        conn = connection_class(host, **kwargs)
        conn._create_connection = connect  # http.client's own seam for how it opens the socket
        conn.response_class = HeldResponse  # tells the politeness state when its body is done
        return conn
    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, connect, courtesy: Courtesy | None):
        super().__init__()
        self._connection = _guarded(http.client.HTTPConnection, connect)
        self._courtesy = courtesy

    def _open(self, req):
        return self.do_open(self._connection, req)

    def http_open(self, req):
        if self._courtesy is None:
            return self._open(req)
        return self._courtesy.open(req, self._open, self.parent)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, connect, courtesy: Courtesy | None):
        super().__init__()
        self._connection = _guarded(http.client.HTTPSConnection, connect)
        self._courtesy = courtesy

    def _open(self, req):
        return self.do_open(self._connection, req, context=self._context)

    https_open = _HTTPHandler.http_open


class _URLJudge(urllib.request.BaseHandler):
    """Judges each request's URL before anything is sent."""

    handler_order = 100  # before every other pre-processor

    def __init__(self, policy: AddressPolicy):
        self.policy = policy

    def http_request(self, req):
        if not self.policy.url_allowed(req.full_url):
            raise PolicyRefused(f"URL policy refused {req.full_url}")
        return req

    https_request = http_request


class _RedirectJudge(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: AddressPolicy):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not self.policy.url_allowed(newurl):
            fp.close()
            raise PolicyRefused(f"URL policy refused redirect ({code}) from {req.full_url} to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def guarded_opener(policy: AddressPolicy, resolve: Resolver = system_resolver,
                   courtesy: Courtesy | None = None) -> urllib.request.OpenerDirector:
    connect = partial(connect_judged, policy, resolve)
    opener = urllib.request.OpenerDirector()
    for handler in (_URLJudge(policy), _HTTPHandler(connect, courtesy), _HTTPSHandler(connect, courtesy),
                    _RedirectJudge(policy),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                    urllib.request.UnknownHandler()):
        opener.add_handler(handler)
    return opener


class GuardedDownloader:
    """img2dataset's Downloader with the guarded opener installed around each shard, in
    whichever process runs it; the previous opener comes back afterwards (a Ray worker
    runs other tasks too). It travels to the workers pickled, pins, politeness and run
    name included; `is_disallowed` is img2dataset's X-Robots-Tag rule."""

    def __init__(self, downloader, allow: tuple[str, ...], pins: dict[str, tuple[str, ...]],
                 politeness: Politeness | None, run: str, is_disallowed: Callable):
        self.downloader = downloader
        self.allow = allow
        self.pins = pins
        self.politeness = politeness
        self.run = run
        self.is_disallowed = is_disallowed

    def __call__(self, row):
        courtesy = None
        if self.politeness is not None:
            d = self.downloader  # the opt-out verdict img2dataset will reach, with its own settings
            opted_out = None if not d.disallowed_header_directives else partial(
                self.is_disallowed, user_agent_token=d.user_agent_token,
                disallowed_header_directives=d.disallowed_header_directives)
            courtesy = courtesy_for(self.run, self.politeness, opted_out)
        previous = urllib.request._opener
        urllib.request.install_opener(guarded_opener(AddressPolicy(self.allow), pinned_resolver(self.pins), courtesy))
        try:
            return self.downloader(row)
        finally:
            urllib.request.install_opener(previous)


@contextlib.contextmanager
def guarded_downloads(allow: tuple[str, ...], pins: dict[str, tuple[str, ...]],
                      politeness: Politeness | None = None) -> Iterator[None]:
    """While open, every `img2dataset.download` in this process fetches through the guard,
    host names in `pins` resolved to their pinned addresses, as a polite client if
    `politeness` is given; each download run gets its own politeness state."""
    # img2dataset costs ~4 s to import and the CLI imports this module through download.py;
    # import_module because the package's `main` attribute is a function, not the module.
    main = importlib.import_module("img2dataset.main")
    is_disallowed = importlib.import_module("img2dataset.downloader").is_disallowed

    original = main.Downloader
    main.Downloader = lambda **kwargs: GuardedDownloader(original(**kwargs), allow, pins, politeness,
                                                         uuid.uuid4().hex, is_disallowed)
    try:
        yield
    finally:
        main.Downloader = original
