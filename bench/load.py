"""The load generator: M connections x K tasks against one URL or more, bounded in count and time.

    python -m bench.load --url ws://127.0.0.1:8080/v1 --key K --connections 200 --tasks 50 \\
        --window 8 --results 1 [--rate 5000] [--seconds 120]

``--key`` may be given several times: connection i authenticates with key i modulo their count
(round robin per connection; the heavy connections use the first). So may ``--url`` (several
gateways, as behind a balancer): connection i connects to URL i modulo their count.

Saturation (default): each connection keeps ``window`` tasks in flight. Fixed rate (``--rate``):
tasks are offered at that many per second in all, spread over the connections, whatever the
answers. Prints one JSON object: tasks, result frames, errors, elapsed, latencies (ms).

    --heavy N        N more connections that send ``--heavy-rate`` tasks/s each, numberResults 4;
                     with ``--stalled`` they never read: the others' latency is what is measured
    --idle           only connect and authenticate, print {"ready": M}, hold for ``--seconds``
    --barrier        connect and authenticate every connection first, print {"ready": M}, and
                     start the timed phase (the clock, the sending) when a line arrives on
                     stdin: what is timed and measured is then tasks alone, not the handshakes
                     (the harness reads the CPU of the process under test in between)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import socket
import sys
import time
import uuid
from typing import Any

import aiohttp
import msgspec
import uvloop


class _Item(msgspec.Struct):
    taskUUID: str | None = None
    code: str | None = None  # an error item's: counted per code, to say what went wrong


class _Frame(msgspec.Struct):
    data: list[_Item] = msgspec.field(default_factory=list)
    errors: list[_Item] = msgspec.field(default_factory=list)


frame_of = msgspec.json.Decoder(_Frame)


# taskUUIDs: random per process (a gateway keeps records for an hour, and every run must be
# new to it), then a counter. Valid v4 UUIDs, as tenebra validates them, at a tenth of the cost
# of uuid4(): the load generator shares a core with the provider in the ceiling scenarios, and
# what it spends there is what the process under test cannot be pushed to.
_random = uuid.uuid4().hex
_UUID_PREFIX = f"{_random[:8]}-{_random[8:12]}-4{_random[13:16]}-8{_random[17:20]}-"
_uuid_counter = itertools.count()
_task_tails: dict[int, bytes] = {}


def _tail(results: int) -> bytes:
    """Everything of a task after its taskUUID, encoded once per ``results``."""
    tail = _task_tails.get(results)
    if tail is None:
        rest = msgspec.json.encode(
            {
                "model": "exactly:photo@extreme-contrast",
                "positivePrompt": "a boxer under a hard spotlight",
                "width": 1024,
                "height": 1024,
                "numberResults": results,
            }
        )
        tail = _task_tails[results] = b'",' + rest[1:] + b"]"
    return tail


def task(results: int) -> tuple[str, bytes]:
    """A fresh imageInference task, as a frame of one (SDKs send one task per frame)."""
    task_uuid = f"{_UUID_PREFIX}{next(_uuid_counter):012x}"
    body = b'[{"taskType":"imageInference","taskUUID":"' + task_uuid.encode() + _tail(results)
    return task_uuid, body


def key_of(args: argparse.Namespace, index: int) -> str:
    """Connection ``index``'s API key: the ``--key`` values in turn."""
    keys: list[str] = args.key
    return keys[index % len(keys)]


def url_of(args: argparse.Namespace, index: int) -> str:
    """Connection ``index``'s URL: the ``--url`` values in turn (round robin per connection)."""
    urls: list[str] = args.url
    return urls[index % len(urls)]


