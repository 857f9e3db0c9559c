"""``tenebra serve --workers N``: N gateway processes on one port, one supervisor over them.

Every worker binds the same host and port with SO_REUSEPORT, so the kernel spreads new
connections across them and one machine's cores are all used. Workers share nothing in memory,
so the supervisor refuses to start without ``store.url``: tasks, sessions and limits have to
live in the store they all use. Without a provider URL the supervisor runs one local provider
itself and hands every worker its URL and key, so that they share one render pool instead of
starting one each.

Workers are ``multiprocessing`` processes with the ``spawn`` context rather than
``tenebra serve`` subprocesses: the worker's entry is a function of this module (no hidden
command-line mode), the provider key and the demo key travel pickled through a pipe (never in
``ps`` or the environment), readiness comes back on a pipe of its own instead of parsed output,
and spawn (not fork) gives each a fresh interpreter, without a copy of the supervisor's event
loop and threads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gc
import multiprocessing
import os
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from gateway.provider.lifetime import die_with_parent

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.provider.server import LocalProvider

__all__ = ["MAX_RESTARTS_PER_MINUTE", "STOP_MARGIN", "serve_workers"]

MAX_RESTARTS_PER_MINUTE = 5  # a worker that dies at once after every start is not retried forever
# Past server.drain_deadline a worker still fails its open tasks (with a webhook grace of 1 s)
# and gives its clients a second to read their close: room for that before SIGKILL.
STOP_MARGIN = 10.0
START_DEADLINE = 60.0  # for every worker to listen: binding a socket takes no longer than that


@dataclass
class _Worker:
    index: int
    replica: str
    process: BaseProcess
    ready: bool = False
    url: str = ""


@dataclass
class _Event:
    kind: str  # "ready", "exited" or "signal"
    worker: _Worker | None = None
    url: str = ""
    signum: int = 0


@dataclass
class Supervisor:
    args: argparse.Namespace
    count: int
    base_replica: str
    deadline: float  # for the workers to stop after SIGTERM, before SIGKILL
    max_restarts: int = MAX_RESTARTS_PER_MINUTE
    workers: dict[int, _Worker] = field(default_factory=dict)
    restarts: deque[float] = field(default_factory=deque)
    events: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    incarnations: dict[int, int] = field(default_factory=dict)

    def spawn(self, index: int) -> _Worker:
        # A restarted worker is a new replica: the dead one's name has to expire in the store
        # (store.lease) so that its provider sessions and deliveries are taken over; a
        # successor under the same name would renew its lease without knowing what it held.
        incarnation = self.incarnations.get(index, 0)
        self.incarnations[index] = incarnation + 1
        replica = f"{self.base_replica}-w{index}" + (f"-r{incarnation}" if incarnation else "")
        context = multiprocessing.get_context("spawn")
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker_main,
            args=(self.args, replica, writer, os.getpid()),
            name=f"tenebra-worker-{index}",
        )
        process.start()
        writer.close()  # the worker holds the only writer: its death is an EOF here
        worker = _Worker(index, replica, process)
        self.workers[index] = worker
        loop = asyncio.get_running_loop()
        loop.add_reader(reader.fileno(), self._on_ready, worker, reader)
        loop.add_reader(process.sentinel, self._on_exit, worker)
        return worker

    def _on_ready(self, worker: _Worker, reader: Connection) -> None:
        asyncio.get_running_loop().remove_reader(reader.fileno())
        try:
            url = reader.recv()
        except (EOFError, OSError):
            url = None  # died before listening: its exit says how
        reader.close()
        if isinstance(url, str):
            self.events.put_nowait(_Event("ready", worker, url=url))

    def _on_exit(self, worker: _Worker) -> None:
        asyncio.get_running_loop().remove_reader(worker.process.sentinel)
        worker.process.join(1.0)  # it has exited: this only reaps it
        self.events.put_nowait(_Event("exited", worker))

    def on_signal(self, signum: int) -> None:
        self.events.put_nowait(_Event("signal", signum=signum))

    def forward(self, signum: int) -> None:
        for worker in self.workers.values():
            if worker.process.exitcode is None and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signum)

    def live(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.process.exitcode is None]

    async def start(self) -> str | None:
        """Every worker listening: None; else why not (the workers are stopped by ``stop``)."""
        for index in range(1, self.count + 1):
            self.spawn(index)
        ready = 0
        ends = time.monotonic() + START_DEADLINE
        while ready < self.count:
            try:
                async with asyncio.timeout(max(0.0, ends - time.monotonic())):
                    event = await self.events.get()
            except TimeoutError:
                return f"not every worker listened within {START_DEADLINE:g} s"
            if event.kind == "signal":
                return "stopped by a signal while starting"
            assert event.worker is not None
            if event.kind == "exited":
                return f"worker {event.worker.index} {_describe_exit(event.worker)} while starting"
            self._listening(event.worker, event.url)
            ready += 1
        return None

    def _listening(self, worker: _Worker, url: str) -> None:
        worker.ready, worker.url = True, url
        print(
            f"tenebra: worker {worker.index} (pid {worker.process.pid}) listening on {url}",
            flush=True,
        )

    async def run(self) -> str | None:
        """Until a signal (None) or too many restarts (why)."""
        while True:
            event = await self.events.get()
            if event.kind == "signal":
                return None
            assert event.worker is not None
            if event.kind == "ready":
                self._listening(event.worker, event.url)
                continue
            worker = event.worker
            now = time.monotonic()
            while self.restarts and self.restarts[0] <= now - 60.0:
                self.restarts.popleft()
            if len(self.restarts) >= self.max_restarts:
                return (
                    f"worker {worker.index} {_describe_exit(worker)}, the "
                    f"{len(self.restarts) + 1}th worker death within a minute (at most "
                    f"{self.max_restarts} restarts a minute)"
                )
            self.restarts.append(now)
            print(
                f"tenebra: worker {worker.index} (pid {worker.process.pid}) "
                f"{_describe_exit(worker)}; restarting it",
                file=sys.stderr,
                flush=True,
            )
            self.spawn(worker.index)

    async def stop(self) -> bool:
        """SIGTERM to every worker, SIGKILL past the deadline: True when all ended cleanly."""
        self.forward(signal.SIGTERM)
        ends = time.monotonic() + self.deadline
        while self.live():
            try:
                async with asyncio.timeout(max(0.0, ends - time.monotonic())):
                    event = await self.events.get()
            except TimeoutError:
                for worker in self.live():
                    print(
                        f"tenebra: worker {worker.index} (pid {worker.process.pid}) still "
                        f"running {self.deadline:g} s after SIGTERM: killed",
                        file=sys.stderr,
                        flush=True,
                    )
                    worker.process.kill()
                    worker.process.join(5.0)
                return False
            if event.kind == "signal":  # a second one: the workers stop at once (exit 1)
                self.forward(signal.SIGTERM)
        return all(_ended_cleanly(w) for w in self.workers.values())


def _ended_cleanly(worker: _Worker) -> bool:
    code = worker.process.exitcode
    # one still starting has no handler yet: SIGTERM ends it by default, and nothing was lost
    return code == 0 or (not worker.ready and code == -signal.SIGTERM)


def _describe_exit(worker: _Worker) -> str:
    code = worker.process.exitcode
    if code is None:
        return "is still running"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


async def serve_workers(args: argparse.Namespace, count: int) -> int:
    """The supervisor's life: checks, the shared provider, the workers, the stop."""
    from gateway.cli import no_local_provider, serve_config
    from gateway.config import ConfigError
    from gateway.log import configure_logging

    configure_logging(args.log_level)
    try:
        config = serve_config(args)
    except ConfigError as exc:
        print(f"tenebra serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if config.store.url is None:
        print(
            f"tenebra serve: --workers {count} needs a shared store: set store.url "
            "(TENEBRA_STORE_URL=redis://host:6379/0); without it each worker would hold its own "
            "tasks, sessions and limits",
            file=sys.stderr,
        )
        return 2
    if config.server.port == 0:
        print(
            f"tenebra serve: --workers {count} needs a fixed port (--port, server.port or "
            "TENEBRA_SERVER_PORT): port 0 would give each worker a port of its own",
            file=sys.stderr,
        )
        return 2
    worker_args = copy.copy(args)
    demo_key = config.demo_key
    if not config.tenants and not demo_key:
        demo_key = worker_args.demo_key = secrets.token_urlsafe(16)  # one for every worker
    provider: LocalProvider | None = None
    if config.provider.url is None:
        try:
            provider, key = await _start_local_provider(config)
        except ModuleNotFoundError as exc:
            return no_local_provider(exc)
        worker_args.provider_url, worker_args.provider_key = provider.url, key
    supervisor = Supervisor(
        worker_args,
        count,
        config.store.replica or socket.gethostname(),
        deadline=config.server.drain_deadline + STOP_MARGIN,
    )
    loop = asyncio.get_running_loop()
    _install_signals(loop, supervisor)
    try:
        failure = await supervisor.start()
        if failure is None:
            print(f"tenebra: listening on {supervisor.workers[1].url}", flush=True)
            if demo_key:
                print(f"tenebra: demo API key: {demo_key}", flush=True)
            if provider is not None:
                cost = "catalogue prices" if config.provider.local_cost else "no cost"
                print(f"tenebra: local provider: synthetic images, {cost}", flush=True)
            failure = await supervisor.run()
        clean = await supervisor.stop()
    finally:
        if provider is not None:  # after the workers: they drain against it
            await provider.stop()
    if failure is not None:
        print(f"tenebra serve: stopping: {failure}", file=sys.stderr, flush=True)
        return 1
    return 0 if clean else 1


async def _start_local_provider(config: Config) -> tuple[LocalProvider, str]:
    """As ``Gateway.start`` starts its embedded one, once for every worker."""
    from gateway.provider.server import LocalProvider, ProviderConfig

    key = secrets.token_urlsafe(24)
    provider = LocalProvider(
        ProviderConfig(
            keys=frozenset({key}),
            priced=config.provider.local_cost,
            allow=list(config.delivery.allow),
        )
    )
    await provider.start("127.0.0.1", 0)
    return provider, key


def _install_signals(loop: asyncio.AbstractEventLoop, supervisor: Supervisor) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, supervisor.on_signal, signum)
    with contextlib.suppress(NotImplementedError):  # tenants and keys again, in every worker
        loop.add_signal_handler(signal.SIGHUP, supervisor.forward, signal.SIGHUP)


