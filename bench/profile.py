"""Where the gateway's CPU goes under load: py-spy samples a `tenebra serve` process while the
load generator saturates it, then the samples are summed per function.

    python -m bench.profile                        # M=200, W=8, R=1, 300 tasks per connection
    python -m bench.profile --results 4 --tasks 150 --rate 1000
    python -m bench.profile --tenants 10           # the harness's ten tenants with limits

py-spy needs ptrace (root, or kernel.yama.ptrace_scope=0). "self" is time in the function's own
lines, C calls it makes included (msgspec, socket writes); "inclusive" adds its callees.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.harness import Scenario, load, servers


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
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--tenants", type=int, default=0, help="tenants with limits, as the admission scenario"
    )
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    scenario = Scenario(
        "profile", args.connections, args.tasks, args.window, args.results, args.rate
    )
    with tempfile.TemporaryDirectory() as scratch, servers("tenebra", tenants=args.tenants) as at:
        raw = Path(scratch) / "samples.txt"
        load(at, scenario, max(2, args.tasks // 10))  # warm-up
        sampler = subprocess.Popen(
            [spy, "record", "--pid", str(at.measured.pid), "--rate", "1000", "--format", "raw",
             "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attaches
        figures = load(at, scenario)
        sampler.send_signal(2)  # py-spy writes its samples on SIGINT
        sampler.wait(60)
        print(figures)
        print(summarise(raw, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