class Gate:
    """Every connection authenticated before any sends (``--barrier``)."""

    def __init__(self, connections: int) -> None:
        self.waiting = connections
        self.all_in = asyncio.Event()
        self.go = asyncio.Event()

    async def arrive(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0:
            self.all_in.set()
        await self.go.wait()


async def connection(
    http: aiohttp.ClientSession,
    args: argparse.Namespace,
    stats: dict[str, object],
    rate: float,
    index: int = 0,
    gate: Gate | None = None,
) -> None:
    latencies: list[float] = stats["latencies"]  # type: ignore[assignment]
    codes: dict[str, int] = stats["codes"]  # type: ignore[assignment]
    async with http.ws_connect(url_of(args, index), max_msg_size=0) as ws:
        auth = [{"taskType": "authentication", "apiKey": key_of(args, index)}]
        await ws.send_str(json.dumps(auth))
        await ws.receive()
        if gate is not None:
            await gate.arrive()
        started: dict[str, float] = {}
        remaining: dict[str, int] = {}
        sent = 0
        done = asyncio.Event()
        finished = 0

        async def send_one() -> None:
            nonlocal sent
            task_uuid, body = task(args.results)
            started[task_uuid] = time.perf_counter()
            remaining[task_uuid] = args.results
            sent += 1
            await ws.send_frame(body, aiohttp.WSMsgType.TEXT)

        async def reader() -> None:
            nonlocal finished
            async for message in ws:
                frame = frame_of.decode(message.data)
                stats["frames"] += 1  # type: ignore[operator]
                for item in frame.errors:
                    stats["errors"] += 1  # type: ignore[operator]
                    codes[item.code or "?"] = codes.get(item.code or "?", 0) + 1
                    remaining[item.taskUUID or ""] = 0
                    finished += 1
                for item in frame.data:
                    left = remaining.get(item.taskUUID or "", 0) - 1
                    remaining[item.taskUUID or ""] = left
                    if left == 0:
                        latencies.append(
                            (time.perf_counter() - started.pop(item.taskUUID or "")) * 1000
                        )
                        finished += 1
                        if rate == 0 and sent < args.tasks:
                            await send_one()
                if finished >= args.tasks:
                    done.set()
                    return

        reading = asyncio.create_task(reader())
        if rate == 0:
            for _ in range(min(args.window, args.tasks)):
                await send_one()
        else:
            interval = 1.0 / rate
            # each connection a phase of its own, spread evenly over one interval: in step
            # (as --barrier releases them), M connections would offer M tasks at once every
            # interval, bursts rather than the rate, and the latency measured would be theirs
            next_at = time.perf_counter() + interval * (index % args.connections) / max(
                1, args.connections
            )
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            while sent < args.tasks:
                await send_one()
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
        try:
            await asyncio.wait_for(done.wait(), args.seconds)
        finally:
            reading.cancel()


def small_window(addr_info: tuple[Any, ...]) -> socket.socket:
    """A socket with a 4 KiB receive buffer, set before connecting (the window scale is agreed
    in the handshake): a client that stops reading shows as one within seconds, not megabytes."""
    family, kind, proto = addr_info[:3]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def heavy(args: argparse.Namespace, until: asyncio.Event) -> None:
    """Sends ``--heavy-rate`` tasks/s of four images each; reads them unless ``--stalled``.
    Not reading: aiohttp stops reading the socket once 64 KiB wait unread, so what the gateway
    sends it piles up in the kernel and then in the gateway, until the gateway cuts it."""
    connector = aiohttp.TCPConnector(socket_factory=small_window if args.stalled else None)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.ws_connect(url_of(args, 0), max_msg_size=0) as ws,
    ):
        auth = [{"taskType": "authentication", "apiKey": key_of(args, 0)}]
        await ws.send_str(json.dumps(auth))

        async def read_all() -> None:
            async for _ in ws:
                pass

        reading = None if args.stalled else asyncio.create_task(read_all())
        try:
            while not until.is_set():
                try:
                    await asyncio.wait_for(ws.send_bytes(task(4)[1]), 1.0)
                except (TimeoutError, ConnectionError):
                    return  # cut by the gateway, or its own buffers full: stalled either way
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(until.wait(), 1.0 / args.heavy_rate)
        finally:
            if reading is not None:
                reading.cancel()


