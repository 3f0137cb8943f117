"""How the download treats each web site: one identifiable client that a site owner can
reach, throttle and opt out of.

The settings travel pickled with img2dataset's Downloader into every download process
(see `pipeline.fetch_guard`); the state (per-domain slots, rate, circuit breaker,
robots.txt answers) lives in each process, one `Courtesy` per download run, so every cap
holds per download process, and only as long as that process lives: img2dataset's
multiprocessing pool renews each process every 5 shards (`Pool(maxtasksperchild=5)`),
and with Ray the state lives per worker process. So robots.txt is asked once per origin
per download process, not once per run, and a breaker that opened is forgotten with
its process. A domain is a host name (no public-suffix list: cdn1.x.com and cdn2.x.com
are two domains); robots.txt belongs to an origin (scheme, host, port). Both maps keep
the `KEPT_ORIGINS` most recently used entries (a domain with requests open or waiting is
never dropped), an origin's robots.txt as the rules of our group only.

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
  remaining URLs fail at once without a request: `domain_opted_out`, permanent, when
  most of those consecutive answers were opt-outs (the site said no; `--retry-failed`
  does not ask again), `domain_breaker`, transient, otherwise (a site that was down may
  be back).
- robots.txt is fetched once per origin, through the same guard, caps and breaker but
  not checked against itself (nor are its redirects, which may stay in the origin);
  the first `ROBOTS_MAX_BYTES` are parsed (RFC 9309 asks for at least 500 KiB) by our
  own RFC 9309 matcher: the groups of `token`, else of `amused-pipeline`, else of `*`
  (groups of one agent merged); the longest matching rule wins, Allow on a tie; `*` and
  a final `$` are wildcards; paths compared percent-encoding normalised. A 4xx other
  than 429, or a redirect loop, means no rules (RFC 9309 2.3.1.2-3); a 429, 5xx or no
  answer means "disallow everything" for that origin, as Google does:
  `robots_unreachable`, transient, as is a robots.txt still being fetched by another
  thread after `ROBOTS_WAIT_REQUESTS` request timeouts. A refusal by the URL policy or
  the breaker is the URL's own reason. A disallowed URL fails with `robots_disallowed`,
  permanent, and is not a breaker failure: it costs the site no request and the site
  has said its other paths are welcome. Crawl-delay is not read: `rate` is the one
  per-domain pace.
"""

from __future__ import annotations

import functools
import http.client
import importlib.metadata
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
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
DOMAIN_OPTED_OUT = "domain opted out"
# Most recently used domains and origins kept per process: a LAION-scale shard list
# names millions of hosts; an entry costs ~1 KB, an origin's rules their own size.
KEPT_ORIGINS = 100_000
# A robots.txt fetch by another thread is waited for at most this many request timeouts
# (urllib follows up to 10 redirects, each with its own timeout).
ROBOTS_WAIT_REQUESTS = 12
DEFAULT_TIMEOUT = 60.0  # seconds, for a request opened without one
# The outcomes of a request for its domain's breaker; None: neither (refused before
# anything was sent, a local error).
GOOD, FAILURE, OPT_OUT = "good", "failure", "opt_out"


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
        self.waiting = 0  # threads waiting in `enter`
        self.failures = 0  # consecutive failures or opt-outs, done ones
        self.opt_outs = 0  # of which opt-outs
        self.tripped: str | None = None  # the refusal, once the breaker opened
        self.next_start = 0.0

    def busy(self) -> bool:
        return bool(self.open or self.waiting)

    def refuse_if_tripped(self) -> None:
        if self.tripped:
            raise PolitenessRefused(self.tripped)

    def enter(self) -> None:
        """Waits for a slot, the breaker's room and the rate; then the request may start.
        Every wait ends: an open request ends by its own timeout or its close."""
        with self.cond:
            self.waiting += 1
            try:
                while True:
                    self.refuse_if_tripped()
                    if self.open < self.p.concurrency and (not self.p.breaker
                                                           or self.failures + self.open < self.p.breaker):
                        break
                    self.cond.wait()
            finally:
                self.waiting -= 1
            self.open += 1
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + (1 / self.p.rate if self.p.rate else 0.0)
        time.sleep(start - now)

    def leave(self, outcome: str | None) -> None:
        """outcome: GOOD, FAILURE, OPT_OUT or None (see their definition)."""
        with self.cond:
            self.open -= 1
            if outcome in (FAILURE, OPT_OUT):
                self.failures += 1
                self.opt_outs += outcome == OPT_OUT
                if self.p.breaker and self.failures >= self.p.breaker and not self.tripped:
                    self.tripped = (
                        f"{DOMAIN_OPTED_OUT} for {self.host}: {self.opt_outs} of its last {self.failures} answers "
                        f"opted out by X-Robots-Tag" if 2 * self.opt_outs > self.failures else
                        f"{BREAKER_OPEN} for {self.host} after {self.failures} consecutive failures or opt-outs")
            elif outcome == GOOD:
                self.failures = self.opt_outs = 0
            self.cond.notify_all()

    def held(self, failed: bool) -> None:
        self.leave(FAILURE if failed else GOOD)


