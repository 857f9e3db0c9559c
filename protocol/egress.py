"""Where a client-supplied URL may lead: the egress address policy, without any I/O.

The gateway (webhooks, uploads) and the local provider (reference images) each connect through
their own guarded resolver; both ask this policy, so they refuse the same destinations.

Refused: loopback, RFC 1918, link-local (169.254/16, fe80::/10), CGNAT 100.64/10, ULA fc00::/7,
multicast, unspecified, documentation and reserved ranges (``ipaddress``'s ``is_global``), plus
what ``is_global`` misses: IPv4 embedded in IPv4-mapped (::ffff:0:0/96), 6to4 (2002::/16),
NAT64 (64:ff9b::/96) and Teredo addresses, and multicast. A host written as a legacy IPv4
number (``0x7f000001``, ``2130706433``, ``0177.0.0.1``, ``127.1``) is read the way
``inet_aton`` reads it, so it is judged as the address it connects to, not as a name. An
allow-list (CIDRs or host names) opens chosen destinations on purpose: tests, private
deployments, the embedded provider.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["EgressPolicy", "IPAddress", "host_address", "why_not_global"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_DIGITS = {8: set("01234567"), 10: set("0123456789"), 16: set("0123456789abcdefABCDEF")}


def _embedded(address: IPAddress) -> list[IPAddress]:
    """The IPv4 addresses an IPv6 address carries inside it."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    inner: list[IPAddress] = []
    if address.ipv4_mapped is not None:
        inner.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        inner.append(address.sixtofour)
    if address.teredo is not None:
        inner.extend(address.teredo)
    if address in _NAT64:
        inner.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return inner


def why_not_global(address: IPAddress) -> str | None:
    """Why ``address`` is not a public destination, or None if it is."""
    if address.is_multicast:
        return f"{address} is a multicast address"
    if address.is_unspecified:
        return f"{address} is unspecified"
    if not address.is_global:
        return f"{address} is not a global address"
    for inner in _embedded(address):
        if reason := why_not_global(inner):
            return f"{address} embeds {inner}: {reason}"
    return None


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """``host`` as ``inet_aton`` (and so ``getaddrinfo``) reads it: one to four parts, each
    decimal, octal (leading 0) or hex (0x); the last part fills the remaining bytes."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers: list[int] = []
    for part in parts:
        if part[:2].lower() == "0x":
            base, digits = 16, part[2:]
        elif len(part) > 1 and part.startswith("0"):
            base, digits = 8, part[1:]
        else:
            base, digits = 10, part
        if not digits or not set(digits) <= _DIGITS[base]:
            return None
        numbers.append(int(digits, base))
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (4 - len(leading)):
        return None
    value = last
    for index, number in enumerate(leading):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def host_address(host: str) -> IPAddress | None:
    """The address a URL's host names literally, or None for a name to resolve."""
    host = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return _legacy_ipv4(host)


class EgressPolicy:
    def __init__(self, allow: Iterable[str] = ()) -> None:
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._hosts: set[str] = set()
        for entry in allow:
            self.allow(entry)

    def allow(self, entry: str) -> None:
        try:
            self._networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            self._hosts.add(entry.lower().rstrip("."))

    def allows_name(self, host: str) -> bool:
        """Whether ``host`` is on the allow-list by name: whatever it resolves to is fine."""
        return host.lower().rstrip(".") in self._hosts

    def refusal(self, address: IPAddress) -> str | None:
        if any(address in network for network in self._networks):
            return None
        return why_not_global(address)

    def refusal_for_host(self, host: str) -> str | None:
        """Why a host is refused without resolving it (a literal address), or None."""
        if self.allows_name(host):
            return None
        address = host_address(host)
        return None if address is None else self.refusal(address)  # a name: checked on resolve

    def refusal_for_url(self, url: str) -> str | None:
        """Why a URL's host is refused without resolving it (a literal address), or None."""
        try:
            host = urlsplit(url).hostname or ""
        except ValueError:
            return "the URL does not parse"
        return self.refusal_for_host(host)

    def refusal_for_answer(self, host: str, address: str) -> str | None:
        """Why ``host`` may not be reached at ``address``, one of its resolved addresses."""
        if self.allows_name(host):
            return None
        return self.refusal(ipaddress.ip_address(address))
