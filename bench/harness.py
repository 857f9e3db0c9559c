"""Side by side in one run: direct to the provider, through the bare relay, through tenebra.

    python -m bench.harness                 # the scenarios of issue 7, results in bench/results/
    python -m bench.harness --smoke         # small: all paths complete without errors (CI)
    python -m bench.harness --only R=1 --repeat 5

Every server is its own process (the local provider in ``fast`` mode, so the relay or the
gateway is what is measured; the load generator is another). CPU seconds come from
/proc/<pid>/stat (user + system), RSS from /proc/<pid>/status; each path gets a fresh provider
and a short warm-up, and the paths take turns ``--repeat`` times (the median run by CPU is
reported: the same load varies by 10-20% from run to run on a shared 2-core machine).
Besides the three-way load scenarios: the cost of admission (tenebra with ten tenants whose
limits are set but never bind, the load spread over their keys, against the demo tenant without
limits, same run), idle connections (RSS each), a soak (RSS before and after, the registry
emptied), and one client that never reads beside others (their p99). Issue 13: the R=1
saturation load through tenebra on its memory store and on a Redis store (a real redis-server
the harness starts, its CPU counted with the gateway's), and through one gateway and two on
that Redis (the load generator's connections spread over both); skipped, saying why, where
redis-server is not installed.
Issue 14, the ceiling (``--only ceiling``): the same paths against the echo provider
(bench/echo.py, which answers at once), so that what tops out is the process in the middle, not
the provider; tenebra with one provider link and with two; saturation R=1 and R=4, and fixed
offered rates with the latency each path adds over direct in the same turn. Where two cores or
more are ours, the process under test (the relay, tenebra; the echo provider when direct) runs
alone on the first, the load generator and the provider on the second; figures are the
medians of the ``--repeat`` turns, figure by figure.
Figures vary from machine to machine: read the ratios, which come from one run on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import report

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent  # the repository
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


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the process under test gets, and which everything else does (the load
    generator and the provider): apart, the two never take turns on one core, and the CPU
    figures of the process under test are its own."""

    measured: frozenset[int]
    others: frozenset[int]

    def describe(self) -> str:
        return (
            f"the process under test (relay, tenebra; the echo provider when direct) alone on "
            f"cpu {cpus_text(self.measured)}; load generator and provider on cpu "
            f"{cpus_text(self.others)}"
        )


