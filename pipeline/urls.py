"""URL normalisation, the URL safety policy and stable sample keys, vectorised over Arrow.

Normalisation (for de-duplication and keys, never for fetching): trim whitespace,
lower-case the scheme and the authority, drop the fragment. Most LAION URLs are already
in that form, so the regular-expression work runs only on the rows that need it.

Policy: http/https only. A host is judged the way an HTTP client will resolve it:
percent-decoded (urllib decodes the host once), then IDNA-mapped (Python's socket layer
applies IDNA 2003, which maps full-width digits, circled letters and the dots `。．｡`;
UTS-46 too when the `idna` package is installed); every form must pass, and a host
that does not decode cleanly (bad UTF-8, a leftover `%`, `@` or `:`, spaces) is refused.
A host written as an IP address must be globally reachable, in any spelling the socket
layer accepts (`127.1`, `2130706433`, `0x7f.0.0.1`). What is globally reachable is this
module's own table (`_SPECIAL`, from the IANA IPv4 and IPv6 special-purpose registries:
loopback, private, link-local and cloud metadata, CGNAT, benchmarking, documentation,
reserved, multicast, ...), never `ipaddress`'s `is_global`, whose answer changed between
CPython patch releases. IPv6 forms that carry an IPv4 address (`::ffff:a.b.c.d`,
`::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4, Teredo) are judged by that address, through the
same table. `localhost` and metadata host names are refused. Hosts in `allow`
(addresses or networks, e.g. 127.0.0.1 in tests, or names) pass. What a name resolves
to (or is pinned to, see `parse_pins`) is judged at connect time by
`pipeline.fetch_guard`, with `address_allowed` (names in `allow` are trusted there too).

Keys: 128 bits of SipHash-2-4 (two fixed keys, pandas' C implementation) of the
normalised URL, as 32 hex characters. Stable across runs, machines and file splits.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import unquote, urlsplit

import idna
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
_KEY_SALTS = ("amused-url-key-a", "amused-url-key-b")
_HEX_PAIRS = np.array([f"{b:02x}".encode() for b in range(256)]).view(np.uint16)  # byte -> its 2 hex digits


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


def _low32(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    return (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF),)


def _sixtofour(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    return (ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF),)


def _teredo(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The Teredo server and the (obfuscated) client address the traffic is relayed to."""
    return ipaddress.IPv4Address((int(ip) >> 64) & 0xFFFFFFFF), ipaddress.IPv4Address(~int(ip) & 0xFFFFFFFF)


# Network -> verdict; the longest prefix that contains an address decides. True: globally
# reachable; False: refused; a function: the network delivers to the IPv4 address(es) it
# returns, and their verdicts decide. From the IANA IPv4 and IPv6 Special-Purpose Address
# Registries (rows whose "globally reachable" is False, and the True rows inside them),
# plus multicast; for IPv6, everything outside the global unicast space 2000::/3 is refused
# unless listed.
_SPECIAL = {
    "0.0.0.0/0": True,
    "0.0.0.0/8": False,  # "this network"
    "10.0.0.0/8": False,  # private
    "100.64.0.0/10": False,  # shared address space (CGNAT)
    "127.0.0.0/8": False,  # loopback
    "169.254.0.0/16": False,  # link-local, cloud metadata 169.254.169.254
    "172.16.0.0/12": False,  # private
    "192.0.0.0/24": False,  # IETF protocol assignments (DS-Lite, dummy address, NAT64 discovery)
    "192.0.0.9/32": True,  # PCP anycast
    "192.0.0.10/32": True,  # TURN anycast
    "192.0.2.0/24": False,  # documentation TEST-NET-1
    "192.88.99.0/24": False,  # deprecated 6to4 relay anycast (RFC 7526)
    "192.168.0.0/16": False,  # private
    "198.18.0.0/15": False,  # benchmarking
    "198.51.100.0/24": False,  # documentation TEST-NET-2
    "203.0.113.0/24": False,  # documentation TEST-NET-3
    "224.0.0.0/4": False,  # multicast
    "240.0.0.0/4": False,  # reserved, broadcast 255.255.255.255 included
    "::/0": False,  # outside 2000::/3: reserved by the IETF or special (below)
    "2000::/3": True,  # global unicast
    "::/128": False,  # unspecified
    "::1/128": False,  # loopback
    "::/96": _low32,  # IPv4-compatible (deprecated; a tunnel interface sends it over IPv4)
    "::ffff:0:0/96": _low32,  # IPv4-mapped: the socket layer connects to the IPv4 address
    "64:ff9b::/96": _low32,  # NAT64, well-known prefix
    "64:ff9b:1::/48": False,  # local-use NAT64 (RFC 8215)
    "100::/64": False,  # discard-only
    "100:0:0:1::/64": False,  # dummy prefix
    "2001::/23": False,  # IETF protocol assignments
    "2001::/32": _teredo,
    "2001:1::1/128": True,  # PCP anycast
    "2001:1::2/128": True,  # TURN anycast
    "2001:1::3/128": True,  # DNS-SD service registration anycast
    "2001:2::/48": False,  # benchmarking
    "2001:3::/32": True,  # AMT
    "2001:4:112::/48": True,  # AS112-v6
    "2001:10::/28": False,  # ORCHID (deprecated)
    "2001:20::/28": True,  # ORCHIDv2
    "2001:30::/28": True,  # drone remote ID
    "2001:db8::/32": False,  # documentation
    "2002::/16": _sixtofour,
    "3fff::/20": False,  # documentation
    "5f00::/16": False,  # SRv6 SIDs
    "fc00::/7": False,  # unique local
    "fe80::/10": False,  # link-local
    "fec0::/10": False,  # site-local (deprecated)
    "ff00::/8": False,  # multicast
}
_ROWS = sorted(((ipaddress.ip_network(net), verdict) for net, verdict in _SPECIAL.items()),
               key=lambda row: -row[0].prefixlen)


