"""URL normalisation, the URL safety policy and stable sample keys, vectorised over Arrow.

Normalisation (for de-duplication and keys, never for fetching): trim whitespace,
lower-case the scheme and the authority, drop the fragment. Most LAION URLs are already
in that form, so the regular-expression work runs only on the rows that need it.

Policy: http/https only; a host written as a literal IP address must be globally
routable (no loopback, private, link-local, cloud-metadata, CGNAT or reserved ranges),
in any spelling the socket layer accepts (`127.1`, `2130706433`, `0x7f.0.0.1`,
`[::ffff:127.0.0.1]`); `localhost` and metadata host names are refused too. Hosts in
`allow` (addresses or networks, e.g. 127.0.0.1 in tests) pass. Names that resolve to
private addresses cannot be judged without DNS; that is the fetcher's job.

Keys: 128 bits of SipHash-2-4 (two fixed keys, pandas' C implementation) of the
normalised URL, as 32 hex characters. Stable across runs, machines and file splits.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_NEEDS_WORK = r"^([^:/?#]*[A-Z]|[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*[A-Z])|#"
_PARTS = r"^(?P<scheme>[^:/?#]*:)(?P<authority>//[^/?#]*)?(?P<rest>[^#]*)"
# Hosts that may be an IP literal or a forbidden name; everything else passes untouched.
_SUSPECT_HOST = r"^https?://([^/?#]*@)?(\[|[0-9]|localhost|metadata|instance-data|[^/?#]*\.localhost\.?([:/?]|$))"
_BLOCKED_NAMES = ("localhost", "metadata", "metadata.google.internal", "instance-data", "instance-data.ec2.internal")
_KEY_SALTS = ("amused-url-key-a", "amused-url-key-b")
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def normalize(urls: pa.Array) -> pa.Array:
    urls = pc.utf8_trim_whitespace(urls)
    work = pc.fill_null(pc.match_substring_regex(urls, _NEEDS_WORK), False)
    if not pc.any(work).as_py():
        return urls
    subset = urls.filter(work)
    parts = pc.extract_regex(subset, _PARTS)
    authority = pc.fill_null(parts.field("authority"), "")
    fixed = pc.binary_join_element_wise(pc.utf8_lower(parts.field("scheme")), pc.utf8_lower(authority),
                                        parts.field("rest"), "")
    # Rows the pattern cannot split (no scheme) keep their text without the fragment.
    fallback = pc.replace_substring_regex(subset, "#.*$", "")
    fixed = pc.coalesce(fixed, fallback)
    return pc.replace_with_mask(urls, work, fixed.cast(urls.type))


def scheme_allowed(normalized: pa.Array) -> pa.Array:
    ok = pc.or_(pc.starts_with(normalized, "http://"), pc.starts_with(normalized, "https://"))
    return pc.fill_null(ok, False)


def _parse_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:  # the legacy spellings that inet_aton, and so every HTTP client, accepts
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


class AddressPolicy:
    """Refuses literal non-global addresses and metadata host names, except `allow`."""

    def __init__(self, allow: tuple[str, ...] = ()):
        self.allow = [ipaddress.ip_network(a, strict=False) for a in allow]
        self.allow_names = {a.lower() for a in allow if not _is_network(a)}

    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        host = host.rstrip(".").lower()
        if host in self.allow_names:
            return True
        if host in _BLOCKED_NAMES or host.endswith(".localhost"):
            return False
        ip = _parse_address(host)
        if ip is None:
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allow):
            return True
        return ip.is_global and not ip.is_multicast

    def __call__(self, normalized: pa.Array) -> pa.Array:
        """True where the URL's host is allowed; only suspect hosts reach Python."""
        suspect = pc.fill_null(pc.match_substring_regex(normalized, _SUSPECT_HOST), False)
        ok = pa.array(np.ones(len(normalized), dtype=bool))
        if not pc.any(suspect).as_py():
            return ok
        verdicts = [self._url_allowed(u) for u in normalized.filter(suspect).to_pylist()]
        return pc.replace_with_mask(ok, suspect, pa.array(verdicts, pa.bool_()))

    def _url_allowed(self, url: str) -> bool:
        try:
            return self.host_allowed(urlsplit(url).hostname)
        except ValueError:  # malformed brackets or port
            return False


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
        return True
    except ValueError:
        return False


def _hashes(normalized: pa.Array) -> np.ndarray:
    values = normalized.to_numpy(zero_copy_only=False)
    return np.stack([pd.util.hash_array(values, hash_key=salt, categorize=False) for salt in _KEY_SALTS], axis=1)


def _hex(words: np.ndarray) -> pa.Array:
    """(n, k) uint64 -> n strings of 16k hex digits, without a Python loop."""
    raw = words.astype(">u8").view(np.uint8).reshape(len(words), -1)
    digits = np.empty((len(words), raw.shape[1] * 2), dtype=np.uint8)
    digits[:, 0::2] = _HEX[raw >> 4]
    digits[:, 1::2] = _HEX[raw & 15]
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(digits.shape[1]), len(words),
                                                 [None, pa.py_buffer(digits)])
    return fixed.cast(pa.binary()).cast(pa.string())


def sample_keys(normalized: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Hex keys and their first 64 bits (for seeded ranks) of normalised URLs (no nulls)."""
    words = _hashes(normalized)
    return _hex(words), words[:, 0]


def seeded_rank(key_bits: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation order over keys: splitmix64 of the key bits and the seed."""
    with np.errstate(over="ignore"):
        z = key_bits + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