def cpus_text(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def pinning(available: set[int] | frozenset[int]) -> Pinning | None:
    """The first available CPU for the process under test, the second for the rest; None
    (nothing pinned) with fewer than two: one core shared is what the figures then say."""
    if len(available) < 2:
        return None
    first, second, *_ = sorted(available)
    return Pinning(frozenset({first}), frozenset({second}))


def pinning_line(pin: Pinning | None, available: int) -> str:
    if pin is None:
        return (
            f"pinning: none ({available} CPU available to the harness: every process shares "
            "it, so the figures include the load generator's and the provider's turns)"
        )
    return f"pinning: {pin.describe()}"


@dataclass
class Plan:
    load: list[Scenario]
    idle: list[int]  # connection counts
    soak_tasks: int
    soak_warmup: int
    stall: Scenario  # the well-behaved clients; one more never reads
    stalled_rate: float  # the tasks/s that one sends
    stall_pairs: int
    admission: Scenario  # through tenebra: the demo tenant, then ten tenants with limits
    store: Scenario  # through tenebra: the memory store, then a Redis store
    replicas: Scenario  # one gateway on Redis, then two (the connections spread over both)
    ceiling: list[Scenario]  # against the echo provider, pinned, every path of CEILING_PATHS
    ceiling_fresh: bool  # fresh servers per scenario; else one set per path for them all


FULL = Plan(
    load=[
        Scenario("saturation M=200 W=8 R=1", 200, 100),
        Scenario("saturation M=200 W=8 R=4", 200, 50, results=4),
        Scenario("fixed 5,000 tasks/s M=200 R=1", 200, 50, rate=5000),
    ],
    idle=[2_000, 10_000],
    soak_tasks=300_000,
    soak_warmup=100_000,
    stall=Scenario("stall M=50", 50, 200, rate=1000),
    stalled_rate=500,
    stall_pairs=3,
    admission=Scenario("admission: 10 tenants with limits vs none, M=200 W=8, 1 result", 200, 100),
    store=Scenario("store: Redis vs memory, M=200 W=8, 1 result", 200, 500),
    replicas=Scenario("replicas: two gateways vs one on Redis, M=200 W=8, 1 result", 200, 500),
    ceiling=[
        Scenario("ceiling: saturation M=200 W=8 R=1", 200, 500),
        Scenario("ceiling: saturation M=200 W=8 R=4", 200, 200, results=4),
        Scenario("ceiling: 2,000 tasks/s M=200 R=1", 200, 30, rate=2_000),
        Scenario("ceiling: 10,000 tasks/s M=200 R=1", 200, 150, rate=10_000),
        Scenario("ceiling: 20,000 tasks/s M=200 R=1", 200, 300, rate=20_000),
    ],
    ceiling_fresh=True,
)
SMOKE = Plan(
    load=[Scenario("smoke M=20 W=4 R=2", 20, 20, window=4, results=2)],
    idle=[200],
    soak_tasks=4_000,
    soak_warmup=1_000,
    stall=Scenario("stall M=10", 10, 20, rate=200),
    stalled_rate=100,
    stall_pairs=1,
    admission=Scenario("admission: 10 tenants with limits vs none, M=20 W=4, 1 result", 20, 100, 4),
    store=Scenario("store: Redis vs memory, M=20 W=4, 1 result", 20, 50, 4),
    replicas=Scenario("replicas: two gateways vs one on Redis, M=20 W=4, 1 result", 20, 50, 4),
    # every ceiling scenario, small, against one set of servers per path (starting tenebra
    # takes longer than these loads)
    ceiling=[
        Scenario("ceiling: saturation M=20 W=8 R=1", 20, 50),
        Scenario("ceiling: saturation M=20 W=8 R=4", 20, 20, results=4),
        Scenario("ceiling: 2,000 tasks/s M=20 R=1", 20, 5, rate=2_000),
        Scenario("ceiling: 10,000 tasks/s M=20 R=1", 20, 20, rate=10_000),
        Scenario("ceiling: 20,000 tasks/s M=20 R=1", 20, 40, rate=20_000),
    ],
    ceiling_fresh=False,
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def on_cpus(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    """What a child runs before it starts, to be bound to ``cpus`` from its first instruction
    (its threads, started later, inherit it); None: not bound."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def source_digest(root: Path = ROOT) -> str:
    """Of every file under gateway/ and protocol/ (not caches): what a compiled copy was built
    from (``make compiled`` writes it into the copy's ``.compiled``)."""
    digest = hashlib.sha256()
    for path in sorted(p for d in ("gateway", "protocol") for p in (root / d).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def compiled_tree() -> Path | None:
    """The mypyc-compiled copy of the sources (``make compiled``, named by BENCH_COMPILED)
    tenebra runs from, if it was built from the sources as they are; None: tenebra runs from
    the sources, pure Python (a stale copy is never run: ``build_line`` says why)."""
    folder = os.environ.get("BENCH_COMPILED")
    if not folder:
        return None
    stamp = Path(folder) / ".compiled"
    if not stamp.exists() or stamp.read_text().strip() != source_digest():
        return None
    return Path(folder)


def build_line() -> str:
    tree = compiled_tree()
    if tree is None:
        folder = os.environ.get("BENCH_COMPILED")
        why = "`make compiled` builds the mypyc copy"
        if folder and (Path(folder) / ".compiled").exists():
            why = f"{folder} was built from other sources: `make compiled` builds it again"
        return f"build: tenebra ran pure Python ({why})"
    built = [*tree.glob("gateway/**/*.so"), *tree.glob("protocol/**/*.so")]
    modules = sorted(str(p.relative_to(tree)).split(".")[0].replace("/", ".") for p in built)
    return f"build: tenebra ran mypyc-compiled ({len(modules)} modules: {', '.join(modules)})"


def spawn(
    *argv: str,
    env: dict[str, str] | None = None,
    cpus: frozenset[int] | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """Start a server (on ``cpus`` if given; from ``cwd``, whose packages ``-m`` imports first);
    its first line on stdout ends with the URL it listens on."""
    process = subprocess.Popen(
        [PY, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=on_cpus(cpus),  # the harness runs no threads
        cwd=cwd,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:  # at once, not after the deadline
            raise RuntimeError(f"{argv} exited with status {process.returncode} as it started")
        # the URL is the last word of its line (a JSON log line may hold one too, inside)
        word = line.rsplit(" ", 1)[-1].strip()
        if word.startswith("ws://"):
            return process, word
    process.kill()
    raise RuntimeError(f"{argv} did not start")


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Servers:
    url: str
    key: str
    measured: subprocess.Popen[str]  # the relay, the gateway, or the provider when direct
    provider: subprocess.Popen[str]
    keys: tuple[str, ...] = ()  # several tenants' keys, taken in turn per connection
    urls: tuple[str, ...] = ()  # several gateways' (``url`` first), taken in turn per connection
    also: tuple[subprocess.Popen[str], ...] = ()  # the other gateways, measured with the first
    redis: subprocess.Popen[str] | None = None  # the gateways' store, measured with them
    load_cpus: frozenset[int] | None = None  # where the load generator runs (None: anywhere)
    links: int = 1  # tenebra's provider links

    def scrape(self) -> dict[str, float]:
        """The gateway's /metrics, unlabelled and labelled lines alike, by their full name."""
        base = self.url.replace("ws://", "http://").rsplit("/", 1)[0]
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }


ADMISSION_TENANTS = 10


def tenants_toml(count: int) -> tuple[str, tuple[str, ...]]:
    """A configuration of ``count`` tenants, each with every limit set and none binding under
    the bench's loads (so that what differs is the checking, not refusals or waiting), and
    their keys."""
    keys = tuple(f"bench-tenant-{i}-key-{'x' * 24}" for i in range(count))
    blocks = [
        f"""[tenants.bench{i}]
keys = ["{key}"]
weight = {1 + i % 3}
max_in_flight = 1000000
max_queued = 1000000
rate = 1000000.0
burst = 1000000
max_connections = 100000
budget_per_day = 1000000000.0
max_number_results = 20
"""
        for i, key in enumerate(keys)
    ]
    return "\n".join(blocks), keys


REDIS_MISSING = (
    "redis-server is not on PATH (apt-get install redis-server; `make test` installs it as root "
    "on Debian)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers_ping(port: int, within: float = 0.1) -> bool:
    """Whether a Redis answers PING on the loopback ``port``: ``within`` to connect, five
    times that for the answer (the tests pass their time factor's)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=within) as sock:
            sock.settimeout(5 * within)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A redis-server of its own on a free loopback port, without persistence, answering PING;
    its process and ``redis://127.0.0.1:<port>/0``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(REDIS_MISSING)
    for _ in range(3):  # a free port can be taken between the probe and the bind
        port = free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 5
        while process.poll() is None and time.monotonic() < deadline and not answers_ping(port):
            time.sleep(0.02)
        if process.poll() is None and answers_ping(port):
            try:
                yield process, f"redis://127.0.0.1:{port}/0"
            finally:
                stop(process)
            return
        stop(process)
    raise RuntimeError("redis-server did not answer PING on a loopback port (3 tries)")


def wait_ready(url: str, within: float = 20.0) -> None:
    """Until the gateway at ``url`` answers ``GET /readyz`` 200 (its provider link, and its
    store when it has one), or RuntimeError."""
    readyz = url.replace("ws://", "http://").rsplit("/", 1)[0] + "/readyz"
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(urllib.error.URLError, OSError),  # 503 too: HTTPError
            urllib.request.urlopen(readyz, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{readyz} did not say 200 within {within} s")


@contextlib.contextmanager
def servers(
    path: str,
    env: dict[str, str] | None = None,
    tenants: int = 0,
    store: bool = False,
    gateways: int = 1,
    echo: bool = False,
    links: int = 1,
    pin: Pinning | None = None,
) -> Iterator[Servers]:
    """``path``'s servers; for tenebra, ``tenants`` > 0 runs it with that many tenants with
    limits (a config file) instead of the demo tenant; ``store`` starts a redis-server and runs
    the gateway on it; ``gateways`` > 1 runs that many (``store`` only), each a replica of its
    own, with one provider. ``echo``: the echo provider instead of the local one; ``links``:
    tenebra's provider links; ``pin``: the process under test on its CPUs, the provider and
    the load generator on the others."""
    if gateways > 1 and not store:
        raise ValueError("several gateways share their state through a store")
    measured_cpus = pin.measured if pin else None
    other_cpus = pin.others if pin else None
    if echo:
        provider, provider_url = spawn(
            "-m", "bench.echo", "--port", "0", "--key", "pk",
            cpus=measured_cpus if path == "direct" else other_cpus,
        )  # fmt: skip
    else:
        # room for every image at once: the provider stands for one that is never the limit
        provider, provider_url = spawn(
            "-m", "gateway.cli", "provider", "--port", "0", "--key", "pk", "--fast",
            "--max-queued", "1000000", cpus=other_cpus,
        )  # fmt: skip
    server = None
    try:
        if path == "direct":
            yield Servers(provider_url, "pk", provider, provider, load_cpus=other_cpus)
            return
        if path == "relay":
            server, url = spawn(
                "-m", "bench.relay", "--provider-url", provider_url, "--provider-key", "pk",
                cpus=measured_cpus,
            )  # fmt: skip
            yield Servers(url, "any", server, provider, load_cpus=other_cpus)
            return
        # every load client comes from 127.0.0.1, hundreds of handshakes at once: not hostile
        env = {"TENEBRA_SERVER_MAX_UNAUTHENTICATED_PER_ADDRESS": "1000000", **(env or {})}
        if links != 1:
            env["TENEBRA_PROVIDER_LINKS"] = str(links)
        keys: tuple[str, ...] = ("dk",)
        with (
            tempfile.TemporaryDirectory(prefix="tenebra-bench-") as folder,
            contextlib.ExitStack() as running,
        ):
            who = ["--demo-key", "dk"]
            if tenants:
                text, keys = tenants_toml(tenants)
                config = Path(folder) / "tenants.toml"
                config.write_text(text)
                who = ["--config", str(config)]
            redis = None
            if store:
                redis, redis_url = running.enter_context(redis_server())
                env |= {"TENEBRA_STORE_URL": redis_url,
                        "TENEBRA_STORE_PREFIX": f"bench-{uuid.uuid4().hex[:8]}"}  # fmt: skip
            started: list[subprocess.Popen[str]] = []
            urls: list[str] = []
            for i in range(gateways):
                replica = {"TENEBRA_STORE_REPLICA": f"bench-{i}"} if store else {}
                gateway, url = spawn(
                    "-m", "gateway.cli", "serve", "--port", "0", *who,
                    "--provider-url", provider_url, "--provider-key", "pk",
                    "--log-level", "info", env={**env, **replica}, cpus=measured_cpus,
                    cwd=compiled_tree(),
                )  # fmt: skip
                running.callback(stop, gateway)  # the gateways stop before their redis-server
                started.append(gateway)
                urls.append(url)
            for url in urls:
                wait_ready(url)  # the provider link authenticates (and the store answers)
            time.sleep(0.2)
            (url, *_), (first, *others) = urls, started
            yield Servers(
                url, keys[0], first, provider, keys, tuple(urls), tuple(others), redis,
                load_cpus=other_cpus, links=links,
            )  # fmt: skip
    finally:
        if server is not None:
            stop(server)
        stop(provider)


def load_command(at: Servers, *flags: str) -> list[str]:
    """The load generator against ``at`` (every key of its, in turn per connection), with
    ``flags``."""
    keys = [arg for key in (at.keys or (at.key,)) for arg in ("--key", key)]
    urls = [arg for url in (at.urls or (at.url,)) for arg in ("--url", url)]
    return [PY, "-m", "bench.load", *urls, *keys, *flags]


def load(at: Servers, s: Scenario, tasks: int | None = None) -> dict[str, Any]:
    argv = load_command(
        at,
        "--connections", str(s.connections), "--tasks", str(tasks or s.tasks),
        "--window", str(s.window), "--results", str(s.results), "--rate", str(s.rate),
        "--seconds", "300",
    )  # fmt: skip
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=360, check=True,
        preexec_fn=on_cpus(at.load_cpus),  # the harness runs no threads
    ).stdout  # fmt: skip
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return figures


def load_gated(at: Servers, s: Scenario, between: Callable[[], None]) -> dict[str, Any]:
    """``s`` against ``at`` with ``--barrier``: every connection authenticates, ``between``
    runs (the CPU readings before), then the timed phase starts; the load generator's
    figures."""
    argv = load_command(
        at,
        "--connections", str(s.connections), "--tasks", str(s.tasks),
        "--window", str(s.window), "--results", str(s.results), "--rate", str(s.rate),
        "--seconds", "300", "--barrier",
    )  # fmt: skip
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        preexec_fn=on_cpus(at.load_cpus),  # the harness runs no threads
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stdin is not None
        ready = process.stdout.readline()
        if '"ready"' not in ready:
            raise RuntimeError(f"the load generator did not get its connections in: {ready!r}")
        between()
        out, _ = process.communicate("go\n", timeout=360)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, argv, out)
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return figures


def run_path(path: str, s: Scenario, tenants: int = 0) -> dict[str, Any]:
    with servers(path, tenants=tenants) as at:
        return measure(at, s, path, tenants)


def measure(
    at: Servers,
    s: Scenario,
    path: str,
    tenants: int = 0,
    warm: bool = True,
    gated: bool = False,
) -> dict[str, Any]:
    """A warm-up (unless not ``warm``), then ``s`` against ``at``: the load generator's
    figures, and the CPU each process took during the run per 1000 tasks (ms per 1000 tasks
    is µs per task). ``cpu_ms_per_1000`` is what is measured: every gateway's and their
    redis-server's (the relay's, the provider's when direct). ``gated``: every connection is
    in before the clock starts and the CPU is first read (the ceiling's figures are of tasks
    alone); else the handshakes are part of the run, as the older scenarios were measured."""
    gateways = (at.measured, *at.also)
    redis = (at.redis,) if at.redis else ()
    if warm:
        load(at, s, max(2, s.tasks // 10))  # warm-up
    before: list[float] = []

    def read_before() -> None:
        before.extend(cpu_seconds(p.pid) for p in (*gateways, *redis, at.provider))

    if gated:
        figures = load_gated(at, s, read_before)
    else:
        read_before()
        figures = load(at, s)
    after = [cpu_seconds(p.pid) for p in (*gateways, *redis, at.provider)]
    took = [b - a for a, b in zip(before, after, strict=True)]
    done = max(1, figures["tasks"])
    per_1000 = 1e6 / done
    elapsed = max(figures["elapsed"], 1e-9)
    gateway_cpu = sum(took[: len(gateways)])
    redis_cpu = sum(took[len(gateways) : len(gateways) + len(redis)])
    figures.update(
        scenario=s.name,
        path=path,
        results=s.results,
        rate=s.rate,
        tasks_per_s=round(done / figures["elapsed"]),
        frames_per_s=round(figures["frames"] / figures["elapsed"]),
        cpu_ms_per_1000=round((gateway_cpu + redis_cpu) * per_1000, 1),
        gateway_cpu_ms_per_1000=round(gateway_cpu * per_1000, 1),
        redis_cpu_ms_per_1000=round(redis_cpu * per_1000, 1),
        provider_cpu_ms_per_1000=round(took[-1] * per_1000, 1),
        rss_mib=round(sum(rss_mib(p.pid) for p in gateways), 1),
        gateways=len(gateways),
        expected=s.connections * s.tasks,
        tenants=tenants,
        results_per_s=round(done * s.results / figures["elapsed"]),
        links=at.links,
        # how busy the cores were: a path at saturation whose process under test is well
        # under 100% was held back (by the load side's core, or by waiting), and its
        # throughput is then a lower bound of its ceiling
        core_pct=round(gateway_cpu * 100 / elapsed),
        load_side_pct=round(
            (figures.get("cpu_s", 0.0) + (0.0 if at.provider is at.measured else took[-1]))
            * 100
            / elapsed
        ),
    )
    return figures


def run_load(s: Scenario, repeat: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The paths take turns; per path, the run with the median CPU per task stands."""
    every: dict[str, list[dict[str, Any]]] = {path: [] for path in report.PATHS}
    for _ in range(repeat):
        for path in report.PATHS:
            figures = run_path(path, s)
            every[path].append(figures)
            print(f"{s.name} / {path}: {figures['tasks_per_s']:,} tasks/s", flush=True)
    chosen = [median_cpu(runs) for runs in every.values()]
    return chosen, [r for runs in every.values() for r in runs]


def median_cpu(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median CPU per task (the lower middle one of an even count)."""
    cpus = sorted(r["cpu_ms_per_1000"] for r in runs)
    median = cpus[(len(cpus) - 1) // 2]
    return next(r for r in runs if r["cpu_ms_per_1000"] == median)


def run_admission(
    s: Scenario, repeat: int, tenants: int = ADMISSION_TENANTS
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The same saturation load through tenebra with the demo tenant (no limits) and with
    ``tenants`` tenants with limits set but never binding, the connections spread over their
    keys; they take turns ``repeat`` times and the run with the median CPU per task of each
    stands (none, then limits)."""
    every: dict[str, list[dict[str, Any]]] = {report.NO_LIMITS: [], report.LIMITS: []}
    for _ in range(repeat):
        for path, count in ((report.NO_LIMITS, 0), (report.LIMITS, tenants)):
            figures = run_path("tenebra", s, tenants=count)
            figures["path"] = path
            every[path].append(figures)
            print(f"{s.name} / {path}: {figures['tasks_per_s']:,} tasks/s, "
                  f"{figures['cpu_ms_per_1000']} CPU ms per 1000 tasks", flush=True)  # fmt: skip
    return [median_cpu(runs) for runs in every.values()], [r for rs in every.values() for r in rs]


def run_turns(
    s: Scenario, repeat: int, variants: tuple[tuple[str, bool, int], ...]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tenebra under ``s`` in each of ``variants`` (its name, on a Redis store or not, how many
    gateways), each with fresh servers (a redis-server of its own); they take turns ``repeat``
    times and the run with the median CPU per task of each stands, in the order given."""
    every: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    for _ in range(repeat):
        for name, store, gateways in variants:
            with servers("tenebra", store=store, gateways=gateways) as at:
                figures = measure(at, s, name)
            every[name].append(figures)
            print(f"{s.name} / {name}: {figures['tasks_per_s']:,} tasks/s, "
                  f"{figures['cpu_ms_per_1000']} CPU ms per 1000 tasks "
                  f"({figures['redis_cpu_ms_per_1000']} of them Redis's), "
                  f"p99 {figures['p99_ms']} ms", flush=True)  # fmt: skip
    return [median_cpu(runs) for runs in every.values()], [r for rs in every.values() for r in rs]


def run_store(s: Scenario, repeat: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Issue 13: one gateway on its memory store, then on a Redis store."""
    return run_turns(s, repeat, ((report.MEMORY, False, 1), (report.REDIS, True, 1)))


def run_replicas(s: Scenario, repeat: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Issue 13: one gateway on a Redis store, then two on one (distinct replicas, one prefix,
    one provider), the load generator's connections taking their URLs in turn."""
    return run_turns(s, repeat, ((report.ONE, True, 1), (report.TWO, True, 2)))


def ceiling_server_args(path: str) -> dict[str, Any]:
    """A ceiling path's servers: the echo provider, and tenebra's provider links."""
    return {"echo": True, "links": 2 if path == report.TWO_LINKS else 1}


def run_ceiling(
    scenarios: list[Scenario], repeat: int, fresh: bool, pin: Pinning | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Issue 14: every path of ``report.CEILING_PATHS`` under each scenario, against the echo
    provider, pinned as ``pin`` says. The paths take turns ``repeat`` times, a scenario's
    paths one after another in each turn (the latency added over direct is read from one
    turn's neighbours, not from runs minutes apart); ``fresh``:
    new servers per path and scenario, else one set per path for every scenario (the smoke:
    starting tenebra takes longer than its loads). Figures are medians over the turns, each
    figure its own."""
    every: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def record(s: Scenario, path: str, figures: dict[str, Any]) -> None:
        figures["path"] = path
        runs = every.setdefault((s.name, path), [])
        runs.append(figures)
        direct = every.get((s.name, "direct"), [])
        if path != "direct" and len(direct) == len(runs):  # this turn's direct run
            report.add_latency_over(figures, direct[-1])
        print(f"{s.name} / {path}: {figures['tasks_per_s']:,} tasks/s, "
              f"{figures['gateway_cpu_ms_per_1000']} CPU µs per task, "
              f"p99 {figures['p99_ms']} ms", flush=True)  # fmt: skip

    for _ in range(repeat):
        if fresh:
            for s in scenarios:
                for path in report.CEILING_PATHS:
                    kind = "tenebra" if path.startswith("tenebra") else path
                    with servers(kind, pin=pin, **ceiling_server_args(path)) as at:
                        record(s, path, measure(at, s, path, gated=True))
            continue
        for path in report.CEILING_PATHS:
            kind = "tenebra" if path.startswith("tenebra") else path
            with servers(kind, pin=pin, **ceiling_server_args(path)) as at:
                for i, s in enumerate(scenarios):
                    record(s, path, measure(at, s, path, warm=i == 0, gated=True))
    chosen = [
        report.median_figures(every[(s.name, path)])
        for s in scenarios
        for path in report.CEILING_PATHS
    ]
    return chosen, [r for runs in every.values() for r in runs]


def run_idle(count: int) -> dict[str, Any]:
    """RSS of the gateway before and while it holds ``count`` idle authenticated sockets."""
    with servers("tenebra") as at:
        load(at, Scenario("warm-up", 10, 10))
        before = rss_mib(at.measured.pid)
        argv = load_command(at, "--idle", "--connections", str(count), "--seconds", "240")
        holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdin is not None
            ready = json.loads(holder.stdout.readline() or "{}")
            time.sleep(1.0)  # the last handshakes settle
            held = rss_mib(at.measured.pid)
            connected = at.scrape()["tenebra_client_connections"]
            holder.stdin.close()
            holder.wait(60)
        finally:
            if holder.poll() is None:
                holder.kill()
        return {
            "connections": count,
            "ready": ready.get("ready", 0),
            "gateway_saw": connected,
            "elapsed": ready.get("elapsed"),
            "rss_before_mib": round(before, 1),
            "rss_held_mib": round(held, 1),
            "kib_per_connection": (held - before) * 1024 / count,
        }


def run_soak(tasks: int, warmup: int, retention: float = 1.0) -> dict[str, Any]:
    """RSS after a warm-up and after ``tasks`` more, each time once the finished tasks'
    retention has passed (so that what is compared is what stays, not how many records the
    last seconds left), and the registry then."""
    s = Scenario("soak", 200, 0)
    settle = retention + 2.5  # the janitor sweeps once a second
    with servers("tenebra", {"TENEBRA_TASKS_RETENTION": str(retention)}) as at:
        load(at, s, warmup // s.connections)
        time.sleep(settle)
        warm = rss_mib(at.measured.pid)
        figures = load(at, s, tasks // s.connections)
        time.sleep(settle)
        after = rss_mib(at.measured.pid)
        metrics = at.scrape()
    return {
        "tasks": figures["tasks"],
        "errors": figures["errors"],
        "tasks_per_s": round(figures["tasks"] / figures["elapsed"]),
        "rss_warm_mib": round(warm, 1),
        "rss_after_mib": round(after, 1),
        "rss_growth_pct": (after - warm) * 100 / warm,
        "in_flight": metrics["tenebra_tasks_in_flight"],
        "records": metrics["tenebra_task_records"],
        "retention_s": retention,
    }


def run_stall(s: Scenario, heavy_rate: float, pairs: int) -> dict[str, Any]:
    """The same fixed-rate load beside one heavy client (``heavy_rate`` tasks/s of four images)
    that reads, then beside one that never reads (with a small receive window, so that the
    gateway sees it within seconds): the difference is what a client that stops reading costs
    the others; the send buffer bound is small, so that the gateway cuts it within the run.
    ``pairs`` turns each; the median p99 of each kind stands, since one run's p99 on
    a shared 2-core machine varies by several times."""
    seconds = s.tasks * s.connections / s.rate + 0.5
    runs: dict[str, list[dict[str, Any]]] = {"reading": [], "stalled": []}
    with servers("tenebra", {"TENEBRA_SERVER_SEND_BUFFER_BYTES": str(256 * 1024)}) as at:
        load(at, s, max(2, s.tasks // 10))  # warm-up
        for _ in range(pairs):
            for kind in ("reading", "stalled"):
                heavy = subprocess.Popen(  # a process of its own: the others' is not shared
                    load_command(
                        at, "--connections", "0", "--heavy", "1", "--heavy-rate",
                        str(heavy_rate), "--seconds", str(seconds),
                        *(["--stalled"] if kind == "stalled" else []),
                    ),
                    stdout=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    runs[kind].append(load(at, s))
                finally:
                    try:
                        heavy.wait(seconds + 30)
                    except subprocess.TimeoutExpired:
                        heavy.kill()
        cut = at.scrape().get("tenebra_slow_client_disconnects_total", 0.0)

    def median_p99(kind: str) -> dict[str, Any]:
        ordered = sorted(runs[kind], key=lambda r: r["p99_ms"])
        return ordered[(len(ordered) - 1) // 2]

    return {
        "connections": s.connections,
        "rate": s.rate,
        "stalled_clients": 1,
        "stalled_rate": heavy_rate,
        "baseline": median_p99("reading"),
        "stalled": median_p99("stalled"),
        "every_p99": {kind: [r["p99_ms"] for r in rs] for kind, rs in runs.items()},
        "all_tasks": sum(r["tasks"] for rs in runs.values() for r in rs),
        "cut": cut,
        "expected": s.connections * s.tasks * pairs * 2,
    }


def raise_file_limit() -> None:
    """Idle connections need a descriptor each, in the gateway and in the load generator."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default="", help="run only scenarios whose name has this")
    parser.add_argument("--repeat", type=int, default=None, help="turns per path (default 3)")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    repeat = args.repeat or (1 if args.smoke else 3)
    raise_file_limit()
    runs: list[dict[str, Any]] = []
    every: list[dict[str, Any]] = []
    for scenario in plan.load:
        if args.only in scenario.name:
            chosen, all_runs = run_load(scenario, repeat)
            runs += chosen
            every += all_runs
    admission: list[dict[str, Any]] = []
    if args.only in plan.admission.name:
        admission, all_runs = run_admission(plan.admission, repeat)
        every += all_runs
    store: list[dict[str, Any]] = []
    replicas: list[dict[str, Any]] = []
    skipped: list[str] = []
    for scenario, run, into in (
        (plan.store, run_store, store),
        (plan.replicas, run_replicas, replicas),
    ):
        if args.only not in scenario.name:
            continue
        if shutil.which("redis-server") is None:
            skipped.append(f"{scenario.name}: skipped: {REDIS_MISSING}")
            print(skipped[-1], flush=True)
            continue
        chosen, all_runs = run(scenario, repeat)
        into += chosen
        every += all_runs
    ceiling: list[dict[str, Any]] = []
    ceiling_scenarios = [s for s in plan.ceiling if args.only in s.name]
    available = os.sched_getaffinity(0)
    pin = pinning(available)
    ceiling_notes: list[str] = []
    if ceiling_scenarios:
        ceiling_notes.append(pinning_line(pin, len(available)))
        print(ceiling_notes[0], flush=True)
        ceiling, all_runs = run_ceiling(ceiling_scenarios, repeat, plan.ceiling_fresh, pin)
        every += all_runs
        if args.smoke:
            ceiling_notes.append(
                "ceiling (smoke): runs of a few hundred tasks and a few CPU ticks each: they show "
                "that every path completes, and their ratios and verdicts mean nothing"
            )
        ceiling_notes += report.ceiling_lines(ceiling, repeat)
    idle = [run_idle(n) for n in plan.idle if args.only in "idle"]
    soak = run_soak(plan.soak_tasks, plan.soak_warmup) if args.only in "soak" else None
    stall = (
        run_stall(plan.stall, plan.stalled_rate, plan.stall_pairs)
        if args.only in plan.stall.name
        else None
    )

    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    notes = (
        report.ratios(runs) + report.admission_lines(admission)
        + report.store_lines(store) + report.replica_lines(replicas) + skipped
        + report.memory_lines(idle, soak) + report.stall_lines(stall) + ceiling_notes
        + [build_line()]
    )  # fmt: skip
    record = {
        "plan": asdict(plan), "repeat": repeat, "runs": runs, "every_run": every,
        "admission": admission, "store": store, "replicas": replicas, "skipped": skipped,
        "idle": idle, "soak": soak, "stall": stall, "notes": notes, "ceiling": ceiling,
        "pinning": {"measured": sorted(pin.measured), "others": sorted(pin.others)}
        if pin and ceiling_scenarios else None,
        "cpu_spread": {
            f"{r['scenario']} / {r['path']}": statistics.pstdev(
                [x["cpu_ms_per_1000"] for x in every
                 if (x["scenario"], x["path"]) == (r["scenario"], r["path"])]
            ) for r in runs + admission + store + replicas + ceiling
        },
    }  # fmt: skip
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(record, indent=2))
    tables = [report.table(group) for group in (runs, admission) if group]
    tables += [report.store_table(group) for group in (store, replicas) if group]
    tables += [report.ceiling_table(ceiling)] if ceiling else []
    markdown = "\n\n".join([*tables, "\n".join(f"- {n}" for n in notes)]) + "\n"
    (RESULTS / f"bench-{stamp}.md").write_text(markdown)
    if runs:
        report.plot(runs, RESULTS / f"bench-{stamp}.png")
    if ceiling:
        report.plot(
            ceiling,
            RESULTS / f"bench-{stamp}-ceiling.png",
            report.CEILING_PATHS,
            "gateway_cpu_ms_per_1000",
        )
    print(markdown)

    failures = [
        f"{r['scenario']} / {r['path']} ({r['errors']} errors: {r.get('error_codes', '?')})"
        for r in every
        if r["errors"]
    ]
    failures += [f"{r['scenario']} / {r['path']}" for r in every if r["tasks"] != r["expected"]]
    failures += [f"idle {r['connections']}" for r in idle if r["ready"] != r["connections"]]
    if soak and (soak["errors"] or soak["in_flight"] or soak["records"]):
        failures.append("soak: errors, or tasks left in the registry")
    if stall and stall["all_tasks"] != stall["expected"]:
        failures.append("stall: the well-behaved clients lost tasks")
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
