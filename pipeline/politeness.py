"""How the download treats each web site: one identifiable client that a site owner can
reach, throttle and opt out of.

The settings travel pickled with img2dataset's Downloader into every download process
(see `pipeline.fetch_guard`); the state (per-domain slots, rate, circuit breaker,
robots.txt answers) lives in each process, one `Courtesy` per download run, so every cap
holds per download process. A domain is a host name (no public-suffix list: cdn1.x.com
and cdn2.x.com are two domains); robots.txt belongs to an origin (scheme, host, port).

- User-Agent: `amused-pipeline/<version> (compatible; <token>; +<contact_url>)` replaces
  img2dataset's browser string on every request, redirects and robots.txt included.
- A request to a domain starts only while fewer than `concurrency` of its requests are
  open (a response holds its slot until its body is closed or fails), at least 1/`rate`
  seconds after the previous start, and only while the domain's consecutive failures
  plus its open requests stay under `breaker`: so after its last good answer a domain
  receives at most `breaker` requests, however many threads ask.
- A failure is a connection error or timeout (body reads included), a 429 or a 5xx; an
  opt-out is a 2xx whose X-Robots-Tag opts out (img2dataset's own rule, so both agree).
  Any other answer (2xx, 3xx, 404...) resets the count. At `breaker`, the domain's
  remaining URLs fail at once without a request: `domain_breaker`, transient, since
  a site that was down may be back for `--retry-failed`.
- robots.txt is fetched once per origin, through the same guard, caps and breaker;
  the first `ROBOTS_MAX_BYTES` are parsed (RFC 9309 asks for at least 500 KiB) for the
  group of `token` (or `amused-pipeline`), `*` otherwise. A 4xx other than 429, or a
  redirect loop, means no rules (RFC 9309 2.3.1.2-3); a 429, 5xx or no answer means
  "disallow everything" for that origin, as Google does: `robots_unreachable`,
  transient. A refusal by the URL policy or the breaker is the URL's own reason. A disallowed URL fails with
  `robots_disallowed`, permanent, and is not a breaker failure: it costs the site no
  request and the site has said its other paths are welcome. Crawl-delay is not read:
  `rate` is the one per-domain pace.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.robotparser
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# X-Robots-Tag directives that opt an image out: img2dataset's own set plus `noml`.
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noml", "noindex", "noimageindex")
PRODUCT = "amused-pipeline"
VERSION = importlib.metadata.version(PRODUCT)
ROBOTS_MAX_BYTES = 512 * 1024
# Failure messages, each a fixed phrase first: `pipeline.download.classify` matches them
# at the start, so a URL quoted after the phrase cannot pass for another reason.
ROBOTS_DISALLOWED = "robots.txt disallows"
ROBOTS_UNREACHABLE = "robots.txt unreachable"
BREAKER_OPEN = "domain circuit breaker open"


@dataclass(frozen=True)
class Politeness:
    contact_url: str  # where a site owner reaches whoever runs the download ("" if none given)
    token: str | None  # product token: in the User-Agent, matched in robots.txt and X-Robots-Tag
    concurrency: int  # requests in flight per domain
    rate: float  # requests started per second per domain; 0: no cap
    breaker: int  # consecutive failures or opt-outs from a domain before it is skipped; 0: never
    robots: bool  # fetch robots.txt once per domain and honour it

    def user_agent(self) -> str:
        # Both parts are checked header-safe by DownloadConfig; http.client refuses a
        # value with a line break anyway.
        comment = "; ".join(["compatible", *([self.token] if self.token else []),
                             *([f"+{self.contact_url}"] if self.contact_url else [])])
        return f"{PRODUCT}/{VERSION} ({comment})"

    def robots_agent(self) -> str:
        return (self.token or PRODUCT).lower()


class NotSent(OSError):
    """A request refused before anything was sent: the site is not to blame for it."""


class PolitenessRefused(NotSent):
    """A request the politeness rules do not send; its text starts with a fixed phrase."""


class HeldResponse(http.client.HTTPResponse):
    """An HTTP response that tells its domain when it is done: a failed read is a
    failure, closing (explicitly, by `with`, or when collected) the end of a good one."""

    _done: Callable[[bool], None] | None = None

    def hold(self, done: Callable[[bool], None]) -> None:
        self._done = done

    def _end(self, failed: bool) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(failed)

    def read(self, amt=None):
        try:
            return super().read(amt)
        except (OSError, http.client.HTTPException):
            self._end(True)
            raise

    def close(self):
        try:
            super().close()
        finally:
            self._end(False)


class _Domain:
    def __init__(self, host: str, p: Politeness):
        self.host, self.p = host, p
        self.cond = threading.Condition()
        self.open = 0  # requests started and not yet done
        self.failures = 0  # consecutive, done ones
        self.tripped = False
        self.next_start = 0.0

    def refuse_if_tripped(self) -> None:
        if self.tripped:
            raise PolitenessRefused(f"{BREAKER_OPEN} for {self.host} after {self.p.breaker} consecutive failures "
                                    f"or opt-outs")

    def enter(self) -> None:
        """Waits for a slot, the breaker's room and the rate; then the request may start."""
        with self.cond:
            while True:
                self.refuse_if_tripped()
                if self.open < self.p.concurrency and (not self.p.breaker or self.failures + self.open < self.p.breaker):
                    break
                self.cond.wait()
            self.open += 1
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + (1 / self.p.rate if self.p.rate else 0.0)
        time.sleep(start - now)

    def leave(self, outcome: bool | None) -> None:
        """outcome: True a failure or opt-out, False a good answer, None neither (refused
        by the URL policy before anything was sent, a local error)."""
        with self.cond:
            self.open -= 1
            if outcome:
                self.failures += 1
                self.tripped = self.tripped or bool(self.p.breaker) and self.failures >= self.p.breaker
            elif outcome is False:
                self.failures = 0
            self.cond.notify_all()


