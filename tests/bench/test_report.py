"""The benchmark report: the ratios people read and the plot, from the harness's figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import report


def run(path: str, cpu: float, tasks_per_s: int, p99: float, results: int = 1) -> dict[str, Any]:
    return {
        "scenario": f"saturation R={results}", "path": path, "results": results, "rate": 0.0,
        "tasks_per_s": tasks_per_s, "frames_per_s": tasks_per_s * results, "p50_ms": p99 / 2,
        "p99_ms": p99, "p999_ms": p99, "cpu_ms_per_1000": cpu, "rss_mib": 50.0, "errors": 0,
    }  # fmt: skip


RUNS = [
    run("direct", 0.0, 6000, 300.0),
    run("relay", 60.0, 6000, 400.0),
    run("tenebra", 75.0, 5000, 450.0),
    run("relay", 120.0, 3000, 600.0, results=4),
    run("tenebra", 150.0, 2500, 700.0, results=4),
]


def test_ratios_are_tenebra_over_the_relay_and_r4_over_r1() -> None:
    notes = report.ratios(RUNS)
    assert any("saturation R=1: tenebra CPU per task = 1.25x" in n for n in notes)
    assert any("throughput = 0.83x" in n for n in notes)
    assert any("p99 through tenebra +150.00 ms vs direct" in n for n in notes)
    assert any(n.startswith("R=4 costs 2.00x the CPU of R=1") for n in notes)


def test_the_table_has_a_row_per_run_and_no_cpu_for_direct() -> None:
    rows = report.table(RUNS).splitlines()[2:]
    assert len(rows) == len(RUNS)
    assert "| - |" in rows[0] and "| 75.0 |" in rows[2]


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    target = tmp_path / "bench.png"
    report.plot(RUNS, target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_and_stall_lines() -> None:
    idle = [{"connections": 2000, "kib_per_connection": 14.5, "rss_before_mib": 60.0,
             "rss_held_mib": 88.3, "elapsed": 3.2}]  # fmt: skip
    soak = {"tasks": 300_000, "errors": 0, "tasks_per_s": 5000, "rss_warm_mib": 100.0,
            "rss_after_mib": 102.0, "rss_growth_pct": 2.0, "in_flight": 0.0, "records": 0.0,
            "retention_s": 2.0}  # fmt: skip
    lines = report.memory_lines(idle, soak)
    assert "14.5 KiB of gateway RSS each" in lines[0]
    assert "(+2.0%, target within 5%;" in lines[1]
    stall = {"connections": 50, "rate": 1000, "stalled_clients": 1, "cut": 1.0, "stalled_rate": 500,
             "baseline": {"p99_ms": 10.0}, "stalled": {"p99_ms": 11.0}}  # fmt: skip
    [line] = report.stall_lines(stall)
    assert "p99 10.0 ms while it reads, 11.0 ms while it never reads (1.10x, target 1.2x)" in line
    assert line.endswith("slow clients cut: 1")


def test_profile_samples_sum_per_function(tmp_path: Path) -> None:
    from bench.profile import summarise

    raw = tmp_path / "samples.txt"
    raw.write_text(
        "run (loop.py:10);route (up.py:5);send (clients.py:9) 6\n"
        "run (loop.py:10);route (up.py:7) 3\n"
        "run (loop.py:12) 1\n"
    )
    text = summarise(raw, top=5)
    assert text.startswith("10 samples")
    own, inclusive = text.split("inclusive:")
    assert " 60.0%  send (clients.py" in own and " 30.0%  route (up.py" in own
    assert "100.0%  run (loop.py" in inclusive and " 90.0%  route (up.py" in inclusive
