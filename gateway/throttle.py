"""Hostile clients, per client address: failed authentications and sockets that never
authenticate. Pure: a clock is injected, the client door carries the decisions out.

- Each failed authentication from an address makes its answer wait longer (``base_delay``
  doubling up to ``max_delay``); only that socket waits, nobody else is slowed. After
  ``refuse_after`` failures with less than ``forget_after`` between them, the address is refused
  outright for ``refusal`` seconds (no key is even looked at). A success forgets the failures.
- At most ``max_unauthenticated`` sockets per address may be open and not yet authenticated.

The table is bounded (``max_addresses``): past it, the address whose last event is the oldest
and that holds no socket is forgotten first, so a flood of addresses costs memory up to the
bound and no more.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

__all__ = ["AuthThrottle", "ClientAddresses"]


class ClientAddresses:
    """Whom the per-address bounds count: a request's peer, or, when that peer is a proxy of
    ``server.trusted_proxies`` (a balancer in front of replicas), the address it names in
    ``X-Forwarded-For``: the rightmost hop that is not itself a trusted proxy. What a client
    writes into the header itself sits to the left of that and is never believed."""

    def __init__(self, trusted: Sequence[str]) -> None:
        self._networks = [ipaddress.ip_network(cidr, strict=False) for cidr in trusted]

    def of(self, remote: str | None, forwarded_for: str | None) -> str:
        if not self._networks or not remote or not forwarded_for or not self._trusted(remote):
            return remote or ""
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else remote

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._networks)


class _Address:
    __slots__ = ("failures", "last", "refused_until", "unauthenticated")

    def __init__(self) -> None:
        self.failures = 0
        self.last = 0.0
        self.refused_until = 0.0
        self.unauthenticated = 0


class AuthThrottle:
    def __init__(
        self,
        *,
        clock: Callable[[], float],
        base_delay: float = 0.1,
        max_delay: float = 5.0,
        refuse_after: int = 10,
        refusal: float = 60.0,
        forget_after: float = 60.0,
        max_unauthenticated: int = 16,
        max_addresses: int = 100_000,
    ) -> None:
        self._clock = clock
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.refuse_after = refuse_after
        self.refusal = refusal
        self.forget_after = forget_after
        self.max_unauthenticated = max_unauthenticated
        self.max_addresses = max_addresses
        self._addresses: dict[str, _Address] = {}  # least recently touched first

    def __len__(self) -> int:
        return len(self._addresses)

    def _touch(self, address: str) -> _Address:
        entry = self._addresses.pop(address, None)
        if entry is None:
            entry = _Address()
            if len(self._addresses) >= self.max_addresses:
                self._evict()
        self._addresses[address] = entry  # to the end: the most recent
        return entry

    def _evict(self) -> None:
        for address, entry in self._addresses.items():
            if entry.unauthenticated == 0:
                del self._addresses[address]
                return

    def refused(self, address: str) -> float:
        """Seconds ``address`` stays refused (0: it may try)."""
        entry = self._addresses.get(address)
        if entry is None:
            return 0.0
        return max(0.0, entry.refused_until - self._clock())

    def failed(self, address: str) -> float:
        """A failed authentication: the seconds its answer waits."""
        now = self._clock()
        entry = self._touch(address)
        if now - entry.last > self.forget_after:
            entry.failures = 0
        entry.failures += 1
        entry.last = now
        delay: float = min(self.max_delay, self.base_delay * 2.0 ** (entry.failures - 1))
        if entry.failures >= self.refuse_after:
            entry.refused_until = now + self.refusal
            entry.failures = 0
        return delay

    def succeeded(self, address: str) -> None:
        entry = self._addresses.get(address)
        if entry is not None:
            entry.failures = 0

    def open_unauthenticated(self, address: str) -> bool:
        """A socket from ``address`` opens; False (and not counted) past the bound."""
        entry = self._touch(address)
        if entry.unauthenticated >= self.max_unauthenticated:
            return False
        entry.unauthenticated += 1
        return True

    def close_unauthenticated(self, address: str) -> None:
        """That socket authenticated, or closed before it did."""
        entry = self._addresses.get(address)
        if entry is not None and entry.unauthenticated > 0:
            entry.unauthenticated -= 1
