from __future__ import annotations

import random

import msgspec
import pytest

from gateway.provider.faults import Faults, Latency


def test_fixed_latency() -> None:
    assert Latency(kind="fixed", ms=250).sample(random.Random(1)) == 0.25


def test_uniform_latency_stays_in_range() -> None:
    rng = random.Random(1)
    samples = [Latency(kind="uniform", ms=10, high_ms=20).sample(rng) for _ in range(500)]
    assert min(samples) >= 0.010 and max(samples) <= 0.020
    assert max(samples) - min(samples) > 0.008


def test_lognormal_latency_has_its_median_and_a_tail() -> None:
    rng = random.Random(1)
    samples = sorted(Latency(kind="lognormal", ms=50, sigma=0.8).sample(rng) for _ in range(2001))
    assert 0.040 < samples[1000] < 0.060
    assert samples[1980] > 3 * samples[1000]


def test_partial_updates() -> None:
    faults = Faults().updated({"stall": True, "latency": {"kind": "uniform", "ms": 5}})
    assert faults.stall and faults.latency.kind == "uniform" and faults.latency.ms == 5
    assert faults.error_code == "timeoutProvider"
    with pytest.raises(msgspec.ValidationError):
        Faults().updated({"stal": True})
    with pytest.raises(msgspec.ValidationError):
        Faults().updated({"latency": {"kind": "gamma"}})
