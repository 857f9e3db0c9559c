"""The egress address policy, range by range, written every way a host can be written."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.egress import EgressPolicy, host_address, why_not_global

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback v6"),
    ("10.1.2.3", "RFC 1918"),
    ("172.16.0.1", "RFC 1918"),
    ("172.31.255.254", "RFC 1918"),
    ("192.168.1.1", "RFC 1918"),
    ("169.254.169.254", "link-local (cloud metadata)"),
    ("fe80::1", "link-local v6"),
    ("100.64.0.1", "CGNAT"),
    ("100.100.100.200", "CGNAT (Alibaba metadata)"),
    ("fc00::1", "ULA"),
    ("fd12:3456::1", "ULA"),
    ("2002:c0a8:0101::1", "6to4 embedding 192.168.1.1"),
    ("2002:7f00:0001::1", "6to4 embedding 127.0.0.1"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped RFC 1918"),
    ("64:ff9b::a00:1", "NAT64 embedding 10.0.0.1"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast v6"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified v6"),
    ("192.0.2.1", "documentation"),
    ("2001:db8::1", "documentation v6"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "2002:0808:0808::1", "::ffff:8.8.8.8"]


@pytest.mark.parametrize(("address", "kind"), REFUSED)
def test_non_global_addresses_are_refused(address: str, kind: str) -> None:
    assert why_not_global(ipaddress.ip_address(address)) is not None, kind
    policy = EgressPolicy()
    host = f"[{address}]" if ":" in address else address
    assert policy.refusal_for_url(f"https://{host}:8443/hook") is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_global_addresses_pass(address: str) -> None:
    assert why_not_global(ipaddress.ip_address(address)) is None
    host = f"[{address}]" if ":" in address else address
    assert EgressPolicy().refusal_for_url(f"https://{host}/hook") is None


def test_names_are_left_to_connect_time() -> None:
    assert EgressPolicy().refusal_for_url("https://hooks.example.com/x") is None


def test_the_allow_list_opens_chosen_destinations() -> None:
    policy = EgressPolicy(["127.0.0.0/8", "10.1.0.0/16", "internal.example"])
    assert policy.refusal_for_url("http://127.0.0.1:9000/x") is None
    assert policy.refusal_for_url("http://10.1.2.3/x") is None
    assert policy.refusal_for_url("http://10.2.0.1/x") is not None
    assert policy.refusal_for_url("http://[::1]/x") is not None


LEGACY = [
    ("0x7f000001", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),
    ("012.0.0.1", "10.0.0.1"),
    ("0", "0.0.0.0"),
    ("0x08080808", "8.8.8.8"),
]


@pytest.mark.parametrize(("host", "address"), LEGACY)
def test_legacy_ipv4_hosts_are_the_addresses_they_connect_to(host: str, address: str) -> None:
    assert host_address(host) == ipaddress.ip_address(address)
    assert host_address(host) == ipaddress.IPv4Address(socket.inet_aton(host))
    refused = EgressPolicy().refusal_for_url(f"http://{host}/ref.png") is not None
    assert refused == (why_not_global(ipaddress.ip_address(address)) is not None)


@pytest.mark.parametrize(
    "host", ["example.com", "1.2.3.4.5", "08.1.2.3", "0x", "1..2", "256.1.1.1", "1.2.3.0x100"]
)
def test_names_are_not_addresses(host: str) -> None:
    assert host_address(host) is None


@given(
    value=st.integers(0, 2**32 - 1),
    parts=st.integers(1, 4),
    bases=st.lists(st.sampled_from([8, 10, 16]), min_size=4, max_size=4),
)
def test_every_inet_aton_form_reads_as_inet_aton_reads_it(
    value: int, parts: int, bases: list[int]
) -> None:
    packed = value.to_bytes(4, "big")
    numbers = [*packed[: parts - 1], int.from_bytes(packed[parts - 1 :], "big")]
    written: dict[int, Callable[[int], str]] = {8: lambda n: f"0{n:o}", 10: str, 16: hex}
    host = ".".join(written[base](n) for base, n in zip(bases, numbers, strict=False))
    assert host_address(host) == ipaddress.IPv4Address(value)
    assert host_address(host) == ipaddress.IPv4Address(socket.inet_aton(host))


def test_a_url_that_does_not_parse_is_refused() -> None:
    assert EgressPolicy().refusal_for_url("http://[::1/x") is not None


def test_resolved_answers_are_judged_by_the_policy() -> None:
    policy = EgressPolicy(["10.1.0.0/16", "provider.internal"])
    assert policy.refusal_for_answer("hooks.example.com", "93.184.216.34") is None
    assert policy.refusal_for_answer("rebind.example", "169.254.169.254") is not None
    assert policy.refusal_for_answer("rebind.example", "10.1.0.9") is None
    assert policy.refusal_for_answer("Provider.Internal.", "127.0.0.1") is None
    assert policy.refusal_for_host("provider.internal") is None
