"""Prometheus metrics, one registry per application (tests run several side by side).

Counted per frame or per task, a prometheus-client counter costs a lock and a few microseconds:
measured at 14% of the gateway's CPU under saturation, then 10% for the per-task counters and
the latency histogram. So the hot path counts in plain numbers that collectors read at scrape
time (frames, final states, latency buckets, spend), and the in-flight gauge is computed from
the store at scrape time. The event loop is one thread: plain numbers need no lock.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["FrameCounts", "Metrics", "TaskFigures"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FINAL_STATES = ("done", "failed", "expired")


class FrameCounts(Collector):
    """WebSocket frames per side and direction, as plain integers."""

    def __init__(self) -> None:
        self.client_in = 0
        self.client_out = 0
        self.provider_in = 0
        self.provider_out = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "tenebra_frames", "WebSocket frames", labels=["side", "direction"]
        )
        family.add_metric(["client", "in"], self.client_in)
        family.add_metric(["client", "out"], self.client_out)
        family.add_metric(["provider", "in"], self.provider_in)
        family.add_metric(["provider", "out"], self.provider_out)
        yield family


class TaskFigures(Collector):
    """Tasks by final state, their latency from acceptance to end, and spend per tenant."""

    def __init__(self) -> None:
        self.final = dict.fromkeys(FINAL_STATES, 0)
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self._bounds: list[float] = [float(b) for b in LATENCY_BUCKETS]
        self._latency_sum = 0.0
        self.spend: dict[str, float] = {}

    def ended(self, state: str, latency: float) -> None:
        """``state`` may be a TaskState: a str enum hashes and compares as its value."""
        self.final[state] += 1
        # the first bound not below it (le is inclusive), as bisect_left finds it. Compiled, a
        # walk over a list[float] compares C doubles: 28 ns against bisect_left's 200 (which
        # compares objects) for a latency of 30 ms
        bounds, index, last = self._bounds, 0, len(self._bounds)
        while index < last and latency > bounds[index]:
            index += 1
        self._buckets[index] += 1
        self._latency_sum += latency

    def spent(self, tenant: str, cost: float) -> None:
        self.spend[tenant] = self.spend.get(tenant, 0.0) + cost

    def collect(self) -> Iterator[Metric]:
        tasks = CounterMetricFamily("tenebra_tasks", "Tasks by final state", labels=["state"])
        for state, count in self.final.items():
            tasks.add_metric([state], count)
        yield tasks
        cumulative, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, math.inf), self._buckets, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
        yield HistogramMetricFamily(
            "tenebra_task_latency_seconds",
            "From acceptance to final state",
            buckets=cumulative,
            sum_value=self._latency_sum,
        )
        cost = CounterMetricFamily("tenebra_cost_usd", "Provider cost by tenant", labels=["tenant"])
        for tenant, spend in self.spend.items():
            cost.add_metric([tenant], spend)
        yield cost


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.client_connections = Gauge(
            "tenebra_client_connections", "Open client WebSocket connections", registry=r
        )
        self.tasks_in_flight = Gauge(
            "tenebra_tasks_in_flight", "Tasks accepted and not yet final", registry=r
        )
        self.task_records = Gauge(
            "tenebra_task_records", "Task records held: open, or finished within retention",
            registry=r,
        )  # fmt: skip
        self.tasks = TaskFigures()
        r.register(self.tasks)
        self.frames = FrameCounts()
        r.register(self.frames)
        self.upstream_ready = Gauge(
            "tenebra_upstream_ready", "1 while a provider link is authenticated", ["link"],
            registry=r,
        )  # fmt: skip
        self.upstream_reconnects = Counter(
            "tenebra_upstream_reconnects", "Provider link reconnections", ["link"], registry=r
        )
        self.upstream_failures = Counter(
            "tenebra_upstream_failures",
            "Provider link connections that ended in failure, by kind (network, protocol, "
            "refused, bug)",
            ["link", "kind"],
            registry=r,
        )
        self.provider_frames_dropped = Counter(
            "tenebra_provider_items_dropped",
            "Provider frames or items that did not decode or did not fit their task: dropped",
            ["reason"],
            registry=r,
        )
        self.errors = Counter("tenebra_errors", "Error items sent, by code", ["code"], registry=r)
        self.stray_items = Counter(
            "tenebra_stray_items", "Provider items for no open task", registry=r
        )
        self.deliveries = Counter(
            "tenebra_deliveries", "Webhooks and uploads by outcome", ["kind", "outcome"], registry=r
        )
        self.delivery_not_durable = Counter(
            "tenebra_delivery_not_durable",
            "Webhooks and uploads that started while Redis was unavailable: run in memory only, "
            "lost if this replica dies before they end",
            registry=r,
        )
        self.slow_clients = Counter(
            "tenebra_slow_client_disconnects", "Clients cut at the send-buffer bound", registry=r
        )
        self.client_sessions_evicted = Counter(
            "tenebra_client_sessions_evicted",
            "Detached client sessions evicted, oldest first, at server.max_sessions, "
            "server.max_sessions_per_tenant or server.sessions_buffer_bytes",
            registry=r,
        )
        self.store_writes_dropped = Counter(
            "tenebra_store_writes_dropped",
            "Finished task records not written to the shared store: more than "
            "tasks.max_retained waited while Redis was unavailable",
            registry=r,
        )
