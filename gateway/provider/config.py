"""The local provider's settings and counters, shared by its server, engine and controls."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from gateway.provider.faults import Faults

__all__ = ["ProviderConfig", "Stats"]

MiB = 1 << 20


@dataclass
class ProviderConfig:
    keys: frozenset[str]
    public_url: str | None = None  # where clients reach /images; the bound address by default
    idle_timeout: float = 120.0
    resume_window: float = 120.0
    task_retention: float = 3600.0
    max_tasks: int = 100_000
    image_retention: float = 3600.0
    max_images: int = 5_000
    max_image_bytes: int = 1024 * MiB
    max_message_bytes: int = 32 * MiB
    session_buffer_frames: int = 10_000
    render_workers: int | None = None
    render_queue: int = 256
    send_timeout: float = 30.0
    reference_timeout: float = 10.0
    reference_max_bytes: int = 32 * MiB
    # reference image URLs may lead only to global addresses, save these CIDRs or host names
    allow: list[str] = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)
    # False: every result's cost is 0 (the images are synthetic); True: catalogue prices
    priced: bool = True
    # /control/* exist only with a key, and then want "Authorization: Bearer <key>"
    control_key: str | None = None


class Stats(msgspec.Struct):
    connections: int = 0
    open_connections: int = 0
    authentications: int = 0
    resumed: int = 0
    submissions: int = 0
    refusals: int = 0  # tasks refused whole for want of room (rateLimitExceeded, unbilled)
    conflicts: int = 0
    images: int = 0
    frames_sent: int = 0
    dropped_connections: int = 0
