"""The console's data structures, each of a size fixed when it is made.

The console runs beside the task path for as long as the gateway does, watched or not: nothing
it keeps may grow with traffic, uptime or the number of viewers. Three shapes cover it:

- :class:`Series`: the last ``capacity`` one-second points (tasks/s, p50, p99), in preallocated
  arrays written round and round.
- :class:`LatencySample`: at most ``capacity`` latencies of the current second, a uniform
  reservoir sample (Vitter's algorithm L) of however many tasks ended in it, from which the
  second's percentiles are read.
- :class:`Mailbox`: a viewer's queue of frames to send. It never waits and never grows: a frame
  that finds it full is refused, and the producer drops that viewer (a viewer that cannot take
  one frame a second for ``capacity`` seconds is not keeping up).
"""

from __future__ import annotations

import asyncio
import math
import random
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["LatencySample", "Mailbox", "Series", "percentile"]

T = TypeVar("T")


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of a sorted, non-empty list."""
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


class LatencySample:
    """A bounded uniform sample of the latencies seen since the last :meth:`take`.

    Vitter's algorithm L: once the sample is full, the index of the next value kept is drawn
    ahead (a geometric skip), so the values skipped cost nothing, not even a random draw:
    :meth:`extend` reads the latency of the few items it keeps, not of every item."""

    __slots__ = ("_next", "_rng", "_values", "_w", "capacity", "seen")

    def __init__(self, capacity: int = 512, rng: random.Random | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._values: list[float] = []
        self.seen = 0  # every latency offered this second, sampled or not: the tasks/s figure
        self._rng = rng or random.Random()
        self._w = 1.0
        self._next = 0  # once full: the index (among those seen) of the next value kept

    def _skip(self) -> None:
        """Algorithm L's step: the next index kept, and the weight after it."""
        rand = self._rng.random
        self._next += int(math.log(rand() or 1e-300) / math.log1p(-self._w)) + 1
        self._w *= math.exp(math.log(rand() or 1e-300) / self.capacity)

    def _full(self) -> None:
        self._w = math.exp(math.log(self._rng.random() or 1e-300) / self.capacity)
        self._next = self.capacity - 1
        self._skip()

    def add(self, latency: float) -> None:
        index = self.seen
        self.seen = index + 1
        values = self._values
        if len(values) < self.capacity:
            values.append(latency)
            if len(values) == self.capacity:
                self._full()
        elif index == self._next:
            values[int(self._rng.random() * self.capacity)] = latency
            self._skip()

    def extend(self, items: Sequence[T], latency: Callable[[T], float]) -> None:
        """:meth:`add` of ``latency(item)`` for each item, in order; ``latency`` is called
        only for the items the sample keeps."""
        base = self.seen
        end = base + len(items)
        self.seen = end
        values, capacity = self._values, self.capacity
        index = base
        while len(values) < capacity and index < end:
            values.append(latency(items[index - base]))
            index += 1
            if len(values) == capacity:
                self._full()
        if len(values) < capacity:
            return
        rand = self._rng.random
        while self._next < end:
            values[int(rand() * capacity)] = latency(items[self._next - base])
            self._skip()

    def __len__(self) -> int:
        return len(self._values)

    def take(self) -> tuple[int, float, float]:
        """(tasks seen, p50, p99) of the second that ends, and start the next one empty;
        the percentiles are NaN when no task ended."""
        seen, values = self.seen, self._values
        self._values, self.seen = [], 0
        if not values:
            return seen, math.nan, math.nan
        values.sort()
        return seen, percentile(values, 50), percentile(values, 99)


class Series:
    """The last ``capacity`` points of (time, rate, p50, p99), oldest first when read.

    Four arrays of doubles allocated once: a push writes one slot and moves the head, so the
    memory is ``32 * capacity`` bytes whether the gateway ran a minute or a year."""

    __slots__ = ("_head", "_length", "_p50", "_p99", "_rate", "_time", "capacity")

    def __init__(self, capacity: int = 900) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        empty = array("d", [math.nan]) * capacity
        self._time, self._rate = array("d", empty), array("d", empty)
        self._p50, self._p99 = array("d", empty), array("d", empty)
        self._head = 0  # the slot the next point goes to
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def push(self, time: float, rate: float, p50: float, p99: float) -> None:
        head = self._head
        self._time[head], self._rate[head] = time, rate
        self._p50[head], self._p99[head] = p50, p99
        self._head = (head + 1) % self.capacity
        self._length = min(self._length + 1, self.capacity)

    def last(self) -> tuple[float, float, float, float] | None:
        if not self._length:
            return None
        i = (self._head - 1) % self.capacity
        return self._time[i], self._rate[i], self._p50[i], self._p99[i]

    def points(self) -> list[tuple[float, float, float, float]]:
        """Every point held, oldest first (for a viewer that just joined)."""
        start = (self._head - self._length) % self.capacity
        out = []
        for k in range(self._length):
            i = (start + k) % self.capacity
            out.append((self._time[i], self._rate[i], self._p50[i], self._p99[i]))
        return out


class Mailbox:
    """Frames waiting for one viewer: at most ``capacity``; :meth:`offer` never blocks."""

    __slots__ = ("_frames", "_wakeup", "capacity", "closed")

    def __init__(self, capacity: int = 8) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._frames: deque[bytes] = deque()
        self.closed = False
        # the viewer's writer sleeps on these while nothing waits (one at most: one writer)
        self._wakeup: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._frames)

    def offer(self, frame: bytes) -> bool:
        """Queue ``frame``; False (nothing queued) when the viewer is ``capacity`` frames
        behind or the mailbox is closed."""
        if self.closed or len(self._frames) >= self.capacity:
            return False
        self._frames.append(frame)
        self._wake()
        return True

    def close(self) -> None:
        self.closed = True
        self._frames.clear()
        self._wake()

    def _wake(self) -> None:
        waiters, self._wakeup = self._wakeup, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def next(self) -> bytes | None:
        """The oldest frame, waiting for one; None once closed."""
        while not self._frames:
            if self.closed:
                return None
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._wakeup.append(future)
            await future
        return self._frames.popleft()
