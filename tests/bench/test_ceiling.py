"""Issue 14's harness parts that need no servers: where processes are pinned, the medians of a
path's turns, the ceiling's table and target lines, and the load generator's tasks."""

from __future__ import annotations

import json
from typing import Any

from bench import report
from bench.harness import FULL, SMOKE, Pinning, pinning, pinning_line


def test_two_cores_or_more_put_the_process_under_test_alone_on_the_first() -> None:
    assert pinning({0, 1}) == Pinning(frozenset({0}), frozenset({1}))
    assert pinning({3, 5, 7}) == Pinning(frozenset({3}), frozenset({5}))
    assert pinning({2}) is None and pinning(set()) is None


def test_the_pinning_line_says_where_or_that_nothing_was_pinned() -> None:
    line = pinning_line(pinning({0, 1}), 2)
    assert "alone on cpu 0" in line and "load generator and provider on cpu 1" in line
    assert pinning_line(None, 1).startswith("pinning: none (1 CPU available")


def test_every_ceiling_scenario_is_in_the_smoke_too() -> None:
    def shape(plan: Any) -> list[tuple[int, float]]:
        return [(s.results, s.rate) for s in plan.ceiling]

    assert shape(SMOKE) == shape(FULL)
    assert all(s.name.startswith("ceiling: ") for s in FULL.ceiling + SMOKE.ceiling)
    assert {s.rate for s in FULL.ceiling} == {0.0, 2_000, 10_000, 20_000}


def run(
    scenario: str, path: str, tasks_per_s: int, cpu: float, p99: float, *, rate: float = 0.0,
    results: int = 1, core: int = 99, side: int = 60,
) -> dict[str, Any]:  # fmt: skip
    return {
        "scenario": scenario, "path": path, "results": results, "rate": rate,
        "tasks_per_s": tasks_per_s, "frames_per_s": tasks_per_s, "results_per_s": tasks_per_s,
        "p50_ms": p99 / 4, "p99_ms": p99, "p999_ms": p99 * 2, "cpu_ms_per_1000": cpu,
        "gateway_cpu_ms_per_1000": cpu, "provider_cpu_ms_per_1000": 5.0, "rss_mib": 50.0,
        "elapsed": 2.0, "core_pct": core, "load_side_pct": side, "errors": 0, "tasks": 1000,
    }  # fmt: skip


SAT1, SAT4, AT10K = "sat R=1", "sat R=4", "10,000 tasks/s"
RUNS = [
    run(SAT1, "direct", 100_000, 5.0, 10.0),
    run(SAT1, "relay", 40_000, 20.0, 30.0, core=80, side=99),
    run(SAT1, "tenebra", 36_000, 23.0, 40.0),
    run(SAT1, report.TWO_LINKS, 30_000, 30.0, 45.0),
    run(SAT4, "relay", 20_000, 40.0, 50.0, results=4),
    run(SAT4, "tenebra", 15_000, 50.0, 60.0, results=4, core=70, side=40),
    run(AT10K, "direct", 10_000, 10.0, 1.0, rate=10_000),
    run(AT10K, "relay", 10_000, 15.0, 2.5, rate=10_000),
    run(AT10K, "tenebra", 10_000, 30.0, 4.0, rate=10_000),
]


def test_targets_are_read_with_met_or_missed() -> None:
    lines = report.ceiling_lines(RUNS, turns=3)
    text = "\n".join(lines)
    assert lines[0] == "ceiling: medians of 3 interleaved turn(s) per path, figure by figure"
    assert (
        "sat R=1: tenebra / relay throughput = 0.90x (target at least 0.85x: met); "
        "CPU per task = 1.15x (target at most 1.2x: met)"
    ) in text
    assert (
        "sat R=1: tenebra, 2 links / relay throughput = 0.75x (target at least 0.85x: missed)"
        in text
    )
    assert "sat R=4: tenebra / relay throughput = 0.75x" in text
    assert "CPU per task = 1.25x (target at most 1.2x: missed)" in text
    assert (
        "10,000 tasks/s: tenebra adds +3.00 ms p99 over direct (target at most +2.0 ms: missed); "
        "the relay +1.50 ms"
    ) in text
    assert (
        "R=4 / R=1 = 2.17x (target at most 2.0x: missed) (50.0 vs 23.0 µs; the relay's own 2.00x)"
    ) in text


