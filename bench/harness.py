"""Side by side in one run: direct to the provider, through the bare relay, through tenebra.

    python -m bench.harness            # the scenarios of issue 7, results in bench/results/
    python -m bench.harness --smoke    # small: checks all three paths complete without errors

Every server is its own process (the local provider in ``fast`` mode, so the relay or the
gateway is what is measured; the load generator is a fourth). CPU seconds come from
/proc/<pid>/stat (user + system), RSS from /proc/<pid>/status; each path gets a fresh provider
and a short warm-up. Figures vary from machine to machine: read the ratios, which come from one
run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Scenario:
    name: str
    connections: int
    tasks: int  # per connection
    window: int = 8
    results: int = 1
    rate: float = 0.0  # 0: saturation


SCENARIOS = [
    Scenario("saturation M=200 W=8 R=1", 200, 100),
    Scenario("saturation M=200 W=8 R=4", 200, 50, results=4),
    Scenario("fixed 5,000 tasks/s M=200 R=1", 200, 50, rate=5000),
]
SMOKE = [Scenario("smoke M=20 W=4 R=2", 20, 20, window=4, results=2)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spawn(*argv: str) -> tuple[subprocess.Popen[str], str]:
    """Start a server; its first line on stdout ends with the URL it listens on."""
    process = subprocess.Popen(
        [PY, *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if "ws://" in line:
            return process, line.rsplit(" ", 1)[1].strip()
    process.kill()
    raise RuntimeError(f"{argv} did not start")


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def load(url: str, key: str, s: Scenario, tasks: int | None = None) -> dict[str, Any]:
    argv = [
        PY, "-m", "bench.load", "--url", url, "--key", key,
        "--connections", str(s.connections), "--tasks", str(tasks or s.tasks),
        "--window", str(s.window), "--results", str(s.results), "--rate", str(s.rate),
        "--seconds", "300",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=360, check=True).stdout
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return figures


def run_path(path: str, s: Scenario) -> dict[str, Any]:
    provider, provider_url = spawn(
        "-m", "gateway.cli", "provider", "--port", "0", "--key", "pk", "--fast"
    )
    server = None
    try:
        if path == "direct":
            url, key, measured = provider_url, "pk", provider
        elif path == "relay":
            server, url = spawn(
                "-m", "bench.relay", "--provider-url", provider_url, "--provider-key", "pk"
            )
            key, measured = "any", server
        else:
            server, url = spawn(
                "-m", "gateway.cli", "serve", "--port", "0", "--demo-key", "dk",
                "--provider-url", provider_url, "--provider-key", "pk", "--log-level", "info",
            )  # fmt: skip
            key, measured = "dk", server
            time.sleep(0.5)  # the provider link authenticates
        load(url, key, s, tasks=max(2, s.tasks // 10))  # warm-up
        before = (cpu_seconds(measured.pid), cpu_seconds(provider.pid))
        figures = load(url, key, s)
        after = (cpu_seconds(measured.pid), cpu_seconds(provider.pid))
        done = max(1, figures["tasks"])
        figures.update(
            path=path,
            tasks_per_s=round(done / figures["elapsed"]),
            frames_per_s=round(figures["frames"] / figures["elapsed"]),
            cpu_ms_per_1000=round((after[0] - before[0]) * 1e6 / done, 1),
            provider_cpu_ms_per_1000=round((after[1] - before[1]) * 1e6 / done, 1),
            rss_mib=round(rss_mib(measured.pid), 1),
            expected=s.connections * s.tasks,
        )
        return figures
    finally:
        if server is not None:
            stop(server)
        stop(provider)


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
    for s in {r["scenario"] for r in runs}:
        relay, gateway, direct = by.get((s, "relay")), by.get((s, "tenebra")), by.get((s, "direct"))
        if relay and gateway:
            cpu = gateway["cpu_ms_per_1000"] / relay["cpu_ms_per_1000"]
            throughput = gateway["tasks_per_s"] / relay["tasks_per_s"]
            notes.append(
                f"{s}: tenebra CPU per task = {cpu:.2f}x the bare relay's; "
                f"throughput = {throughput:.2f}x"
            )
        if direct and gateway:
            notes.append(
                f"{s}: p99 through tenebra {gateway['p99_ms'] - direct['p99_ms']:+.2f} ms vs direct"
            )
    return sorted(notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    scenarios = SMOKE if args.smoke else SCENARIOS
    runs = []
    for scenario in scenarios:
        for path in ("direct", "relay", "tenebra"):
            figures = run_path(path, scenario)
            figures["scenario"] = scenario.name
            runs.append(figures)
            print(f"{scenario.name} / {path}: {figures['tasks_per_s']} tasks/s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    notes = ratios(runs)
    report = {"scenarios": [asdict(s) for s in scenarios], "runs": runs, "ratios": notes}
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(report, indent=2))
    markdown = table(runs) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (RESULTS / f"bench-{stamp}.md").write_text(markdown)
    print(markdown)
    failed = [r for r in runs if r["errors"] or r["tasks"] != r["expected"]]
    if failed:
        print(f"FAILED: {len(failed)} path(s) lost tasks or had errors", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
