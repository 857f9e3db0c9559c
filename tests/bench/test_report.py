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


def test_a_run_shorter_than_a_clock_tick_has_no_cpu_ratio() -> None:
    idle_relay = [run("relay", 0.0, 6000, 400.0), run("tenebra", 10.0, 5000, 450.0)]
    [line, *_] = report.ratios(idle_relay)
    assert "tenebra CPU per task = n/a (too few CPU ticks) the bare relay's" in line


def test_the_table_has_a_row_per_run_and_no_cpu_for_direct() -> None:
    rows = report.table(RUNS).splitlines()[2:]
    assert len(rows) == len(RUNS)
    assert "| - |" in rows[0] and "| 75.0 |" in rows[2]


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    target = tmp_path / "bench.png"
    report.plot(RUNS, target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ceiling = [{**r, "gateway_cpu_ms_per_1000": r["cpu_ms_per_1000"] / 5} for r in RUNS]
    ceiling.append({**ceiling[2], "path": report.TWO_LINKS})
    report.plot(ceiling, target, report.CEILING_PATHS, "gateway_cpu_ms_per_1000")
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


def test_admission_is_limits_over_none_and_has_its_own_table() -> None:
    none = {**run("tenebra", 60.0, 8000, 200.0), "scenario": "admission", "tenants": 0,
            "path": report.NO_LIMITS}  # fmt: skip
    limits = {**none, "path": report.LIMITS, "tenants": 10, "cpu_ms_per_1000": 63.0,
              "tasks_per_s": 7600, "p99_ms": 210.0}  # fmt: skip
    [line] = report.admission_lines([none, limits])
    assert "CPU per task with 10 tenants' limits = 1.05x without (target 1.1x; 63.0 vs 60.0" in line
    assert "throughput = 0.95x; p99 210.0 vs 200.0 ms" in line
    assert report.admission_lines([none]) == []  # one of the two missing: no ratio
    idle = {**none, "cpu_ms_per_1000": 0.0}  # a smoke run shorter than a clock tick
    [line] = report.admission_lines([idle, limits])
    assert "limits = n/a (too few CPU ticks) without (target 1.1x; 63.0 vs 0.0" in line
    rows = report.table([none, limits]).splitlines()[2:]
    assert "| 60.0 |" in rows[0] and report.LIMITS in rows[1]


def test_the_tenants_config_loads_with_every_limit_set_and_a_key_each(tmp_path: Path) -> None:
    from bench.harness import tenants_toml
    from gateway.config import load_config
    from gateway.tenants import TenantTable

    text, keys = tenants_toml(10)
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    config = load_config(path, env={})
    assert len(config.tenants) == 10 and len(set(keys)) == 10
    table = TenantTable.from_config(config)
    assert [table.tenant_of(k) for k in keys] == [f"bench{i}" for i in range(10)]
    tenant = config.tenants["bench3"]
    assert tenant.max_number_results == 20 and tenant.rate and tenant.budget_per_day
    assert tenant.max_in_flight and tenant.max_queued and tenant.max_connections


def test_the_load_generator_takes_keys_in_turn() -> None:
    import argparse

    from bench.harness import Servers, load_command
    from bench.load import key_of

    args = argparse.Namespace(key=["a", "b", "c"])
    assert [key_of(args, i) for i in range(5)] == ["a", "b", "c", "a", "b"]
    at = Servers("ws://127.0.0.1:1/v1", "a", None, None, ("a", "b"))  # type: ignore[arg-type]
    argv = load_command(at, "--tasks", "1")
    assert argv[argv.index("--url") + 2 :] == ["--key", "a", "--key", "b", "--tasks", "1"]