def _verdict(ip: ipaddress.IPv4Address | ipaddress.IPv6Address):
    return next(verdict for net, verdict in _ROWS if ip in net)  # `in` is False across versions


class AddressPolicy:
    """Refuses URLs whose host is a non-global address or a metadata host name, or that
    a client would decode to one, except hosts in `allow`."""

    def __init__(self, allow: tuple[str, ...] = ()):
        entries = [_allow_entry(entry) for entry in allow]
        self.allow = [e for e in entries if not isinstance(e, str)]
        self.allow_names = {e for e in entries if isinstance(e, str)}

    def address_allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether a connection to `ip` is allowed: in `allow`, or globally reachable by
        `_SPECIAL` the way it is routed (an embedded IPv4 address may be in `allow`)."""
        if any(ip in net for net in self.allow):
            return True
        verdict = _verdict(ip)
        if callable(verdict):
            return all(self.address_allowed(carried) for carried in verdict(ip))
        return verdict

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


def _allow_entry(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """One allow-list entry as a network, or as a host name in the form clients resolve."""
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        pass
    name = entry.lower().removesuffix(".")
    if not _HOST_NAME.fullmatch(name):
        raise ValueError(f"allow_hosts: {entry!r} is neither an address, a network nor a host name "
                         f"(no scheme or port)")
    return name


def _entries(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_allow(text: str) -> tuple[str, ...]:
    """`--allow-hosts` "ENTRY,...": addresses, networks or host names, each checked."""
    entries = tuple(_entries(text))
    for entry in entries:
        _allow_entry(entry)
    return entries


def parse_pins(text: str) -> dict[str, tuple[str, ...]]:
    """`--resolve` "HOST=ADDRESS,...", like curl's --resolve: each host name (ASCII, as a
    client resolves it; a name given twice gets both addresses) is answered with its
    addresses instead of asking DNS. A pin is no exemption: the policy judges the
    pinned address like any DNS answer."""
    pins: dict[str, tuple[str, ...]] = {}
    for item in _entries(text):
        host, sep, address = item.partition("=")
        name = host.strip().lower().removesuffix(".")
        if not sep or not _HOST_NAME.fullmatch(name) or _parse_address(name) is not None:
            raise ValueError(f"resolve: {item!r} is not HOST=ADDRESS with HOST a host name")
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            raise ValueError(f"resolve: {item!r}: {address.strip()!r} is not an IP address") from None
        pins[name] = (*pins.get(name, ()), str(ip))
    return pins


def key_words(normalized: pa.Array) -> np.ndarray:
    """(n, 2) uint64: the 128 key bits of normalised URLs (no nulls); their order is the
    order of the hex keys."""
    values = normalized.to_numpy(zero_copy_only=False)
    return np.stack([pd.util.hash_array(values, hash_key=salt, categorize=False) for salt in _KEY_SALTS], axis=1)


def key_text(words: np.ndarray) -> pa.Array:
    """(n, k) uint64 -> n strings of 16k hex digits, without a Python loop."""
    raw = np.ascontiguousarray(words.astype(">u8")).view(np.uint8)  # n may be 0
    digits = _HEX_PAIRS[raw]  # two digits per byte
    width = 16 * words.shape[1]
    if width * len(words) >= 2**31:  # a string array's offsets are int32
        raise ValueError(f"{len(words):,} keys in one array: over 2 GiB of text; use smaller partitions")
    offsets = np.arange(0, width * (len(words) + 1), width, dtype=np.int32)
    return pa.StringArray.from_buffers(len(words), pa.py_buffer(offsets), pa.py_buffer(digits))


def sample_keys(normalized: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Hex keys and their first 64 bits (for seeded ranks) of normalised URLs (no nulls)."""
    words = key_words(normalized)
    return key_text(words), words[:, 0]


def seeded_rank(key_bits: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation order over keys: splitmix64 of the key bits and the seed."""
    with np.errstate(over="ignore"):
        z = key_bits + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
