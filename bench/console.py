"""Console viewers against the task path: the gateway's CPU per task with 20 console viewers
open against none, on one gateway in one run (issue 15: within 1.05x).

    python -m bench.console                  # 20 viewers vs none, 5 turns each, alternating
    python -m bench.console --smoke          # small: it runs, the viewers get their frames

The viewers are another process (their reading costs the gateway nothing but the sending):
each opens ``/console/events`` with the admin key and reads every frame. The load is the
harness's (bench.load, M=20 connections, window 4, one result, saturation), measured by
``bench.harness.measure``: CPU of the gateway's process from /proc per 1000 tasks. Turns
alternate (none, viewers, none, ...) on the same gateway and provider; the median of each stands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
from typing import Any

import aiohttp

from bench.harness import PY, Scenario, measure, servers

ADMIN = "bench-admin"


async def hold(url: str, count: int, seconds: float) -> None:
    """``count`` console viewers reading everything until stdin closes; then what they read."""
    base = url.replace("ws://", "http://").rsplit("/", 1)[0]
    frames = bytes_read = 0

    async def viewer(http: aiohttp.ClientSession) -> None:
        nonlocal frames, bytes_read
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with http.ws_connect(base + "/console/events", headers=headers) as ws:
            opened.append(ws)
            if len(opened) == count:
                all_open.set()
            async for message in ws:
                frames += 1
                bytes_read += len(message.data)

    opened: list[aiohttp.ClientWebSocketResponse] = []
    all_open = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        readers = [asyncio.create_task(viewer(http)) for _ in range(count)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_open.wait(), 30)
        print(json.dumps({"ready": len(opened)}), flush=True)
        with contextlib.suppress(TimeoutError):  # until the bench has measured (stdin closes)
            await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(None, sys.stdin.read), seconds
            )
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    print(json.dumps({"frames": frames, "bytes": bytes_read}), flush=True)


def viewers_open(url: str, count: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [PY, "-m", "bench.console", "--hold", url, "--viewers", str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    ready = json.loads(process.stdout.readline())
    if ready["ready"] != count:
        raise RuntimeError(f"{ready['ready']} of {count} console viewers opened")
    return process


def viewers_close(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate("", timeout=30)  # stdin closed: they stop and say what they read
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=1000, help="per connection")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--hold", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hold:
        asyncio.run(hold(args.hold, args.viewers, 600))
        return 0
    if args.smoke:
        args.repeat, args.tasks = 1, 20
    scenario = Scenario(f"console: M=20 W=4, 1 result, {args.tasks} tasks each", 20, args.tasks, 4)
    runs: dict[int, list[dict[str, Any]]] = {0: [], args.viewers: []}
    with servers("tenebra", env={"TENEBRA_ADMIN_KEY": ADMIN}) as at:
        for _ in range(args.repeat):
            for count in runs:
                process = viewers_open(at.url, count) if count else None
                try:
                    figures = measure(at, scenario, f"tenebra, {count} console viewers")
                finally:
                    read = viewers_close(process) if process is not None else {}
                figures["viewer_frames"] = read.get("frames", 0)
                runs[count].append(figures)
                print(
                    f"{count:>3} viewers: {figures['gateway_cpu_ms_per_1000']:>7.1f} ms CPU "
                    f"per 1000 tasks, {figures['tasks_per_s']:,} tasks/s"
                    + (f", {read['frames']} frames read" if read else ""),
                    flush=True,
                )
    cpu = {n: statistics.median(r["gateway_cpu_ms_per_1000"] for r in rs) for n, rs in runs.items()}
    ratio = cpu[args.viewers] / cpu[0] if cpu[0] else float("nan")
    summary = {
        "scenario": scenario.name,
        "viewers": args.viewers,
        "gateway_cpu_ms_per_1000": {str(n): round(v, 1) for n, v in cpu.items()},
        "ratio": round(ratio, 3),
        "target": 1.05,
        "turns": args.repeat,
    }
    print(json.dumps(summary), flush=True)
    if args.smoke and not all(r["viewer_frames"] for r in runs[args.viewers]):
        print("bench.console: the viewers read nothing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
