"""Where the gateway's CPU goes under load: py-spy samples a `tenebra serve` process while the
load generator saturates it, then the samples are summed per function.

    python -m bench.profile                        # M=200, W=8, R=1, 300 tasks per connection
    python -m bench.profile --results 4 --tasks 150 --rate 1000
    python -m bench.profile --tenants 10           # the harness's ten tenants with limits
    python -m bench.profile --ceiling              # issue 14: at its ceiling (below)
    python -m bench.profile --store                # issue 13: on a Redis store (a redis-server)

``--ceiling``: tenebra against the echo provider (bench/echo.py, which answers at once) at
saturation, M=200, W=8, R=1, pinned as the harness's ceiling group pins it (tenebra alone on
the first CPU; the load generator, the provider and py-spy on the second), so that the samples
are of tenebra at the most it can do. The summary goes to bench/results/profile-*.txt too, and
the top 25 to stdout.

py-spy needs ptrace (root, or kernel.yama.ptrace_scope=0). "self" is time in the function's own
lines, C calls it makes included (msgspec, socket writes); "inclusive" adds its callees.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.harness import (
    RESULTS,
    Scenario,
    build_line,
    load,
    on_cpus,
    pinning,
    pinning_line,
    servers,
)


def summarise(raw: Path, top: int) -> str:
    """py-spy's raw format: one line per distinct stack, ``frame;frame;... count``."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        frames = [frame.rsplit(":", 1)[0] for frame in stack.split(";")]  # no line numbers
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"{total} samples", "", "self:"]
    lines += [f"{n * 100 / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{n * 100 / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=300, help="per connection")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--results", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument(
        "--top", type=int, default=None, help="functions listed (30; 25 with --ceiling)"
    )
    parser.add_argument(
        "--tenants", type=int, default=0, help="tenants with limits, as the admission scenario"
    )
    parser.add_argument(
        "--ceiling", action="store_true",
        help="against the echo provider, pinned, at saturation (M=200 W=8 R=1, 500 tasks each)",
    )  # fmt: skip
    parser.add_argument(
        "--store", action="store_true", help="on a Redis store (the harness starts redis-server)"
    )
    args = parser.parse_args(argv)
    top = args.top or (25 if args.ceiling else 30)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.ceiling:
        args.connections, args.tasks, args.window, args.results, args.rate = 200, 500, 8, 1, 0.0
    scenario = Scenario(
        "profile", args.connections, args.tasks, args.window, args.results, args.rate
    )
    available = os.sched_getaffinity(0)
    pin = pinning(available) if args.ceiling else None
    with (
        tempfile.TemporaryDirectory() as scratch,
        servers(
            "tenebra", tenants=args.tenants, echo=args.ceiling, pin=pin, store=args.store
        ) as at,
    ):
        raw = Path(scratch) / "samples.txt"
        load(at, scenario, max(2, args.tasks // 10))  # warm-up
        sampler = subprocess.Popen(
            [spy, "record", "--pid", str(at.measured.pid), "--rate", "1000", "--format", "raw",
             "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=on_cpus(pin.others if pin else None),  # not on tenebra's core
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attaches
        figures = load(at, scenario)
        sampler.send_signal(2)  # py-spy writes its samples on SIGINT
        sampler.wait(60)
        if not raw.exists():
            print("py-spy wrote no samples (it needs ptrace: root, or ptrace_scope 0)")
            return 1
        summary = summarise(raw, top)
    elapsed = max(figures["elapsed"], 1e-9)
    head = [
        f"tenebra{' on a Redis store' if args.store else ''}, "
        f"{'against the echo provider' if args.ceiling else 'against the local provider'}"
        f": M={args.connections} W={args.window} R={args.results}"
        + (f", {args.rate:,.0f} tasks/s offered" if args.rate else ", saturation"),
        f"{figures['tasks']:,} tasks in {figures['elapsed']} s = "
        f"{figures['tasks'] / elapsed:,.0f} tasks/s; p50 {figures['p50_ms']} ms, "
        f"p99 {figures['p99_ms']} ms; errors {figures['errors']}",
        pinning_line(pin, len(available)) if args.ceiling else "pinning: none",
        build_line(),
        "",
    ]
    text = "\n".join(head) + summary + "\n"
    RESULTS.mkdir(exist_ok=True)
    name = "profile" + ("-ceiling" if args.ceiling else "") + ("-store" if args.store else "")
    target = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    target.write_text(text)
    print(text, end="")
    print(f"(written to {target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
