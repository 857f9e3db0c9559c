"""The console's structures keep a fixed size whatever passes through them."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from gateway.console.bounded import LatencySample, Mailbox, Series, percentile


def test_series_keeps_the_last_points_in_order() -> None:
    series = Series(capacity=5)
    assert series.points() == [] and series.last() is None
    for t in range(12):
        series.push(float(t), t * 10.0, t / 10, t / 5)
    assert len(series) == 5
    assert [p[0] for p in series.points()] == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert series.last() == (11.0, 110.0, 1.1, 2.2)


def test_series_is_preallocated() -> None:
    series = Series(capacity=900)
    before = [len(a) for a in (series._time, series._rate, series._p50, series._p99)]
    for t in range(5000):
        series.push(float(t), 1.0, 0.1, 0.2)
    after = [len(a) for a in (series._time, series._rate, series._p50, series._p99)]
    assert before == after == [900] * 4
    assert len(series.points()) == 900


def test_percentiles_are_nearest_rank() -> None:
    ordered = [float(v) for v in range(1, 101)]
    assert percentile(ordered, 50) == 50.0
    assert percentile(ordered, 99) == 99.0
    assert percentile([3.0], 99) == 3.0


def test_sample_is_exact_below_its_capacity() -> None:
    sample = LatencySample(capacity=512)
    for v in range(1, 101):
        sample.add(v / 100)
    assert sample.take() == (100, 0.5, 0.99)
    seen, p50, _ = sample.take()  # the next second starts empty
    assert seen == 0 and math.isnan(p50)


def test_sample_stays_bounded_and_counts_everything() -> None:
    sample = LatencySample(capacity=64, rng=random.Random(1))
    for v in range(100_000):
        sample.add(float(v))
        assert len(sample) <= 64
    seen, p50, p99 = sample.take()
    assert seen == 100_000
    # a uniform sample of 0..99,999: its median near the middle, its p99 near the top
    assert 30_000 < p50 < 70_000
    assert p99 > 85_000
    assert len(sample) == 0 and sample.seen == 0


def test_an_empty_second_has_no_percentiles() -> None:
    seen, p50, p99 = LatencySample().take()
    assert seen == 0 and math.isnan(p50) and math.isnan(p99)


def test_bounds_must_be_positive() -> None:
    for make in (Series, LatencySample, Mailbox):
        with pytest.raises(ValueError):
            make(0)


async def test_mailbox_refuses_past_its_capacity_and_never_waits() -> None:
    box = Mailbox(capacity=3)
    assert all(box.offer(b"%d" % i) for i in range(3))
    assert not box.offer(b"late")  # full: refused at once, nothing queued
    assert len(box) == 3
    assert await box.next() == b"0"
    assert box.offer(b"3")
    assert [await box.next() for _ in range(3)] == [b"1", b"2", b"3"]


async def test_mailbox_wakes_its_reader_and_ends_when_closed() -> None:
    box = Mailbox(capacity=2)
    reader = asyncio.ensure_future(box.next())
    await asyncio.sleep(0)
    assert not reader.done()
    box.offer(b"x")
    assert await reader == b"x"
    waiting = asyncio.ensure_future(box.next())
    await asyncio.sleep(0)
    box.close()
    assert await waiting is None
    assert not box.offer(b"after")