def test_a_path_that_did_not_fill_its_core_is_said_to_be_a_lower_bound() -> None:
    text = "\n".join(report.ceiling_lines(RUNS))
    assert "sat R=1: relay kept its core 80% busy, the load side 99% (the load side's core" in text
    assert "sat R=4: tenebra kept its core 70% busy, the load side 40% (not the load side" in text
    assert "sat R=1: tenebra kept" not in text


def test_no_cpu_ticks_no_ratio() -> None:
    idle = [run(SAT1, "relay", 100, 0.0, 1.0), run(SAT1, "tenebra", 100, 10.0, 1.0)]
    [_, line] = report.ceiling_lines(idle)
    assert "CPU per task = n/a, too few CPU ticks (target at most 1.2x)" in line


def test_the_table_shows_latency_added_over_direct_in_the_same_run() -> None:
    rows = report.ceiling_table(RUNS).splitlines()[2:]
    assert len(rows) == len(RUNS)
    assert "| - / - / - | (echo) 5.0 | 99 / 60 |" in rows[0]
    assert "| +7.50 / +30.00 / +60.00 | 23.0 |" in rows[2]
    assert "| +0.75 / +3.00 / +6.00 | 30.0 |" in rows[-1]
    assert "| +" not in rows[4]  # no direct run for R=4 here: nothing to add over


def test_medians_are_taken_figure_by_figure_and_errors_are_not_hidden() -> None:
    turns = [
        {**run(SAT1, "relay", 10, 30.0, 5.0), "errors": 0, "tasks": 100},
        {**run(SAT1, "relay", 30, 10.0, 1.0), "errors": 2, "tasks": 98},
        {**run(SAT1, "relay", 20, 20.0, 9.0), "errors": 0, "tasks": 100},
    ]
    line = report.median_figures(turns)
    assert (line["tasks_per_s"], line["cpu_ms_per_1000"], line["p99_ms"]) == (20, 20.0, 5.0)
    assert (line["errors"], line["tasks"], line["turns"]) == (2, 98, 3)


def test_load_generator_tasks_are_valid_and_new_every_time() -> None:
    from bench.load import task
    from protocol.codec import decode_tasks
    from protocol.frames import ImageInference

    (first, body), (second, _) = task(4), task(4)
    assert first != second
    [decoded] = decode_tasks(body)  # what tenebra validates: a v4 UUID among the rest
    assert isinstance(decoded, ImageInference)
    assert decoded.taskUUID == first and decoded.numberResults == 4
    assert json.loads(body)[0]["taskType"] == "imageInference"


def test_latency_added_is_the_median_of_each_turns_difference() -> None:
    """A noisy direct turn moves one difference, not the figure: with direct's p99 of
    4, 0.5, 4 ms and tenebra's 4, 3, 5 ms, the differences are 0, 2.5, 1 (median 1), where the
    difference of the medians would say 0."""
    directs = [run(AT10K, "direct", 10_000, 10.0, p99, rate=10_000) for p99 in (4.0, 0.5, 4.0)]
    turns = [run(AT10K, "tenebra", 10_000, 30.0, p99, rate=10_000) for p99 in (4.0, 3.0, 5.0)]
    for turn, direct in zip(turns, directs, strict=True):
        report.add_latency_over(turn, direct)
    line = report.median_figures(turns)
    assert line["added_p99_ms"] == 1.0 and line["p99_ms"] == 4.0
    direct_line = report.median_figures(directs)
    assert "added_p99_ms" not in direct_line
    [_, note] = report.ceiling_lines([direct_line, line])
    assert "tenebra adds +1.00 ms p99 over direct (target at most +2.0 ms: met)" in note
    rows = report.ceiling_table([direct_line, line]).splitlines()[2:]
    assert "| +0.25 / +1.00 / +2.00 |" in rows[1]
