"""URL normalisation, the URL safety policy and stable sample keys, vectorised over Arrow.

Normalisation (for de-duplication and keys, never for fetching): trim whitespace,
lower-case the scheme and the authority, drop the fragment. Most LAION URLs are already
in that form, so the regular-expression work runs only on the rows that need it.

Policy: http/https only. A host is judged the way an HTTP client will resolve it:
percent-decoded (urllib decodes the host once), then IDNA-mapped (Python's socket layer
applies IDNA 2003, which maps full-width digits, circled letters and the dots `。．｡`;
UTS-46 too when the `idna` package is installed); every form must pass, and a host
that does not decode cleanly (bad UTF-8, a leftover `%`, `@` or `:`, spaces) is refused.
A host written as an IP address must be globally routable (no loopback, private,
link-local, cloud-metadata, CGNAT or reserved ranges) in any spelling the socket layer
accepts (`127.1`, `2130706433`, `0x7f.0.0.1`); IPv6 forms that carry an IPv4 address
(`::ffff:a.b.c.d`, `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4, Teredo) are judged by that
address too, and local-use NAT64 `64:ff9b:1::/48` is refused. `localhost` and metadata
host names are refused. Hosts in `allow` (addresses or networks, e.g. 127.0.0.1 in
tests, or names) pass. What a name resolves to is judged at connect time by
`pipeline.fetch_guard`, with `address_allowed` (names in `allow` are trusted there too).

Keys: 128 bits of SipHash-2-4 (two fixed keys, pandas' C implementation) of the
normalised URL, as 32 hex characters. Stable across runs, machines and file splits.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_NEEDS_WORK = r"^([^:/?#]*[A-Z]|[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*[A-Z])|#"
_PARTS = r"^(?P<scheme>[^:/?#]*:)(?P<authority>//[^/?#]*)?(?P<rest>[^#]*)"
# Hosts that may be an IP literal or a forbidden name, or that a client would decode or
# map first (percent signs, backslashes, anything but printable ASCII in the authority);
# every other row passes untouched.
_SUSPECT_HOST = (r"^https?://([^/?#]*@)?(\[|[0-9]|localhost|metadata|instance-data|[^/?#]*\.localhost\.?([:/?]|$)"
                 r"|[^/?#]*([%\\]|[^!-~]))")
_BLOCKED_NAMES = ("localhost", "metadata", "metadata.google.internal", "instance-data", "instance-data.ec2.internal")
# What a decoded, mapped host name may contain; anything else is not a name a resolver should see.
_HOST_NAME = re.compile(r"[a-z0-9_.-]+")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: never globally routed
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


def _idna_forms(host: str) -> set[str]:
    """The ASCII names clients resolve for a non-ASCII host; UnicodeError when one cannot."""
    forms = {host.encode("idna").decode("ascii")}  # what socket.getaddrinfo does with a str host
    try:
        import idna
    except ImportError:
        return forms
    try:
        forms.add(idna.encode(host, uts46=True).decode("ascii"))
    except idna.IDNAError as exc:
        raise UnicodeError(str(exc)) from None
    return forms


def client_hosts(host: str | None) -> set[str] | None:
    """The host names or addresses an HTTP client may resolve for a URL's host (as
    `urlsplit().hostname` gives it): percent-decoded once, IDNA-mapped, lower-case,
    without a trailing dot. None when it cannot be decoded cleanly."""
    if not host:
        return None
    try:
        host = unquote(host, errors="strict")
    except UnicodeDecodeError:
        return None
    if ":" in host:  # an IPv6 literal (urlsplit removed the brackets), zone included
        try:
            return {str(ipaddress.IPv6Address(host))}
        except ValueError:
            return None
    try:
        forms = {host} if host.isascii() else _idna_forms(host)
    except UnicodeError:
        return None
    forms = {f.lower().removesuffix(".") for f in forms}
    return forms if all(_HOST_NAME.fullmatch(f) for f in forms) else None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries when the network delivers it over IPv4:
    IPv4-compatible `::a.b.c.d`, NAT64, 6to4, Teredo (its client)."""
    if int(ip) >> 32 == 0 or ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour:
        return ip.sixtofour
    return ip.teredo[1] if ip.teredo else None


class AddressPolicy:
    """Refuses URLs whose host is a non-global address or a metadata host name, or that
    a client would decode to one, except hosts in `allow`."""

    def __init__(self, allow: tuple[str, ...] = ()):
        networks, names = [], set()
        for entry in allow:
            if _is_network(entry):
                networks.append(ipaddress.ip_network(entry, strict=False))
            elif _HOST_NAME.fullmatch(entry.lower().removesuffix(".")):
                names.add(entry.lower().removesuffix("."))
            else:
                raise ValueError(f"allow_hosts: {entry!r} is neither an address, a network nor a host name "
                                 f"(no scheme or port)")
        self.allow = networks
        self.allow_names = names

    def address_allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether a connection to `ip` is allowed: in `allow`, or global the way it is routed."""
        if any(ip in net for net in self.allow):
            return True
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped:  # the socket layer connects to the IPv4 address itself
                return self.address_allowed(ip.ipv4_mapped)
            if ip in _LOCAL_NAT64:
                return False
            embedded = _embedded_ipv4(ip)
            if embedded is not None and not self.address_allowed(embedded):
                return False
        return ip.is_global and not ip.is_multicast

    def host_allowed(self, host: str | None) -> bool:
        """`host` as `urlsplit().hostname` gives it; every form a client may resolve must pass."""
        forms = client_hosts(host)
        return forms is not None and all(self._name_allowed(f) for f in forms)

    def name_trusted(self, host: str) -> bool:
        """Whether `host` is a name in `allow`: its DNS answers are the user's to vouch for."""
        forms = client_hosts(host)
        return bool(forms) and forms <= self.allow_names

    def _name_allowed(self, host: str) -> bool:
        if host in self.allow_names:
            return True
        if host in _BLOCKED_NAMES or host.endswith(".localhost"):
            return False
        ip = _parse_address(host)
        return ip is None or self.address_allowed(ip)

    def url_allowed(self, url: str) -> bool:
        """Scheme and host of one URL, as given (not necessarily normalised)."""
        try:
            parts = urlsplit(url.strip())
            return (parts.scheme.lower() in ("http", "https") and "\\" not in parts.netloc
                    and self.host_allowed(parts.hostname))
        except ValueError:  # malformed brackets or port
            return False

    def __call__(self, normalized: pa.Array) -> pa.Array:
        """True where the URL's host is allowed; only suspect hosts reach Python."""
        suspect = pc.fill_null(pc.match_substring_regex(normalized, _SUSPECT_HOST), False)
        ok = pa.array(np.ones(len(normalized), dtype=bool))
        if not pc.any(suspect).as_py():
            return ok
        verdicts = [self.url_allowed(u) for u in normalized.filter(suspect).to_pylist()]
        return pc.replace_with_mask(ok, suspect, pa.array(verdicts, pa.bool_()))


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
