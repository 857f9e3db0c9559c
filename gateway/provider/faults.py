"""Faults the local provider injects on purpose, switchable at start and at run time.

All randomness comes from one injected :class:`random.Random`, so a test that seeds it sees
the same faults every run.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import msgspec

__all__ = ["Faults", "Latency"]


class Latency(msgspec.Struct, forbid_unknown_fields=True):
    """Added time per image, in milliseconds.

    ``fixed``: always ``ms``; ``uniform``: between ``ms`` and ``high_ms``; ``lognormal``: a median
    of ``ms`` with shape ``sigma`` (a long tail, as real queues have).
    """

    kind: Literal["fixed", "uniform", "lognormal"] = "fixed"
    ms: float = 0.0
    high_ms: float = 0.0
    sigma: float = 0.5

    def sample(self, rng: random.Random) -> float:
        """Seconds to wait for one image."""
        if self.kind == "fixed":
            ms = self.ms
        elif self.kind == "uniform":
            ms = rng.uniform(self.ms, max(self.ms, self.high_ms))
        else:
            ms = rng.lognormvariate(math.log(max(self.ms, 1e-3)), self.sigma)
        return max(0.0, ms) / 1000.0


class Faults(msgspec.Struct, forbid_unknown_fields=True):
    """The switches. Posted as JSON to ``/control/faults``, where a partial object updates."""

    latency: Latency = msgspec.field(default_factory=Latency)
    error_rate: float = 0.0  # probability that a task fails with error_code
    error_code: str = "timeoutProvider"
    drop_after_frames: int = 0  # close each connection abruptly after this many frames sent
    drop_probability: float = 0.0  # ...or with this probability per frame sent
    stall: bool = False  # keep TCP open, answer nothing (pings included)
    deaf: bool = False  # keep TCP open, stop reading it: what the gateway sends backs up
    refuse_auth: bool = False
    send_delay_ms: float = 0.0  # slow sending: wait this long before each frame
    fast: bool = False  # URL results of one pre-rendered image, no rendering

    def updated(self, changes: dict[str, object]) -> Faults:
        merged = msgspec.to_builtins(self)
        merged.update(changes)
        return msgspec.convert(merged, Faults)
