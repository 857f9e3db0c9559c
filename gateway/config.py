"""Configuration: a TOML file, overridden by ``TENEBRA_<SECTION>_<SETTING>`` variables, overridden
by the command line.

``RUNWARE_API_KEY`` sets ``provider.api_key`` and ``TENEBRA_DEMO_KEY`` the demo tenant's key.
A provider key without a URL means Runware itself (``RUNWARE_URL``): the local provider runs only
when there is no key at all. Everything is checked by msgspec at start, ranges included; a bad
value stops the start with a message that names the setting (``tasks.retention: Expected `float`
>= 0.0``), and so does a ``TENEBRA_*`` variable that is not a setting (a typo would otherwise be
silently ignored).
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "OTHER_VARIABLES",
    "RUNWARE_URL",
    "AdminSettings",
    "Config",
    "ConfigError",
    "DeliverySettings",
    "ProviderSettings",
    "ServerSettings",
    "StoreSettings",
    "TaskSettings",
    "Tenant",
    "known_variables",
    "load_config",
]

MiB = 1 << 20

RUNWARE_URL = "wss://ws-api.runware.ai/v1"

# TENEBRA_* variables that are not settings of a section, with who reads them. The one list:
# anything else spelt TENEBRA_* stops the start.
OTHER_VARIABLES = frozenset(
    {
        "TENEBRA_DEMO_KEY",  # Config.demo_key; also `tenebra generate --key`'s default
        "TENEBRA_ADMIN_KEY",  # one more of admin.keys (the console's, gateway/console/)
        "TENEBRA_PROVIDER_KEY",  # `tenebra provider`: the key it accepts
        "TENEBRA_PROVIDER_CONTROL_KEY",  # `tenebra provider`: guards /control/*
        "TENEBRA_TESTS_TIME_FACTOR",  # the test suite's time factor (tests/timing.py)
    }
)

# Ranges by kind, so that a number out of range stops the start instead of misbehaving later.
Port = Annotated[int, Meta(ge=0, le=65535)]  # 0: any free port
Seconds = Annotated[float, Meta(gt=0)]
Count = Annotated[int, Meta(ge=1)]
Bytes = Annotated[int, Meta(ge=1)]


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 8080
    max_frame_bytes: Bytes = 32 * MiB  # a bigger inbound frame closes the socket with 1009
    max_tasks_per_frame: Count = 256  # more gets one tooManyTasks error for the frame
    send_buffer_bytes: Bytes = 8 * MiB  # past this a client that does not read is cut (4008)
    # the kernel's, per client socket; 0: autotuned
    socket_send_buffer_bytes: Annotated[int, Meta(ge=0)] = 256 * 1024
    session_buffer_bytes: Bytes = 16 * MiB  # frames kept for a client that went away
    resume_window: Seconds = 120.0
    idle_timeout: Seconds = 120.0
    auth_timeout: Seconds = 10.0
    rest_sync_deadline: Seconds = 120.0
    drain_deadline: Annotated[float, Meta(ge=0)] = 30.0  # 0: close at once, no drain
    # The client door's bounds (README, "Limits and close codes"):
    max_connections: Count = 10_000  # client WebSockets; past it the upgrade gets 503
    handshake_timeout: Seconds = 10.0  # TCP accept to a whole request (and keep-alive idle)
    max_unauthenticated_frame_bytes: Bytes = 4 * 1024  # before authentication; past it 1009
    max_sessions: Count = 20_000  # past it the oldest detached session is evicted
    max_sessions_per_tenant: Count = 10_000  # likewise, within the tenant
    sessions_buffer_bytes: Bytes = 256 * MiB  # all sessions' buffers together; likewise
    get_response_rate: Annotated[float, Meta(gt=0)] = 50.0  # per connection and second
    get_response_burst: Count = 256  # past rate and burst: rateLimitExceeded for that poll
    metrics_token: str | None = None  # GET /metrics then wants "Authorization: Bearer <it>"
    audit: bool = True  # an info line per finished task, failed authentication, limit hit
    # Hostile clients, per client address (gateway/throttle.py):
    auth_failure_delay: Seconds = 0.1  # a failed authentication's answer waits, doubling ...
    auth_failure_delay_max: Seconds = 5.0  # ... up to this
    auth_failures_before_refusal: Count = 10  # within a minute: the address is then refused
    auth_refusal: Seconds = 60.0  # for this long (upgrades and REST get 429)
    # open sockets not yet authenticated; past it 429. Generous: one service host reconnects
    # all its SDK sockets at once after a 1012, and a proxy in front shares one address
    max_unauthenticated_per_address: Count = 256
    # CIDRs of proxies (a balancer) whose X-Forwarded-For names the client for the bounds above
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    request_read_timeout: Seconds = 10.0  # a REST request's body; past it 408
    # a REST body read before a key is known (no Authorization header); past it 413
    max_keyless_request_bytes: Bytes = 256 * 1024


class ProviderSettings(msgspec.Struct, forbid_unknown_fields=True):
    url: str | None = None  # None: Runware's with an api_key, the embedded local provider without
    api_key: str | None = None
    local_cost: bool = False  # the local provider's results cost catalogue prices, not 0
    links: Count = 1
    connect_timeout: Seconds = 10.0
    auth_timeout: Seconds = 10.0
    ping_interval: Seconds = 20.0
    pong_timeout: Seconds = 10.0
    send_timeout: Seconds = 10.0
    max_queued: Count = 10_000  # tasks waiting at the gateway (for capacity or a link)
    max_in_flight: Count = 256  # tasks out at the provider per link: the adaptive window's ceiling
    # a task the provider lost with its session (a restart): "fail", or "resubmit" it once
    on_lost: Literal["fail", "resubmit"] = "fail"
    backoff_initial: Seconds = 0.5
    backoff_max: Seconds = 30.0
    max_message_bytes: Bytes = 64 * MiB
    max_batch: Count = 64  # tasks per upstream frame
    outage_deadline: Seconds = 30.0  # a task waiting this long for a link fails (503)
    recovery_interval: Seconds = 1.0  # re-poll of tasks orphaned by a session the provider lost

    def __post_init__(self) -> None:
        # A key is for a real provider: never render locally and count fake spend against it.
        if self.url is None and self.api_key:
            self.url = RUNWARE_URL


class TaskSettings(msgspec.Struct, forbid_unknown_fields=True):
    # finished tasks stay readable by getResponse this long (0: not after their last result)
    retention: Annotated[float, Meta(ge=0)] = 3600.0
    max_retained: Count = 200_000  # and at most this many of them: the oldest are forgotten first
    max_open: Count = 100_000
    timeout: Seconds = 600.0  # a task with results missing this long after acceptance expires


class DeliverySettings(msgspec.Struct, forbid_unknown_fields=True):
    attempts: Count = 8  # per webhook or upload; with the backoff below, about 10 minutes
    backoff_initial: Seconds = 5.0
    backoff_max: Seconds = 300.0
    timeout: Seconds = 10.0  # one attempt, connect to last byte
    per_host: Count = 4  # concurrent requests to one destination host
    max_response_bytes: Bytes = 64 * 1024  # of a receiver's answer: read and dropped
    max_image_bytes: Bytes = 256 * MiB  # fetched from the provider for an upload
    allow: list[str] = msgspec.field(default_factory=list)  # CIDRs or hosts the guard opens


class StoreSettings(msgspec.Struct, forbid_unknown_fields=True):
    # redis://[:password@]host:port/db or rediss:// (TLS): the store replicas share. None: every
    # task, session, delivery and limit in this process's memory (one replica).
    url: str | None = None
    timeout: Seconds = 1.0  # each Redis call (and the wait for a pooled connection)
    max_connections: Count = 32  # Redis sockets of one replica
    prefix: str = (
        "tenebra"  # of every key: gateways sharing a Redis under other prefixes never meet
    )
    # A replica renews its lease every third of this; one silent this long is taken as dead and
    # its provider sessions, tasks and deliveries are taken over by another.
    lease: Annotated[float, Meta(ge=0.3, le=300)] = 5.0
    replica: str | None = None  # this replica's name (unique); default host-pid-random


Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}\Z")]  # \Z: $ matches before a newline


class Tenant(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[str] = msgspec.field(default_factory=list)
    key_sha256: list[Sha256Hex] = msgspec.field(default_factory=list)  # keys stored as hashes
    weight: Annotated[float, Meta(gt=0)] = 1.0  # share of provider capacity while tasks wait
    max_in_flight: Count | None = None  # tasks of this tenant at the provider at once
    max_queued: Count | None = None  # tasks waiting at the gateway; past it rateLimitExceeded
    # The intake's limits (gateway/quotas.py): past each, an error item for that task
    rate: Annotated[float, Meta(gt=0)] | None = None  # tasks/s sustained (a token bucket)
    burst: Count | None = None  # the bucket's depth; default: rate rounded up
    max_connections: Count | None = None  # authenticated WebSockets at once
    budget_per_day: Annotated[float, Meta(ge=0)] | None = None  # USD per UTC day
    max_number_results: Annotated[int, Meta(ge=1)] | None = None
    allow_webhooks: bool = True
    allow_uploads: bool = True
    webhook_secret: str | None = None  # "whsec_<base64>": Standard Webhooks signatures
    webhook_envelope: bool = False  # {"data": [item]} instead of the flat item


class AdminSettings(msgspec.Struct, forbid_unknown_fields=True):
    """Who may open ``/console`` on every tenant (gateway/console/); a tenant's key opens it on
    its own tenant. Keys are hashed at start, like tenants' keys."""

    keys: list[str] = msgspec.field(default_factory=list)
    key_sha256: list[Sha256Hex] = msgspec.field(default_factory=list)
    max_viewers: Count = 64  # console pages open at once; past it the upgrade gets 503


