"""The harness's report: a Markdown table, the ratios people read, and a PNG plot."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

PATHS = ("direct", "relay", "tenebra")
# the admission scenario's two runs, both through tenebra
NO_LIMITS = "tenebra, demo tenant, no limits"
LIMITS = "tenebra, 10 tenants with limits"
# issue 13: the store scenario's two runs, then the replicas scenario's
MEMORY = "tenebra, memory store"
REDIS = "tenebra, Redis store"
ONE = "1 gateway, Redis store"
TWO = "2 gateways, one Redis store"
# issue 14: the ceiling's paths, against the echo provider; tenebra's targets are read on its
# default, one provider link
TWO_LINKS = "tenebra, 2 links"
CEILING_PATHS = ("direct", "relay", "tenebra", TWO_LINKS)
# the targets
CEILING_THROUGHPUT = 0.85  # tenebra / relay, at least
CEILING_CPU = 1.2  # tenebra / relay CPU per task, at most
CEILING_P99_ADDED_MS = 2.0  # over direct at 10,000 tasks/s offered, at most
CEILING_P99_RATE = 10_000.0
CEILING_R4 = 2.0  # R=4 / R=1 CPU per task, at most
# what a ceiling run's medians are taken of, figure by figure
MEDIAN_FIGURES = (
    "tasks_per_s", "frames_per_s", "results_per_s", "p50_ms", "p99_ms", "p999_ms",
    "cpu_ms_per_1000", "gateway_cpu_ms_per_1000", "provider_cpu_ms_per_1000", "rss_mib",
    "elapsed", "core_pct", "load_side_pct", "added_p50_ms", "added_p99_ms", "added_p999_ms",
)  # fmt: skip
LATENCIES = ("p50_ms", "p99_ms", "p999_ms")
# below this share of its core at saturation, a path was held back by the load side
CEILING_BUSY_PCT = 90


def times(cpu: float, of: float) -> str:
    """``cpu`` over ``of`` as "1.25x"; a small (smoke) run may take less CPU than one clock tick
    (10 ms) to a process, and there is no ratio then."""
    return f"{cpu / of:.2f}x" if of else "n/a (too few CPU ticks)"


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | path | tasks/s | frames/s | p50 ms | p99 ms | p99.9 ms | "
        "CPU ms / 1000 tasks | RSS MiB | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        cpu = "-" if run["path"] == "direct" else run["cpu_ms_per_1000"]
        lines.append(
            f"| {run['scenario']} | {run['path']} | {run['tasks_per_s']:,} | "
            f"{run['frames_per_s']:,} | {run['p50_ms']} | {run['p99_ms']} | {run['p999_ms']} | "
            f"{cpu} | {run['rss_mib']} | {run['errors']} |"
        )
    return "\n".join(lines)


def ratios(runs: list[dict[str, Any]]) -> list[str]:
    by = {(r["scenario"], r["path"]): r for r in runs}
    notes = []
    for s in dict.fromkeys(r["scenario"] for r in runs):
        relay, gateway, direct = by.get((s, "relay")), by.get((s, "tenebra")), by.get((s, "direct"))
        if relay and gateway:
            cpu = times(gateway["cpu_ms_per_1000"], relay["cpu_ms_per_1000"])
            throughput = gateway["tasks_per_s"] / relay["tasks_per_s"]
            notes.append(
                f"{s}: tenebra CPU per task = {cpu} the bare relay's (target 1.25x); "
                f"throughput = {throughput:.2f}x (target 0.8x)"
            )
        if direct and gateway:
            notes.append(
                f"{s}: p99 through tenebra {gateway['p99_ms'] - direct['p99_ms']:+.2f} ms vs "
                f"direct; tenebra offered/achieved {gateway['tasks_per_s']:,} tasks/s, direct "
                f"{direct['tasks_per_s']:,}"
            )
    one = [r for r in runs if r["path"] == "tenebra" and r["results"] == 1 and not r["rate"]]
    four = [r for r in runs if r["path"] == "tenebra" and r["results"] == 4 and not r["rate"]]
    if one and four:
        notes.append(
            f"R=4 costs {times(four[0]['cpu_ms_per_1000'], one[0]['cpu_ms_per_1000'])} the CPU "
            "of R=1 per task (target 2x)"
        )
    return notes


def admission_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The cost of admission: CPU per task with ten tenants' limits over none (issue 12)."""
    by = {r["path"]: r for r in runs}
    none, limits = by.get(NO_LIMITS), by.get(LIMITS)
    if not (none and limits):
        return []
    cpu = times(limits["cpu_ms_per_1000"], none["cpu_ms_per_1000"])
    throughput = limits["tasks_per_s"] / none["tasks_per_s"]
    return [
        f"{limits['scenario']}: CPU per task with {limits['tenants']} tenants' limits = "
        f"{cpu} without (target 1.1x; {limits['cpu_ms_per_1000']} vs "
        f"{none['cpu_ms_per_1000']} CPU ms per 1000 tasks); throughput = {throughput:.2f}x; "
        f"p99 {limits['p99_ms']} vs {none['p99_ms']} ms"
    ]


