"""How the download treats each web site: one identifiable client that a site owner can
reach, throttle and opt out of.

The settings travel pickled with img2dataset's Downloader into every download process
(see `pipeline.fetch_guard`); the state (per-domain slots, rate, circuit breaker,
robots.txt answers) lives in each process, so every cap holds per download process.
"""

from __future__ import annotations

from dataclasses import dataclass

# X-Robots-Tag directives that opt an image out: img2dataset's own set plus `noml`.
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noml", "noindex", "noimageindex")


@dataclass(frozen=True)
class Politeness:
    contact_url: str  # where a site owner reaches whoever runs the download ("" if none given)
    token: str | None  # product token: in the User-Agent, matched in robots.txt and X-Robots-Tag
    concurrency: int  # requests in flight per domain
    rate: float  # requests started per second per domain; 0: no cap
    breaker: int  # consecutive failures or opt-outs from a domain before it is skipped; 0: never
    robots: bool  # fetch robots.txt once per domain and honour it
