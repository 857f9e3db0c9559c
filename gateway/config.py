"""Configuration: a TOML file, overridden by ``TENEBRA_<SECTION>_<SETTING>`` variables.

``RUNWARE_API_KEY`` sets ``provider.api_key`` and ``TENEBRA_DEMO_KEY`` the demo tenant's key.
Everything is checked by msgspec at start; a bad value stops the start with a message that
names the setting (``server.port: Expected `int` ...``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

__all__ = [
    "Config",
    "ConfigError",
    "DeliverySettings",
    "ProviderSettings",
    "ServerSettings",
    "TaskSettings",
    "Tenant",
    "load_config",
]

MiB = 1 << 20


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    max_frame_bytes: int = 32 * MiB  # a bigger inbound frame closes the socket with 1009
    max_tasks_per_frame: int = 256  # more gets one tooManyTasks error for the frame
    send_buffer_bytes: int = 8 * MiB  # past this a client that does not read is cut (4008)
    socket_send_buffer_bytes: int = 256 * 1024  # the kernel's, per client socket; 0: autotuned
    session_buffer_bytes: int = 16 * MiB  # frames kept for a client that went away
    resume_window: float = 120.0
    idle_timeout: float = 120.0
    auth_timeout: float = 10.0
    rest_sync_deadline: float = 120.0
    drain_deadline: float = 30.0


class ProviderSettings(msgspec.Struct, forbid_unknown_fields=True):
    url: str | None = None  # None: the embedded local provider
    api_key: str | None = None
    links: int = 1
    connect_timeout: float = 10.0
    auth_timeout: float = 10.0
    ping_interval: float = 20.0
    pong_timeout: float = 10.0
    send_timeout: float = 10.0
    max_queued: int = 10_000  # tasks waiting for a ready link
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_message_bytes: int = 64 * MiB
    max_batch: int = 64  # tasks per upstream frame
    outage_deadline: float = 30.0  # a task waiting this long for a link fails (503)
    recovery_interval: float = 1.0  # re-poll of tasks orphaned by a session the provider lost


class TaskSettings(msgspec.Struct, forbid_unknown_fields=True):
    retention: float = 3600.0  # finished tasks stay readable by getResponse this long
    max_retained: int = 200_000  # and at most this many of them: the oldest are forgotten first
    max_open: int = 100_000
    timeout: float = 600.0  # a task with results missing this long after acceptance expires


class DeliverySettings(msgspec.Struct, forbid_unknown_fields=True):
    attempts: int = 8  # per webhook or upload; with the backoff below, about 10 minutes
    backoff_initial: float = 5.0
    backoff_max: float = 300.0
    timeout: float = 10.0  # one attempt, connect to last byte
    per_host: int = 4  # concurrent requests to one destination host
    max_response_bytes: int = 64 * 1024  # of a receiver's answer: read and dropped
    max_image_bytes: int = 256 * MiB  # fetched from the provider for an upload
    allow: list[str] = msgspec.field(default_factory=list)  # CIDRs or hosts the guard opens


class Tenant(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[str]
    webhook_secret: str | None = None  # "whsec_<base64>": Standard Webhooks signatures
    webhook_envelope: bool = False  # {"data": [item]} instead of the flat item


class Config(msgspec.Struct, forbid_unknown_fields=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    provider: ProviderSettings = msgspec.field(default_factory=ProviderSettings)
    tasks: TaskSettings = msgspec.field(default_factory=TaskSettings)
    delivery: DeliverySettings = msgspec.field(default_factory=DeliverySettings)
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
}


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for section, kind in _SECTIONS.items():
        for name in kind.__struct_fields__:
            variable = f"TENEBRA_{section}_{name}".upper()
            if variable in env:
                raw.setdefault(section, {})[name] = env[variable]
    if "RUNWARE_API_KEY" in env:
        raw.setdefault("provider", {})["api_key"] = env["RUNWARE_API_KEY"]
    if "TENEBRA_DEMO_KEY" in env:
        raw["demo_key"] = env["TENEBRA_DEMO_KEY"]
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        detail, _, where = text.partition(" - at `$.")
        setting = where.rstrip("`") or "configuration"
        raise ConfigError(f"{setting}: {detail}") from exc
    _check(config)
    return config


def _check(config: Config) -> None:
    for name, value in (
        ("server.port", config.server.port),
        ("provider.links", config.provider.links),
        ("tasks.max_open", config.tasks.max_open),
        ("server.max_tasks_per_frame", config.server.max_tasks_per_frame),
    ):
        if value < (0 if name == "server.port" else 1):
            raise ConfigError(f"{name}: must be positive, not {value}")
    if config.provider.url is not None and not config.provider.url.startswith(("ws://", "wss://")):
        raise ConfigError(
            f"provider.url: must be a ws:// or wss:// URL, not {config.provider.url!r}"
        )
    if config.provider.url is not None and not config.provider.api_key:
        raise ConfigError("provider.api_key: required with provider.url (or RUNWARE_API_KEY)")
    seen: dict[str, str] = {}
    for name, tenant in config.tenants.items():
        for key in tenant.keys:
            if key in seen:
                raise ConfigError(f"tenants.{name}.keys: key also belongs to {seen[key]}")
            seen[key] = name