# --------------------------------------------------------------------------- in a worker


def _worker_main(
    args: argparse.Namespace, replica: str, ready: Connection, supervisor: int
) -> None:
    _die_with_supervisor(supervisor)
    # Ctrl-C reaches the whole process group; the supervisor forwards it as SIGTERM, and a
    # second signal would mean "stop at once" here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from gateway.cli import _run

    sys.exit(_run(_serve_worker(args, replica, ready, supervisor)))


def _die_with_supervisor(supervisor: int) -> None:
    die_with_parent()
    if os.getppid() != supervisor:  # it died before the line above took effect
        sys.exit(1)


async def _serve_worker(
    args: argparse.Namespace, replica: str, ready: Connection, supervisor: int
) -> int:
    from gateway.app import Gateway
    from gateway.cli import raise_open_files_limit, serve_config
    from gateway.config import ConfigError
    from gateway.log import configure_logging

    configure_logging(args.log_level)
    env = {**os.environ, "TENEBRA_STORE_REPLICA": replica}

    def load() -> Config:
        return serve_config(args, env)

    try:
        config = load()
    except ConfigError as exc:  # the file changed since the supervisor read it
        print(f"tenebra serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    gateway = Gateway(config, reuse_port=True)
    await gateway.start()
    raise_open_files_limit()
    gc.freeze()  # as in one process: what start-up made lives as long as the worker
    gc.set_threshold(10_000, 10, 10)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(1)
        stop.set()

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, on_signal)
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_tenants, load)
    if gateway.cluster is not None:  # taken over by another replica: restarted anew
        gateway.cluster.on_fenced.append(stop.set)
    watch = asyncio.create_task(_watch_supervisor(supervisor, stop.set))
    ready.send(gateway.url)
    ready.close()
    await stop.wait()
    watch.cancel()
    await gateway.stop()
    return 1 if gateway.fenced.is_set() else 0


async def _watch_supervisor(supervisor: int, stop: Callable[[], None]) -> None:
    """Where PR_SET_PDEATHSIG is missing (not Linux, or the helper not importable), a worker
    still drains and ends once its supervisor is gone, within a second."""
    while os.getppid() == supervisor:  # noqa: ASYNC110 (no event says a parent died)
        await asyncio.sleep(1.0)
    stop()