async def hold_idle(http: aiohttp.ClientSession, args: argparse.Namespace) -> None:
    """Connect and authenticate ``--connections`` sockets, say so, and hold them."""
    handshakes = asyncio.Semaphore(100)
    sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def open_one(index: int) -> None:
        async with handshakes:
            ws = await http.ws_connect(
                url_of(args, index), max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=1.0)
            )
            sockets.append(ws)
            auth = [{"taskType": "authentication", "apiKey": key_of(args, index)}]
            await ws.send_str(json.dumps(auth))
            await asyncio.wait_for(ws.receive(), 30)

    started = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(open_one(i) for i in range(args.connections))), args.seconds
    )
    print(
        json.dumps({"ready": len(sockets), "elapsed": round(time.perf_counter() - started, 3)}),
        flush=True,
    )
    with contextlib.suppress(TimeoutError):  # until the harness has measured (stdin closes)
        await asyncio.wait_for(
            asyncio.get_running_loop().run_in_executor(None, sys.stdin.read), args.seconds
        )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(ws.close() for ws in sockets)), 10)


async def main(args: argparse.Namespace) -> None:
    stats: dict[str, object] = {"frames": 0, "errors": 0, "latencies": [], "codes": {}}
    per_connection_rate = args.rate / args.connections if args.rate and args.connections else 0.0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        if args.idle:
            await hold_idle(http, args)
            return
        stop_heavy = asyncio.Event()
        heavies = [asyncio.create_task(heavy(args, stop_heavy)) for _ in range(args.heavy)]
        gate = Gate(args.connections) if args.barrier and args.connections else None
        running = asyncio.gather(
            *(
                connection(http, args, stats, per_connection_rate, i, gate)
                for i in range(args.connections)
            )
        )
        if gate is not None:
            arrived = asyncio.ensure_future(gate.all_in.wait())
            await asyncio.wait(
                (arrived, running), timeout=args.seconds, return_when=asyncio.FIRST_COMPLETED
            )
            if running.done():
                running.result()  # a connection failed before every one was in: say why
            if not arrived.done():
                arrived.cancel()
                running.cancel()
                raise TimeoutError(f"not every connection authenticated in {args.seconds} s")
            print(json.dumps({"ready": args.connections}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            gate.go.set()
        started = time.perf_counter()
        cpu_started = time.process_time()
        try:
            if not args.connections:  # heavy connections alone, for ``--seconds``
                await asyncio.sleep(args.seconds)
            await asyncio.wait_for(running, args.seconds)
        finally:
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            stop_heavy.set()
            for heavy_task in heavies:
                heavy_task.cancel()
            await asyncio.gather(*heavies, return_exceptions=True)
    latencies = sorted(stats["latencies"])  # type: ignore[call-overload]

    def q(p: float) -> float:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3)
            if latencies
            else 0.0
        )

    print(json.dumps({
        "tasks": len(latencies),
        "frames": stats["frames"],
        "errors": stats["errors"],
        "error_codes": stats["codes"],
        "elapsed": round(elapsed, 3),
        "cpu_s": round(cpu, 3),  # the load generator's own, over the same time
        "p50_ms": q(0.50), "p99_ms": q(0.99), "p999_ms": q(0.999),
    }))  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--url", action="append", required=True, help="repeatable: round robin per connection"
    )
    parser.add_argument(
        "--key", action="append", required=True, help="repeatable: round robin per connection"
    )
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=100, help="per connection")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--results", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0, help="tasks/s in all; 0 = saturate")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--heavy", type=int, default=0, help="more connections, R=4 each")
    parser.add_argument("--heavy-rate", type=float, default=100.0, help="tasks/s each")
    parser.add_argument("--stalled", action="store_true", help="the heavy ones never read")
    parser.add_argument("--idle", action="store_true")
    parser.add_argument("--barrier", action="store_true", help="start on a line on stdin")
    sys.exit(uvloop.run(main(parser.parse_args())))
