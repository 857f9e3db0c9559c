"""The harness's issue-13 scenarios: the load spread over several gateways, the ratios of the
Redis store against the memory store and of two replicas against one, the redis-server it
starts."""

from __future__ import annotations

import argparse
import shutil

import pytest

from bench import report
from bench.harness import Servers, answers_ping, load_command, redis_server, servers
from bench.load import url_of


def run(path: str, cpu: float, redis_cpu: float, tasks_per_s: int, p99: float) -> dict[str, object]:
    return {
        "scenario": "store", "path": path, "results": 1, "rate": 0.0, "tasks_per_s": tasks_per_s,
        "frames_per_s": tasks_per_s, "p50_ms": p99 / 2, "p99_ms": p99, "p999_ms": p99,
        "cpu_ms_per_1000": cpu, "gateway_cpu_ms_per_1000": cpu - redis_cpu,
        "redis_cpu_ms_per_1000": redis_cpu, "rss_mib": 90.0, "errors": 0,
    }  # fmt: skip


def test_connections_take_the_urls_in_turn() -> None:
    args = argparse.Namespace(url=["ws://a/v1", "ws://b/v1"])
    assert [url_of(args, i) for i in range(5)] == [
        "ws://a/v1", "ws://b/v1", "ws://a/v1", "ws://b/v1", "ws://a/v1"
    ]  # fmt: skip
    assert url_of(argparse.Namespace(url=["ws://only/v1"]), 7) == "ws://only/v1"


def test_the_load_command_names_every_gateway() -> None:
    at = Servers(
        "ws://127.0.0.1:1/v1", "dk", None, None, ("dk",),  # type: ignore[arg-type]
        urls=("ws://127.0.0.1:1/v1", "ws://127.0.0.1:2/v1"),
    )  # fmt: skip
    argv = load_command(at, "--tasks", "1")
    assert argv[argv.index("bench.load") + 1 :] == [
        "--url", "ws://127.0.0.1:1/v1", "--url", "ws://127.0.0.1:2/v1",
        "--key", "dk", "--tasks", "1",
    ]  # fmt: skip


def test_redis_against_memory_with_the_targets() -> None:
    memory = run(report.MEMORY, 30.0, 0.0, 10_000, 100.0)
    redis = run(report.REDIS, 42.0, 6.0, 8_000, 150.0)
    [line] = report.store_lines([memory, redis])
    assert "on the Redis store = 1.40x the memory store's (target 1.5x: met;" in line
    assert "42.0 vs 30.0 CPU ms per 1000 tasks, Redis's 6.0)" in line
    assert "throughput = 0.80x (target 0.7x: met; 8,000 vs 10,000 tasks/s)" in line
    assert line.endswith("p99 150.0 vs 100.0 ms")
    slow = {**redis, "cpu_ms_per_1000": 60.0, "tasks_per_s": 5_000}
    [line] = report.store_lines([memory, slow])
    assert "2.00x the memory store's (target 1.5x: missed;" in line
    assert "throughput = 0.50x (target 0.7x: missed;" in line
    idle = {**memory, "cpu_ms_per_1000": 0.0}  # a smoke run shorter than a clock tick
    [line] = report.store_lines([idle, redis])
    assert "= n/a (too few CPU ticks) the memory store's (target 1.5x;" in line
    assert report.store_lines([memory]) == []


def test_two_replicas_against_one() -> None:
    one = run(report.ONE, 40.0, 6.0, 8_000, 200.0)
    two = {**run(report.TWO, 44.0, 6.0, 12_000, 150.0), "rss_mib": 180.0}
    [line] = report.replica_lines([one, two])
    assert "throughput with two gateways = 1.50x one's (12,000 vs 8,000 tasks/s)" in line
    assert "p99 0.75x (150.0 vs 200.0 ms)" in line
    assert line.endswith(
        "CPU per task (gateways + Redis) 1.10x (44.0 vs 40.0 CPU ms per 1000 tasks)"
    )
    assert report.replica_lines([two]) == []
    rows = report.store_table([one, two]).splitlines()
    assert len(rows) == 4
    assert "| 38.0 | 6.0 | 44.0 | 180.0 | 0 |" in rows[3]


def test_several_gateways_need_a_store() -> None:
    with pytest.raises(ValueError, match="store"), servers("tenebra", gateways=2):
        pass


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
def test_the_redis_server_answers_and_is_gone_afterwards() -> None:
    with redis_server() as (process, url):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert url == f"redis://127.0.0.1:{port}/0" and answers_ping(port)
    assert process.poll() is not None and not answers_ping(port)