def store_table(runs: list[dict[str, Any]]) -> str:
    """Tenebra's runs with CPU per task split: the gateways' (all of them) and Redis's."""
    lines = [
        "| scenario | path | tasks/s | p50 ms | p99 ms | p99.9 ms | CPU µs per task: gateways "
        "| Redis | total | RSS MiB (gateways) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['scenario']} | {run['path']} | {run['tasks_per_s']:,} | {run['p50_ms']} | "
            f"{run['p99_ms']} | {run['p999_ms']} | {run['gateway_cpu_ms_per_1000']} | "
            f"{run['redis_cpu_ms_per_1000']} | {run['cpu_ms_per_1000']} | {run['rss_mib']} | "
            f"{run['errors']} |"
        )
    return "\n".join(lines)


def verdict(value: float, target: float, at_most: bool) -> str:
    """ "met" or "missed": ``value`` against ``target``, an upper bound if ``at_most``."""
    return "met" if (value <= target if at_most else value >= target) else "missed"


def store_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The Redis store against the memory store (issue 13): CPU per task, gateway plus Redis,
    at most 1.5x; throughput at least 0.7x."""
    by = {r["path"]: r for r in runs}
    memory, redis = by.get(MEMORY), by.get(REDIS)
    if not (memory and redis):
        return []
    throughput = redis["tasks_per_s"] / memory["tasks_per_s"]
    if memory["cpu_ms_per_1000"]:
        cpu_ratio = redis["cpu_ms_per_1000"] / memory["cpu_ms_per_1000"]
        cpu = f"{cpu_ratio:.2f}x the memory store's (target 1.5x: {verdict(cpu_ratio, 1.5, True)}"
    else:
        cpu = f"{times(redis['cpu_ms_per_1000'], 0.0)} the memory store's (target 1.5x"
    return [
        f"{redis['scenario']}: CPU per task (gateway + Redis) on the Redis store = {cpu}; "
        f"{redis['cpu_ms_per_1000']} vs {memory['cpu_ms_per_1000']} CPU ms per 1000 tasks, "
        f"Redis's {redis['redis_cpu_ms_per_1000']}); throughput = {throughput:.2f}x (target "
        f"0.7x: {verdict(throughput, 0.7, False)}; {redis['tasks_per_s']:,} vs "
        f"{memory['tasks_per_s']:,} tasks/s); p99 {redis['p99_ms']} vs {memory['p99_ms']} ms"
    ]


def replica_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Two gateways on one Redis against one (issue 13): throughput, p99, CPU per task."""
    by = {r["path"]: r for r in runs}
    one, two = by.get(ONE), by.get(TWO)
    if not (one and two):
        return []
    throughput = two["tasks_per_s"] / one["tasks_per_s"]
    p99 = two["p99_ms"] / max(one["p99_ms"], 1e-9)
    cpu = times(two["cpu_ms_per_1000"], one["cpu_ms_per_1000"])
    return [
        f"{two['scenario']}: throughput with two gateways = {throughput:.2f}x one's "
        f"({two['tasks_per_s']:,} vs {one['tasks_per_s']:,} tasks/s); p99 {p99:.2f}x "
        f"({two['p99_ms']} vs {one['p99_ms']} ms); CPU per task (gateways + Redis) {cpu} "
        f"({two['cpu_ms_per_1000']} vs {one['cpu_ms_per_1000']} CPU ms per 1000 tasks)"
    ]