class Config(msgspec.Struct, forbid_unknown_fields=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    provider: ProviderSettings = msgspec.field(default_factory=ProviderSettings)
    tasks: TaskSettings = msgspec.field(default_factory=TaskSettings)
    delivery: DeliverySettings = msgspec.field(default_factory=DeliverySettings)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    admin: AdminSettings = msgspec.field(default_factory=AdminSettings)
    tenants: dict[str, Tenant] = msgspec.field(default_factory=dict)
    demo_key: str | None = None  # a key of tenant "demo", printed at start

    def keys(self) -> dict[str, str]:
        """API key -> tenant."""
        table = {key: name for name, tenant in self.tenants.items() for key in tenant.keys}
        if self.demo_key:
            table[self.demo_key] = "demo"
        return table


class ConfigError(Exception):
    """Bad configuration, with the setting it is about."""


_SECTIONS = {
    "server": ServerSettings,
    "provider": ProviderSettings,
    "tasks": TaskSettings,
    "delivery": DeliverySettings,
    "store": StoreSettings,
    "admin": AdminSettings,
}


def _setting_variables() -> dict[str, tuple[str, str]]:
    """``TENEBRA_SERVER_PORT`` -> ("server", "port"), for every setting of every section."""
    return {
        f"TENEBRA_{section}_{name}".upper(): (section, name)
        for section, kind in _SECTIONS.items()
        for name in kind.__struct_fields__
    }


def known_variables() -> frozenset[str]:
    return frozenset(_setting_variables()) | OTHER_VARIABLES


def _check_variables(env: Mapping[str, str]) -> None:
    known = known_variables()
    for variable in sorted(env):
        if variable.startswith("TENEBRA_") and variable not in known:
            close = difflib.get_close_matches(variable, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{variable}: unknown setting{hint}")


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """The file, then the environment, then ``overrides`` (``{"server.port": 9000}``; the
    command line's flags, None for a flag not given), all checked together."""
    env = os.environ if env is None else env
    _check_variables(env)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for variable, (section, name) in _setting_variables().items():
        if variable in env:
            raw.setdefault(section, {})[name] = _env_value(variable, env[variable])
    if "RUNWARE_API_KEY" in env:
        raw.setdefault("provider", {})["api_key"] = env["RUNWARE_API_KEY"]
    if "TENEBRA_DEMO_KEY" in env:
        raw["demo_key"] = env["TENEBRA_DEMO_KEY"]
    if env.get("TENEBRA_ADMIN_KEY"):
        admin = raw.setdefault("admin", {})
        admin["keys"] = [*admin.get("keys", []), env["TENEBRA_ADMIN_KEY"]]
    for setting, value in (overrides or {}).items():
        if value is not None:
            *sections, name = setting.split(".")
            table = raw
            for section in sections:
                table = table.setdefault(section, {})
            table[name] = value
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        detail, _, where = text.partition(" - at `$.")
        setting = where.rstrip("`") or "configuration"
        raise ConfigError(f"{setting}: {detail}") from exc
    _check(config)
    return config


def _env_value(variable: str, value: str) -> Any:
    """A list setting (``delivery.allow``, ``server.trusted_proxies``) comes as a JSON array;
    anything else as the string it is, converted with the rest."""
    if not value.lstrip().startswith("["):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{variable}: not a JSON array ({exc})") from None


def _check(config: Config) -> None:
    if config.provider.url is not None and not config.provider.url.startswith(("ws://", "wss://")):
        raise ConfigError(
            f"provider.url: must be a ws:// or wss:// URL, not {config.provider.url!r}"
        )
    if config.provider.url is not None and not config.provider.api_key:
        raise ConfigError("provider.api_key: required with provider.url (or RUNWARE_API_KEY)")
    _check_store_url(config.store.url)
    for cidr in config.server.trusted_proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(
                f"server.trusted_proxies: {cidr!r} is not an address or a CIDR"
            ) from None
    seen: dict[str, str] = {}  # by the key's SHA-256: a plain key and its hash are one key
    for name, tenant in config.tenants.items():
        hashes = [hashlib.sha256(key.encode()).hexdigest() for key in tenant.keys]
        for field, digest in [("keys", h) for h in hashes] + [
            ("key_sha256", h.lower()) for h in tenant.key_sha256
        ]:
            if digest in seen:
                raise ConfigError(f"tenants.{name}.{field}: key also belongs to {seen[digest]}")
            seen[digest] = name
    # an admin key that is also a tenant's would open the console on everything to that tenant
    admin = [hashlib.sha256(key.encode()).hexdigest() for key in config.admin.keys]
    if config.demo_key:
        seen[hashlib.sha256(config.demo_key.encode()).hexdigest()] = "demo"
    for digest in admin + [h.lower() for h in config.admin.key_sha256]:
        if digest in seen:
            raise ConfigError(f"admin: a key also belongs to tenant {seen[digest]}")


def _check_store_url(url: str | None) -> None:
    """A Redis URL with a host, or nothing; the message never repeats it (it may hold a
    password)."""
    if url is None:
        return
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss"):
        shown = f"{scheme!r}" if sep else "none"
        raise ConfigError(f"store.url: must be a redis:// or rediss:// URL (scheme: {shown})")
    host = rest.split("/", 1)[0].rpartition("@")[2]
    if not host or host.startswith(":"):
        raise ConfigError("store.url: has no host (redis://host:port/db)")
