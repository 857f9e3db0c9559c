"""Full-jitter exponential backoff, for provider links and deliveries alike.

Delay n is uniform in [0, min(maximum, initial * 2**n)]: a fleet of gateways (or a burst of
webhooks to one receiver) never retries in step. Randomness is injected, so tests are
deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["full_jitter"]


def full_jitter(initial: float, maximum: float, rng: random.Random) -> Iterator[float]:
    """Endless delays; the caller decides how many attempts there are."""
    ceiling = min(initial, maximum)
    while True:
        yield rng.uniform(0, ceiling)
        ceiling = min(maximum, ceiling * 2)  # capped before it can overflow a float
