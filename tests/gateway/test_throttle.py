"""Failed authentications and unauthenticated sockets per client address, on a clock by hand."""

from __future__ import annotations

from gateway.throttle import AuthThrottle
from tests.gateway.conftest import Clock


def test_failures_wait_longer_each_time_then_the_address_is_refused() -> None:
    clock = Clock()
    throttle = AuthThrottle(clock=clock, base_delay=0.1, max_delay=0.5, refuse_after=5, refusal=60)
    assert [throttle.failed("10.0.0.1") for _ in range(4)] == [0.1, 0.2, 0.4, 0.5]
    assert throttle.refused("10.0.0.1") == 0.0
    assert throttle.failed("10.0.0.1") == 0.5  # the fifth: refused from now on
    assert throttle.refused("10.0.0.1") == 60.0
    assert throttle.refused("10.0.0.2") == 0.0 and throttle.failed("10.0.0.2") == 0.1  # others
    clock.advance(60.0)
    assert throttle.refused("10.0.0.1") == 0.0
    assert throttle.failed("10.0.0.1") == 0.1  # starts over


def test_a_success_or_a_quiet_minute_forgets_the_failures() -> None:
    clock = Clock()
    throttle = AuthThrottle(clock=clock, forget_after=60)
    throttle.failed("a")
    throttle.failed("a")
    throttle.succeeded("a")
    assert throttle.failed("a") == 0.1
    clock.advance(61.0)
    assert throttle.failed("a") == 0.1


def test_unauthenticated_sockets_per_address_are_bounded() -> None:
    throttle = AuthThrottle(clock=Clock(), max_unauthenticated=2)
    assert [throttle.open_unauthenticated("a") for _ in range(3)] == [True, True, False]
    assert throttle.open_unauthenticated("b")
    throttle.close_unauthenticated("a")  # authenticated, or closed
    assert throttle.open_unauthenticated("a")


def test_the_table_is_bounded_and_keeps_addresses_with_sockets() -> None:
    throttle = AuthThrottle(clock=Clock(), max_addresses=3, max_unauthenticated=1)
    assert throttle.open_unauthenticated("holding")
    for index in range(10):
        throttle.failed(f"10.0.0.{index}")
    assert len(throttle) == 3
    assert not throttle.open_unauthenticated("holding")  # still there, its socket counted
    throttle.close_unauthenticated("holding")
    assert throttle.open_unauthenticated("holding")
