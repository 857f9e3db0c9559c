"""The scrape-time collectors: what the hot path counts in plain numbers reads as Prometheus."""

from __future__ import annotations

from bisect import bisect_left

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from gateway.metrics import LATENCY_BUCKETS, Metrics, TaskFigures


def scrape(metrics: Metrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_final_states_latency_buckets_and_spend() -> None:
    metrics = Metrics()
    metrics.tasks.ended("done", 0.004)
    metrics.tasks.ended("done", 0.3)
    metrics.tasks.ended("failed", 1.0)  # on a bound: counted in that bucket (le is inclusive)
    metrics.tasks.ended("expired", 1_000.0)  # past every bound: +Inf only
    metrics.tasks.spent("alpha", 0.195)
    metrics.tasks.spent("alpha", 0.195)
    metrics.tasks.spent("beta", 0.01)
    figures = scrape(metrics)
    assert figures['tenebra_tasks_total{state="done"}'] == 2
    assert figures['tenebra_tasks_total{state="failed"}'] == 1
    assert figures['tenebra_tasks_total{state="expired"}'] == 1
    assert figures['tenebra_task_latency_seconds_bucket{le="0.005"}'] == 1
    assert figures['tenebra_task_latency_seconds_bucket{le="0.25"}'] == 1
    assert figures['tenebra_task_latency_seconds_bucket{le="0.5"}'] == 2
    assert figures['tenebra_task_latency_seconds_bucket{le="1.0"}'] == 3
    assert figures['tenebra_task_latency_seconds_bucket{le="300.0"}'] == 3
    assert figures['tenebra_task_latency_seconds_bucket{le="+Inf"}'] == 4
    assert figures["tenebra_task_latency_seconds_count"] == 4
    assert abs(figures["tenebra_task_latency_seconds_sum"] - 1001.304) < 1e-9
    assert abs(figures['tenebra_cost_usd_total{tenant="alpha"}'] - 0.39) < 1e-9
    assert figures['tenebra_cost_usd_total{tenant="beta"}'] == 0.01


def test_an_idle_gateway_reads_as_zeros() -> None:
    figures = scrape(Metrics())
    assert figures['tenebra_tasks_total{state="done"}'] == 0
    assert figures["tenebra_task_latency_seconds_count"] == 0
    assert not any(name.startswith("tenebra_cost_usd_total") for name in figures)


@given(st.floats(min_value=0.0, max_value=1_000.0) | st.sampled_from(LATENCY_BUCKETS))
def test_a_latency_lands_in_the_bucket_bisect_finds(latency: float) -> None:
    figures = TaskFigures()
    figures.ended("done", latency)
    assert figures._buckets.index(1) == bisect_left(LATENCY_BUCKETS, latency)