class _Robots:
    """One origin's robots.txt: fetched by the first thread that asks, the others wait."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rules: urllib.robotparser.RobotFileParser | str | None = None  # parser, "allow" or the failure


class Courtesy:
    """The politeness state of one download run in one process."""

    def __init__(self, politeness: Politeness, opted_out: Callable[[http.client.HTTPMessage], bool] | None):
        self.p = politeness
        self.opted_out = opted_out
        self.user_agent = politeness.user_agent()
        self._lock = threading.Lock()
        self._domains: dict[str, _Domain] = {}
        self._robots: dict[str, _Robots] = {}

    def _domain(self, host: str) -> _Domain:
        with self._lock:
            if host not in self._domains:
                self._domains[host] = _Domain(host, self.p)
            return self._domains[host]

    def open(self, req: urllib.request.Request, do_open: Callable, parent: urllib.request.OpenerDirector):
        """`do_open(req)` under the rules above; `parent` fetches robots.txt."""
        req.add_unredirected_header("User-Agent", self.user_agent)  # wins over img2dataset's and urllib's
        parts = urllib.parse.urlsplit(req.full_url)
        domain = self._domain((parts.hostname or "").lower())
        domain.refuse_if_tripped()
        if self.p.robots and parts.path != "/robots.txt":  # robots.txt itself is always allowed (RFC 9309)
            self._check_robots(f"{parts.scheme}://{parts.netloc}", req, parent)
        domain.enter()
        try:
            response = do_open(req)
        except Exception as exc:
            # urllib wraps what the connection raised in URLError.reason
            not_sent = isinstance(getattr(exc, "reason", exc), NotSent)
            domain.leave(None if not_sent or not isinstance(exc, (OSError, http.client.HTTPException)) else True)
            raise
        status = response.status
        if status == 429 or status >= 500:
            domain.leave(True)
        elif not 200 <= status < 300:
            domain.leave(False)  # redirects and errors are answered; their bodies are not read
        elif self.opted_out is not None and parts.path != "/robots.txt" and self.opted_out(response.headers):
            domain.leave(True)  # img2dataset reads the same headers and records the opt-out
        elif isinstance(response, HeldResponse):
            response.hold(domain.leave)
        else:
            domain.leave(False)
        return response

    def _check_robots(self, origin: str, req: urllib.request.Request, parent: urllib.request.OpenerDirector):
        with self._lock:
            if origin not in self._robots:
                self._robots[origin] = _Robots()
            robots = self._robots[origin]
        with robots.lock:
            if robots.rules is None:
                robots.rules = self._fetch_robots(origin, req.timeout, parent)
        if isinstance(robots.rules, str):
            if robots.rules != "allow":
                raise PolitenessRefused(f"{ROBOTS_UNREACHABLE} for {origin} ({robots.rules}); its URLs are not "
                                        f"fetched")
        elif not robots.rules.can_fetch(self.p.robots_agent(), req.full_url):
            raise PolitenessRefused(f"{ROBOTS_DISALLOWED} {req.full_url} for {self.p.robots_agent()}")

    def _fetch_robots(self, origin: str, timeout, parent: urllib.request.OpenerDirector):
        try:
            with parent.open(urllib.request.Request(f"{origin}/robots.txt"), timeout=timeout) as r:
                text = r.read(ROBOTS_MAX_BYTES).decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            exc.close()
            # 3xx: a redirect loop, "unavailable" like a 4xx (RFC 9309 2.3.1.2)
            return "allow" if 300 <= exc.code < 500 and exc.code != 429 else f"HTTP {exc.code}"
        except Exception as exc:
            if isinstance(getattr(exc, "reason", exc), NotSent):
                raise  # the URL policy or the breaker refuses this origin: the URL's own reason; not cached
            return f"{type(exc).__name__}: {exc}"  # any other way of not answering: RFC 9309's "unreachable"
        rules = urllib.robotparser.RobotFileParser()
        rules.parse(text.splitlines())
        return rules


# run id -> Courtesy; a Ray worker process may serve several runs one after the other.
_RUNS: OrderedDict[str, Courtesy] = OrderedDict()
_RUNS_LOCK = threading.Lock()
_RUNS_KEPT = 4


def courtesy_for(run: str, politeness: Politeness, opted_out) -> Courtesy:
    """This process's state for download run `run`, made on first use."""
    with _RUNS_LOCK:
        if run not in _RUNS:
            _RUNS[run] = Courtesy(politeness, opted_out)
            while len(_RUNS) > _RUNS_KEPT:
                _RUNS.popitem(last=False)
        _RUNS.move_to_end(run)
        return _RUNS[run]