# RFC 3986 unreserved characters: the only ones whose percent-encoding is undone.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _normalise(path: str) -> str:
    """One spelling per path: escapes of unreserved characters undone, the others in
    upper case, anything outside printable ASCII escaped as UTF-8 (RFC 9309 2.2.2)."""
    path = _ESCAPE.sub(lambda m: chr(int(m[1], 16)) if chr(int(m[1], 16)) in _UNRESERVED else f"%{m[1].upper()}",
                       path)
    return urllib.parse.quote(path, safe="/?#[]@!$&'()*+,;=:%")


@functools.lru_cache(maxsize=4096)
def _pattern(rule: str) -> re.Pattern:
    end = rule.endswith("$")
    return re.compile(".*".join(map(re.escape, rule.removesuffix("$").split("*"))) + (r"\Z" if end else ""))


@dataclass(frozen=True)
class RobotsRules:
    """Our group's rules of one robots.txt: (path pattern, allowed), longest first, Allow
    before Disallow at one length, so the first match is RFC 9309's answer."""

    rules: tuple[tuple[str, bool], ...] = ()

    def allows(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        path = _normalise((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        if path == "/robots.txt":  # always allowed (RFC 9309 2.2.2)
            return True
        for rule, allowed in self.rules:
            if _pattern(rule).match(path):
                return allowed
        return True


def parse_robots(text: str, agent: str) -> RobotsRules:
    """The rules of the groups naming `agent`, else `amused-pipeline`, else `*`."""
    groups: dict[str, list[tuple[str, bool]]] = {}
    agents: list[str] = []  # the user-agent lines of the group being read
    in_rules = False
    for line in text.splitlines():
        key, sep, value = line.split("#", 1)[0].partition(":")
        key, value = key.strip().lower(), value.strip()
        if not sep:
            continue
        if key == "user-agent":
            if in_rules:  # a user-agent line after rules starts a new group
                agents, in_rules = [], False
            agents.append(value.lower())
            groups.setdefault(value.lower(), [])
        elif key in ("allow", "disallow") and agents:
            in_rules = True
            if value:  # an empty path matches nothing
                rule = _normalise(value if value.startswith(("/", "*")) else f"/{value}")
                for name in agents:
                    groups[name].append((rule, key == "allow"))
    chosen = next((groups[a] for a in (agent.lower(), PRODUCT, "*") if a in groups), [])
    # dict.fromkeys, not set: equal-length rules keep file order whatever the hash seed
    return RobotsRules(tuple(sorted(dict.fromkeys(chosen), key=lambda r: (-len(r[0].removesuffix("$")), not r[1]))))


class _Fetching:
    """One origin's robots.txt being fetched: the first thread fetches, others wait."""

    def __init__(self):
        self.done = threading.Event()


# What a thread is fetching now: robots.txt and its redirects skip the robots check.
_LOCAL = threading.local()


class Courtesy:
    """The politeness state of one download run in one process."""

    def __init__(self, politeness: Politeness, opted_out: Callable[[http.client.HTTPMessage], bool] | None,
                 kept: int = KEPT_ORIGINS):
        self.p = politeness
        self.opted_out = opted_out
        self.user_agent = politeness.user_agent()
        self.kept = kept
        self._lock = threading.Lock()
        self._domains: OrderedDict[str, _Domain] = OrderedDict()
        # origin -> our rules or the reason it is unreachable; in the making: _Fetching
        self._robots: OrderedDict[str, RobotsRules | str | _Fetching] = OrderedDict()

    def _domain(self, host: str) -> _Domain:
        with self._lock:
            domain = self._domains.get(host)
            if domain is None:
                domain = self._domains[host] = _Domain(host, self.p)
                self._trim(self._domains, lambda d: d.busy())
            self._domains.move_to_end(host)
            return domain

    def _trim(self, entries: OrderedDict, busy: Callable) -> None:
        """Drops the least recently used entries that are not busy, down to `kept`."""
        over = len(entries) - self.kept
        if over <= 0:
            return
        drop = []
        for key, value in entries.items():  # oldest first; busy ones are few (one per thread at most)
            if not busy(value):
                drop.append(key)
                if len(drop) == over:
                    break
        for key in drop:
            del entries[key]

    def open(self, req: urllib.request.Request, do_open: Callable, parent: urllib.request.OpenerDirector):
        """`do_open(req)` under the rules above; `parent` fetches robots.txt."""
        req.add_unredirected_header("User-Agent", self.user_agent)  # wins over img2dataset's and urllib's
        parts = urllib.parse.urlsplit(req.full_url)
        domain = self._domain((parts.hostname or "").lower())
        domain.refuse_if_tripped()
        if self.p.robots and not getattr(_LOCAL, "robots", False):
            self._check_robots(f"{parts.scheme}://{parts.netloc}", req, parent)
        domain.enter()
        try:
            response = do_open(req)
        except Exception as exc:
            # urllib wraps what the connection raised in URLError.reason
            not_sent = isinstance(getattr(exc, "reason", exc), NotSent)
            domain.leave(None if not_sent or not isinstance(exc, (OSError, http.client.HTTPException)) else FAILURE)
            raise
        status = response.status
        if status == 429 or status >= 500:
            domain.leave(FAILURE)
        elif not 200 <= status < 300:
            domain.leave(GOOD)  # redirects and errors are answered; their bodies are not read
        elif self.opted_out is not None and not getattr(_LOCAL, "robots", False) and self.opted_out(response.headers):
            domain.leave(OPT_OUT)  # img2dataset reads the same headers and records the opt-out
        elif isinstance(response, HeldResponse):
            response.hold(domain.held)
        else:
            domain.leave(GOOD)
        return response

    def _check_robots(self, origin: str, req: urllib.request.Request, parent: urllib.request.OpenerDirector):
        timeout = req.timeout if isinstance(req.timeout, (int, float)) else DEFAULT_TIMEOUT
        deadline = time.monotonic() + ROBOTS_WAIT_REQUESTS * timeout
        while True:
            with self._lock:
                verdict = self._robots.get(origin)
                if verdict is None:
                    verdict = self._robots[origin] = _Fetching()
                    mine = True
                else:
                    mine = False
                self._robots.move_to_end(origin)
            if mine:
                verdict = self._settle(origin, verdict, timeout, parent)
            elif isinstance(verdict, _Fetching):
                if not verdict.done.wait(max(deadline - time.monotonic(), 0)):
                    raise PolitenessRefused(f"{ROBOTS_UNREACHABLE} for {origin} (another thread is still fetching it "
                                            f"after {ROBOTS_WAIT_REQUESTS * timeout:g} s); its URLs are not fetched")
                continue  # settled, or given up by its fetcher: ask again
            break
        if isinstance(verdict, str):
            raise PolitenessRefused(f"{ROBOTS_UNREACHABLE} for {origin} ({verdict}); its URLs are not fetched")
        if not verdict.allows(req.full_url):
            raise PolitenessRefused(f"{ROBOTS_DISALLOWED} {req.full_url} for {self.p.robots_agent()}")

    def _settle(self, origin: str, fetching: _Fetching, timeout: float, parent) -> RobotsRules | str:
        """Fetches `origin`'s robots.txt and keeps the verdict; a refusal of the fetch
        itself (URL policy, breaker) is not kept, and is the URL's own reason."""
        verdict = None
        try:
            verdict = self._fetch_robots(origin, timeout, parent)
            return verdict
        finally:
            with self._lock:
                if verdict is None:
                    self._robots.pop(origin, None)
                else:
                    self._robots[origin] = verdict
                    self._trim(self._robots, lambda v: isinstance(v, _Fetching))
            fetching.done.set()

    def _fetch_robots(self, origin: str, timeout: float, parent: urllib.request.OpenerDirector) -> RobotsRules | str:
        _LOCAL.robots = True  # this fetch and its redirects are not checked against the robots.txt being fetched
        try:
            with parent.open(urllib.request.Request(f"{origin}/robots.txt"), timeout=timeout) as r:
                text = r.read(ROBOTS_MAX_BYTES).decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            exc.close()
            # 3xx: a redirect loop, "unavailable" like a 4xx (RFC 9309 2.3.1.2)
            return RobotsRules() if 300 <= exc.code < 500 and exc.code != 429 else f"HTTP {exc.code}"
        except Exception as exc:
            if isinstance(getattr(exc, "reason", exc), NotSent):
                raise  # the URL policy or the breaker refuses this origin: the URL's own reason; not kept
            return f"{type(exc).__name__}: {exc}"  # any other way of not answering: RFC 9309's "unreachable"
        finally:
            _LOCAL.robots = False
        return parse_robots(text, self.p.robots_agent())


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
