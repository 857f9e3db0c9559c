"""Prometheus metrics, one registry per application (tests run several side by side)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


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
        self.tasks = Counter("tenebra_tasks", "Tasks by final state", ["state"], registry=r)
        self.task_latency = Histogram(
            "tenebra_task_latency_seconds",
            "From acceptance to final state",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.frames = Counter(
            "tenebra_frames", "WebSocket frames", ["side", "direction"], registry=r
        )
        self.client_frames_in = self.frames.labels("client", "in")
        self.client_frames_out = self.frames.labels("client", "out")
        self.upstream_frames_in = self.frames.labels("provider", "in")
        self.upstream_frames_out = self.frames.labels("provider", "out")
        self.upstream_ready = Gauge(
            "tenebra_upstream_ready", "1 while a provider link is authenticated", ["link"],
            registry=r,
        )  # fmt: skip
        self.upstream_reconnects = Counter(
            "tenebra_upstream_reconnects", "Provider link reconnections", ["link"], registry=r
        )
        self.errors = Counter("tenebra_errors", "Error items sent, by code", ["code"], registry=r)
        self.cost = Counter("tenebra_cost_usd", "Provider cost by tenant", ["tenant"], registry=r)
        self.stray_items = Counter(
            "tenebra_stray_items", "Provider items for no open task", registry=r
        )
        self.deliveries = Counter(
            "tenebra_deliveries", "Webhooks and uploads by outcome", ["kind", "outcome"], registry=r
        )
        self.slow_clients = Counter(
            "tenebra_slow_client_disconnects", "Clients cut at the send-buffer bound", registry=r
        )