def memory_lines(idle: list[dict[str, Any]], soak: dict[str, Any] | None) -> list[str]:
    lines = [
        f"idle: {r['connections']:,} authenticated connections held, "
        f"{r['kib_per_connection']:.1f} KiB of gateway RSS each (target 20 KiB; "
        f"{r['rss_before_mib']} -> {r['rss_held_mib']} MiB, connected in {r['elapsed']} s)"
        for r in idle
    ]
    if soak:
        lines.append(
            f"soak: {soak['tasks']:,} tasks ({soak['errors']} errors) at "
            f"{soak['tasks_per_s']:,} tasks/s; RSS after warm-up {soak['rss_warm_mib']} MiB, "
            f"after {soak['rss_after_mib']} MiB ({soak['rss_growth_pct']:+.1f}%, target within "
            f"5%; both read once retention, {soak['retention_s']} s, had passed); afterwards "
            f"{soak['in_flight']:.0f} in flight, {soak['records']:.0f} records"
        )
    return lines


def stall_lines(stall: dict[str, Any] | None) -> list[str]:
    if not stall:
        return []
    base, with_stalled = stall["baseline"], stall["stalled"]
    return [
        f"stall: {stall['connections']} clients at {stall['rate']:,} tasks/s beside one "
        f"sending {stall['stalled_rate']:,.0f} tasks/s of 4 images: p99 {base['p99_ms']} ms while "
        f"it reads, {with_stalled['p99_ms']} ms while it never reads "
        f"({with_stalled['p99_ms'] / max(base['p99_ms'], 1e-9):.2f}x, target 1.2x); slow "
        f"clients cut: {stall['cut']:.0f}"
    ]


