"""Failed authentications and unauthenticated sockets per client address, on a clock by hand."""

from __future__ import annotations

from gateway.throttle import AuthThrottle, ClientAddresses
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


def test_behind_a_trusted_proxy_the_forwarded_address_counts() -> None:
    addresses = ClientAddresses(["10.0.0.0/8", "::1"])
    # a trusted proxy: the rightmost hop it did not add itself
    assert addresses.of("10.0.0.5", "203.0.113.7") == "203.0.113.7"
    assert addresses.of("10.0.0.5", "198.51.100.1, 203.0.113.7, 10.0.0.9") == "203.0.113.7"
    assert addresses.of("::1", "2001:db8::1") == "2001:db8::1"
    # what the client wrote itself is to the left of what the proxy saw: never believed
    assert addresses.of("10.0.0.5", "127.0.0.1, 203.0.113.7") == "203.0.113.7"
    # not from a trusted proxy: the header is the client's own, ignored
    assert addresses.of("203.0.113.7", "10.9.9.9") == "203.0.113.7"
    assert addresses.of("10.0.0.5", None) == "10.0.0.5"
    assert addresses.of("10.0.0.5", "10.0.0.6, 10.0.0.7") == "10.0.0.6"  # proxies all the way
    assert addresses.of("10.0.0.5", "garbage") == "garbage"  # what the proxy saw, as it wrote it
    assert ClientAddresses([]).of("10.0.0.5", "203.0.113.7") == "10.0.0.5"
    assert ClientAddresses([]).of(None, None) == ""
