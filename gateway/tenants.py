"""The tenant table: who a key belongs to, and each tenant's limits.

Keys are held as their SHA-256 only. A key from the configuration is hashed at load and its
plain text forgotten (:func:`forget_plain_keys`); a key given by a client is hashed and looked
up by its digest. That lookup is a dict's, not a constant-time scan, on purpose: its timing can
only tell a guesser how their own guess's digest compares with stored digests, which says
nothing about any key (SHA-256 is not invertible), and a scan would cost every authentication
time in the number of keys.

A reload builds a whole new table from the configuration file and swaps it in one assignment
(``Gateway.reload_tenants``); a file that does not load leaves the old table in place. What a
reload took away (keys, whole tenants) is returned, so that the client door can close the
sockets those keys opened (4003).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.admission import TenantLimits
from gateway.config import Config, Tenant

__all__ = [
    "CLOSE_REVOKED",
    "Revoked",
    "TenantPolicy",
    "TenantTable",
    "forget_plain_keys",
    "hash_key",
    "new_key",
]

CLOSE_REVOKED = 4003  # a socket whose key a reload took away
DEMO_TENANT = "demo"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> tuple[str, str]:
    """A fresh API key and its SHA-256 in hex, for ``key_sha256``."""
    key = secrets.token_urlsafe(32)
    return key, hash_key(key).hex()


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """What the intake checks for one tenant, beyond fair queueing (which ``limits`` feeds)."""

    name: str
    limits: TenantLimits
    rate: float | None = None
    burst: int = 1
    max_connections: int | None = None
    budget_per_day: float | None = None
    max_number_results: int | None = None
    allow_webhooks: bool = True
    allow_uploads: bool = True

    @property
    def checks_tasks(self) -> bool:
        """Whether the intake has anything to check for this tenant's tasks: a tenant without
        limits is never looked at again after this."""
        return (
            self.rate is not None
            or self.budget_per_day is not None
            or self.max_number_results is not None
            or not self.allow_webhooks
            or not self.allow_uploads
        )

    @classmethod
    def of(cls, name: str, tenant: Tenant) -> TenantPolicy:
        rate = tenant.rate
        burst = tenant.burst
        if burst is None:
            burst = max(1, math.ceil(rate)) if rate is not None else 1
        return cls(
            name=name,
            limits=TenantLimits(tenant.weight, tenant.max_in_flight, tenant.max_queued),
            rate=rate,
            burst=burst,
            max_connections=tenant.max_connections,
            budget_per_day=tenant.budget_per_day,
            max_number_results=tenant.max_number_results,
            allow_webhooks=tenant.allow_webhooks,
            allow_uploads=tenant.allow_uploads,
        )


_UNLIMITED = TenantLimits()


@dataclass(frozen=True, slots=True)
class Revoked:
    """What a reload took away: keys (by digest) and tenants that are gone altogether."""

    keys: frozenset[bytes]
    tenants: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.keys or self.tenants)


class TenantTable:
    """One configuration's tenants, read-only once built."""

    def __init__(
        self,
        by_digest: dict[bytes, str],
        policies: dict[str, TenantPolicy],
        demo_digest: bytes | None = None,
    ) -> None:
        self._by_digest = by_digest
        self.demo_digest = demo_digest
        self.policies = policies
        # only tenants the intake must check: one lookup per task, a miss for everyone else
        self.checked = {name: p for name, p in policies.items() if p.checks_tasks}

    @classmethod
    def from_config(cls, config: Config, *, previous: TenantTable | None = None) -> TenantTable:
        """Keys in plain and as ``key_sha256``; the demo key is tenant ``demo``'s. A reloaded
        file with no tenant and no demo key keeps the demo key the gateway started with (the
        one ``tenebra serve`` made up and printed: it is in no file to be read again)."""
        by_digest: dict[bytes, str] = {}
        policies: dict[str, TenantPolicy] = {}
        for name, tenant in config.tenants.items():
            policies[name] = TenantPolicy.of(name, tenant)
            for digest in _digests(tenant):
                by_digest[digest] = name
        demo = hash_key(config.demo_key) if config.demo_key else None
        if demo is None and not config.tenants and previous is not None:
            demo = previous.demo_digest
        if demo is not None:
            by_digest[demo] = DEMO_TENANT
            policies.setdefault(DEMO_TENANT, TenantPolicy(DEMO_TENANT, _UNLIMITED))
        return cls(by_digest, policies, demo)

    def tenant_of(self, api_key: str) -> str | None:
        return self._by_digest.get(hash_key(api_key))

    def limits(self, tenant: str) -> TenantLimits:
        policy = self.policies.get(tenant)
        return _UNLIMITED if policy is None else policy.limits

    def revoked_by(self, new: TenantTable) -> Revoked:
        """What this table allowed and ``new`` does not."""
        keys = frozenset(d for d, name in self._by_digest.items() if new._by_digest.get(d) != name)
        return Revoked(keys, frozenset(self.policies.keys() - new.policies.keys()))

    def __len__(self) -> int:
        return len(self.policies)


def _digests(tenant: Tenant) -> Iterable[bytes]:
    for key in tenant.keys:
        yield hash_key(key)
    for hexdigest in tenant.key_sha256:
        yield bytes.fromhex(hexdigest)


def forget_plain_keys(config: Config) -> None:
    """Replace every plain key of ``config`` by its hash: once the table is built, nothing in
    the gateway holds a key a client could use (the demo key, printed at start, included)."""
    for tenant in config.tenants.values():
        if tenant.keys:
            tenant.key_sha256 = [
                *tenant.key_sha256,
                *(hash_key(k).hex() for k in tenant.keys),
            ]
            tenant.keys = []
    config.demo_key = None