def add_latency_over(run: dict[str, Any], direct: dict[str, Any]) -> None:
    """The latency ``run`` added over ``direct``, its neighbour in the same turn: medians of
    these differences, not differences of medians (a noisy direct turn then moves one
    difference, not every path's)."""
    for key in LATENCIES:
        run[f"added_{key}"] = round(run[key] - direct[key], 3)


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One line for several turns of a path under a scenario: each of ``MEDIAN_FIGURES`` the
    median of its own over the turns (the middle one of an odd count, the mean of the middle
    two of an even one), errors summed and tasks the fewest (so that neither hides), the rest
    from the first turn."""
    import statistics

    line = dict(runs[0])
    for key in MEDIAN_FIGURES:
        if any(key not in r for r in runs):
            continue  # direct has no latency added over itself
        value = statistics.median(r[key] for r in runs)
        line[key] = round(value, 3) if isinstance(value, float) else value
    line["errors"] = sum(r["errors"] for r in runs)
    line["tasks"] = min(r["tasks"] for r in runs)
    line["turns"] = len(runs)
    return line


def added(run: dict[str, Any], direct: dict[str, Any] | None, key: str) -> float | None:
    """The latency ``key`` that ``run`` added over direct: the median of each turn's
    difference where the harness measured them, else the difference of the two figures."""
    if run["path"] == "direct":
        return None
    if f"added_{key}" in run:
        value: float = run[f"added_{key}"]
        return value
    return run[key] - direct[key] if direct else None


def _added(run: dict[str, Any], direct: dict[str, Any] | None, key: str) -> str:
    value = added(run, direct, key)
    return "-" if value is None else f"{value:+.2f}"


def ceiling_table(runs: list[dict[str, Any]]) -> str:
    """The ceiling's runs: what each path reached, the latency it added over direct in the
    same run, and the CPU of the process under test (the echo provider's when direct)."""
    by = {(r["scenario"], r["path"]): r for r in runs}
    lines = [
        "| scenario | path | tasks/s | results/s | frames/s | p50 / p99 / p99.9 ms | added over "
        "direct p50 / p99 / p99.9 ms | CPU µs per task | core busy %: under test / load side "
        "| RSS MiB | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        direct = by.get((run["scenario"], "direct"))
        added = " / ".join(_added(run, direct, k) for k in ("p50_ms", "p99_ms", "p999_ms"))
        cpu = run["gateway_cpu_ms_per_1000"]
        cpu_text = f"(echo) {cpu}" if run["path"] == "direct" else f"{cpu}"
        lines.append(
            f"| {run['scenario']} | {run['path']} | {run['tasks_per_s']:,} | "
            f"{run['results_per_s']:,} | {run['frames_per_s']:,} | {run['p50_ms']} / "
            f"{run['p99_ms']} / {run['p999_ms']} | {added} | {cpu_text} | "
            f"{run.get('core_pct', '-')} / {run.get('load_side_pct', '-')} | {run['rss_mib']} | "
            f"{run['errors']} |"
        )
    return "\n".join(lines)


def _ratio(value: float, of: float) -> float | None:
    return value / of if of else None


def _against(ratio: float | None, target: float, at_most: bool) -> str:
    """ "1.31x (target at most 1.2x: missed)"; a run too short for a CPU tick has no ratio."""
    bound = "at most" if at_most else "at least"
    if ratio is None:
        return f"n/a, too few CPU ticks (target {bound} {target}x)"
    return f"{ratio:.2f}x (target {bound} {target}x: {verdict(ratio, target, at_most)})"


def _held_back(run: dict[str, Any]) -> bool:
    # no CPU tick at all (a smoke run) says nothing about how busy the core was
    return bool(
        run["path"] != "direct"
        and run["gateway_cpu_ms_per_1000"]
        and run.get("core_pct", 100) < CEILING_BUSY_PCT
    )


def busy_line(run: dict[str, Any]) -> str:
    """Why a path at saturation kept its core under ``CEILING_BUSY_PCT`` % busy: its tasks/s
    are then a lower bound of its ceiling, not the ceiling."""
    side = run["load_side_pct"]
    why = (
        "the load side's core was full"
        if side >= CEILING_BUSY_PCT
        else "not the load side either: waits, or other processes on its core"
    )
    return (
        f"{run['scenario']}: {run['path']} kept its core {run['core_pct']}% busy, the load side "
        f"{side}% ({why}): its tasks/s are a lower bound of its ceiling"
    )


def ceiling_lines(runs: list[dict[str, Any]], turns: int = 1) -> list[str]:
    """Issue 14's targets, each with "met" or "missed", from the medians of one run: at
    saturation, tenebra / relay throughput and CPU per task (and with two provider links, for
    reading), R=4 / R=1 CPU per task; at each fixed rate, the p99 added over direct (the
    target at 10,000 tasks/s)."""
    by = {(r["scenario"], r["path"]): r for r in runs}
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    notes = [f"ceiling: medians of {turns} interleaved turn(s) per path, figure by figure"]
    saturation: dict[int, dict[str, Any]] = {}
    relay_saturation: dict[int, dict[str, Any]] = {}
    for s in scenarios:
        relay, direct = by.get((s, "relay")), by.get((s, "direct"))
        first = next(r for r in runs if r["scenario"] == s)
        for path in ("tenebra", TWO_LINKS):
            gateway = by.get((s, path))
            if gateway is None:
                continue
            if not first["rate"] and relay:
                throughput = gateway["tasks_per_s"] / relay["tasks_per_s"]
                cpu = _ratio(gateway["gateway_cpu_ms_per_1000"], relay["gateway_cpu_ms_per_1000"])
                notes.append(
                    f"{s}: {path} / relay throughput = "
                    f"{_against(throughput, CEILING_THROUGHPUT, False)}; CPU per task = "
                    f"{_against(cpu, CEILING_CPU, True)} ({gateway['tasks_per_s']:,} vs "
                    f"{relay['tasks_per_s']:,} tasks/s, {gateway['gateway_cpu_ms_per_1000']} "
                    f"vs {relay['gateway_cpu_ms_per_1000']} µs per task)"
                )
            over = added(gateway, direct, "p99_ms")
            if first["rate"] and over is not None:
                relay_over = added(relay, direct, "p99_ms") if relay else None
                relay_added = "n/a" if relay_over is None else f"{relay_over:+.2f}"
                target = (
                    f" (target at most +{CEILING_P99_ADDED_MS} ms: "
                    f"{verdict(over, CEILING_P99_ADDED_MS, True)})"
                    if first["rate"] == CEILING_P99_RATE and path == "tenebra"
                    else ""
                )
                notes.append(
                    f"{s}: {path} adds {over:+.2f} ms p99 over direct{target}; the relay "
                    f"{relay_added} ms; {path} at {gateway['tasks_per_s']:,} tasks/s using "
                    f"{gateway['gateway_cpu_ms_per_1000']} CPU µs per task"
                )
        gateway = by.get((s, "tenebra"))
        if gateway and not first["rate"]:
            saturation.setdefault(first["results"], gateway)
        if relay and not first["rate"]:
            relay_saturation.setdefault(first["results"], relay)
        if not first["rate"]:
            notes += [busy_line(r) for r in runs if r["scenario"] == s and _held_back(r)]
    if 1 in saturation and 4 in saturation:
        one, four = saturation[1], saturation[4]
        ratio = _ratio(four["gateway_cpu_ms_per_1000"], one["gateway_cpu_ms_per_1000"])
        relay_own = ""
        if 1 in relay_saturation and 4 in relay_saturation:
            own = _ratio(
                relay_saturation[4]["gateway_cpu_ms_per_1000"],
                relay_saturation[1]["gateway_cpu_ms_per_1000"],
            )
            relay_own = f"; the relay's own {own:.2f}x" if own else ""
        notes.append(
            f"ceiling: tenebra's CPU per task at R=4 / R=1 = {_against(ratio, CEILING_R4, True)} "
            f"({four['gateway_cpu_ms_per_1000']} vs {one['gateway_cpu_ms_per_1000']} µs{relay_own})"
        )
    return notes


def _label(scenario: str) -> str:
    """A scenario's name on a few short lines under its bars (the ceiling group's without its
    prefix, which every one of them has)."""
    return "\n".join(textwrap.wrap(scenario.removeprefix("ceiling: "), 12))


def plot(
    runs: list[dict[str, Any]],
    path: Path,
    paths: tuple[str, ...] = PATHS,
    cpu: str = "cpu_ms_per_1000",
) -> None:
    """CPU per task, throughput and latency per scenario, one bar per path (of ``paths``);
    ``cpu``: the figure of the process under test (the ceiling's: ``gateway_cpu_ms_per_1000``).
    Direct has no CPU bar: its process under test is the provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    by = {(r["scenario"], r["path"]): r for r in runs}
    figure, axes = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    panels = [
        ("CPU µs per task (relay, gateway)", cpu, False),
        ("tasks/s", "tasks_per_s", False),
        ("p99 latency, ms (log)", "p99_ms", True),
    ]
    width = 0.8 / len(paths)
    for axis, (title, key, log) in zip(axes, panels, strict=True):
        for i, name in enumerate(paths):
            values = [
                float(by[(s, name)][key]) if (s, name) in by and not (
                    key == cpu and name == "direct"
                ) else 0.0
                for s in scenarios
            ]  # fmt: skip
            axis.bar([x + i * width for x in range(len(scenarios))], values, width, label=name)
        axis.set_title(title)
        axis.set_xticks([x + width * (len(paths) - 1) / 2 for x in range(len(scenarios))])
        axis.set_xticklabels([_label(s) for s in scenarios], fontsize=8)
        if log:
            axis.set_yscale("log")
        axis.legend()
    figure.savefig(path, dpi=100)
    plt.close(figure)
