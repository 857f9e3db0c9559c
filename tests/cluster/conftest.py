"""Replicas as they run in production (issue 13): every test here starts real processes on free
loopback ports: its own redis-server (one it can SIGKILL and start again on the same port), a
standalone ``tenebra provider`` and two ``tenebra serve`` gateways, A and B, sharing that Redis.
Every process is stopped in a finally block; the tail of each one's output is printed at
teardown, which pytest shows only for a test that failed.

The directory is skipped, saying why, where redis-server is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.protocol.conftest import image_task
from tests.redis_server import INSTALL_HINT, answers_ping, free_port, start_redis, stop_redis
from tests.timing import MS

PROVIDER_KEY = "cluster-provider-key"
OPEN_KEY = "cluster-open-key"  # tenant "open": no limits
LIMITED_KEY = "cluster-limited-key"  # tenant "limited": rate 2/s, burst 4
RATE, BURST = 2.0, 4
LEASE = 1000 * MS  # store.lease: a killed replica is taken over this long after its last renewal

Item = tuple[str, dict[str, Any]]  # ("data" | "errors", the item)

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test of this directory, with the reason, where redis-server is missing."""
    if shutil.which("redis-server") is not None:
        return
    skip = pytest.mark.skip(reason=INSTALL_HINT)
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)


def task(**overrides: Any) -> dict[str, Any]:
    """A valid 1K imageInference task (fresh taskUUID), ``overrides`` applied."""
    return image_task(**{"width": 1024, "height": 1024, **overrides})


class Deadline:
    """A bounded wait: ``left()`` is the time remaining, and fails the test once none is."""

    def __init__(self, seconds: float, what: str) -> None:
        self.end = time.monotonic() + seconds
        self.what = what

    def left(self) -> float:
        left = self.end - time.monotonic()
        assert left > 0, f"not in time: {self.what}"
        return left

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.end


# --------------------------------------------------------------------------- redis-server


class RedisServer:
    """A redis-server of one test, on one port for its whole life: killed and started again
    there, so that the gateways' store.url stays right."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip(INSTALL_HINT)
        self.binary = binary
        self.process, self.port = start_redis(binary)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """SIGKILL: no goodbye, and (no persistence) every key gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5000 * MS)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def _start_on_port(self) -> None:
        # fmt: off
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
        # fmt: on
        deadline = time.monotonic() + 5000 * MS
        while time.monotonic() < deadline:  # the port may linger a moment after the kill
            self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            while self.process.poll() is None and time.monotonic() < deadline:
                if answers_ping(self.port):
                    return
                time.sleep(20 * MS)
            stop_redis(self.process)
            time.sleep(50 * MS)
        pytest.fail(f"redis-server did not start again on port {self.port}")

    async def restart(self) -> None:
        """Started again on the same port, answering PING (empty: it kept nothing)."""
        self.kill()
        await asyncio.to_thread(self._start_on_port)

    async def start_again(self) -> None:
        """After :meth:`kill`: started on the same port."""
        await asyncio.to_thread(self._start_on_port)

    def stop(self) -> None:
        stop_redis(self.process)


# --------------------------------------------------------------------------- processes


def _base_env() -> dict[str, str]:
    """This environment without any tenebra or Runware setting the shell may have."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TENEBRA_", "RUNWARE_")) or k == "TENEBRA_TESTS_TIME_FACTOR"
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Proc:
    """A tenebra process (provider or gateway), its output in files."""

    name: str
    process: asyncio.subprocess.Process
    out: Path
    err: Path
    port: int
    url: str = ""

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def output(self, chars: int = 6000) -> str:
        parts = []
        for path in (self.out, self.err):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                parts.append(f"--- {self.name} {path.name} (last {chars} chars)\n{text[-chars:]}")
        return "\n".join(parts)

    async def kill(self) -> None:
        """SIGKILL, and reaped."""
        if self.running:
            self.process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 5000 * MS)

    async def stop(self, within: float = 5000 * MS) -> int:
        """SIGTERM, then SIGKILL past ``within``; the exit status."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), within)
            except TimeoutError:
                self.process.send_signal(signal.SIGKILL)
        return await asyncio.wait_for(self.process.wait(), 5000 * MS)


async def spawn(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    directory: Path,
    listening: str,
    port: int,
) -> Proc:
    """Started, once a stdout line starts with ``listening`` (bounded); the URL it names."""
    out, err = directory / f"{name}.out", directory / f"{name}.err"
    with out.open("wb") as out_file, err.open("wb") as err_file:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=out_file, stderr=err_file, env=dict(env)
        )
    proc = Proc(name, process, out, err, port)
    deadline = time.monotonic() + 20000 * MS
    try:
        while time.monotonic() < deadline:
            for line in out.read_text(errors="replace").splitlines():
                if line.startswith(listening):
                    proc.url = line.rsplit(" ", 1)[1]
                    return proc
            if not proc.running:
                break
            await asyncio.sleep(20 * MS)
    except BaseException:
        await proc.stop()
        raise
    await proc.stop()
    pytest.fail(f"{name} did not say {listening!r} (exit {process.returncode})\n{proc.output()}")


async def start_provider(directory: Path, *flags: str) -> Proc:
    """``tenebra provider`` on a free loopback port, one render process, ``flags`` its faults."""
    port = free_port()
    # fmt: off
    argv = [sys.executable, "-m", "gateway.cli", "provider", "--host", "127.0.0.1",
            "--port", str(port), "--key", PROVIDER_KEY, "--workers", "1", *flags]
    # fmt: on
    return await spawn(
        "provider", argv, _base_env(), directory, "tenebra provider: listening on ", port
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def to_toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """Tables of scalars (a dotted name for a nested table: ``tenants.open``)."""
    lines: list[str] = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


def gateway_settings(**delivery: Any) -> dict[str, dict[str, Any]]:
    """The gateways' configuration file: short deadlines, loopback webhooks allowed, the two
    tenants; ``delivery`` overrides the [delivery] table."""
    return {
        "server": {"drain_deadline": 500 * MS, "auth_timeout": 10000 * MS},
        "provider": {
            "ping_interval": 1000 * MS,
            "pong_timeout": 2000 * MS,
            "auth_timeout": 2000 * MS,
            "backoff_initial": 50 * MS,
            "backoff_max": 500 * MS,
            "recovery_interval": 200 * MS,
        },
        "tasks": {"timeout": 60000 * MS},
        "delivery": {
            "allow": ["127.0.0.1/32"],
            "timeout": 2000 * MS,
            "attempts": 5,
            "backoff_initial": 200 * MS,
            "backoff_max": 1000 * MS,
            **delivery,
        },
        "store": {"timeout": 500 * MS},
        "tenants.open": {"keys": [OPEN_KEY]},
        "tenants.limited": {"keys": [LIMITED_KEY], "rate": RATE, "burst": BURST},
    }


async def readyz(port: int) -> int | None:
    """The status of ``GET /readyz``; None when it does not answer."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2000 * MS)) as http,
            http.get(f"http://127.0.0.1:{port}/readyz") as response,
        ):
            return response.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def wait_ready(proc: Proc, within: float = 15000 * MS) -> None:
    """Until the gateway's /readyz says 200 (bounded)."""
    deadline = time.monotonic() + within
    status: int | None = None
    while time.monotonic() < deadline:
        status = await readyz(proc.port)
        if status == 200:
            return
        assert proc.running, f"gateway {proc.name} exited\n{proc.output()}"
        await asyncio.sleep(50 * MS)
    raise AssertionError(f"gateway {proc.name}: /readyz {status}, not 200 in time")


@dataclass
class Cluster:
    redis: RedisServer
    provider: Proc
    config: Path
    directory: Path
    gateways: dict[str, Proc] = field(default_factory=dict)
    clients: list[Client] = field(default_factory=list)

    def gateway_env(self, name: str, port: int) -> dict[str, str]:
        assert self.provider.url.startswith("ws://127.0.0.1:"), self.provider.url
        return {
            **_base_env(),
            "TENEBRA_SERVER_HOST": "127.0.0.1",
            "TENEBRA_SERVER_PORT": str(port),
            "TENEBRA_PROVIDER_URL": self.provider.url,
            "RUNWARE_API_KEY": PROVIDER_KEY,
            "TENEBRA_STORE_URL": self.redis.url,
            "TENEBRA_STORE_REPLICA": name,
            "TENEBRA_STORE_LEASE": repr(LEASE),
        }

    async def start_gateway(self, name: str) -> Proc:
        """``tenebra serve`` as replica ``name``, listening and ready."""
        port = free_port()
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)]
        env = self.gateway_env(name, port)
        listening = "tenebra: listening on "
        proc = await spawn(f"gateway-{name}", argv, env, self.directory, listening, port)
        self.gateways[name] = proc
        assert proc.url == f"ws://127.0.0.1:{port}/v1", proc.url
        await wait_ready(proc)
        return proc

    def url(self, name: str) -> str:
        return self.gateways[name].url

    async def client(self, name: str, key: str = OPEN_KEY, session: str | None = None) -> Client:
        """An authenticated WebSocket to gateway ``name``; closed at the end of the test."""
        client = await Client.open(self.url(name), name)
        self.clients.append(client)
        await client.auth(key, session)
        return client

    async def kill(self, name: str) -> None:
        await self.gateways[name].kill()

    def output(self) -> str:
        procs = [self.provider, *self.gateways.values()]
        return "\n".join(proc.output() for proc in procs)


@contextlib.asynccontextmanager
async def make_cluster(
    directory: Path, provider_flags: Iterable[str] = ("--fast",), **delivery: Any
) -> AsyncIterator[Cluster]:
    """redis-server, a provider and gateways A and B, all stopped on the way out."""
    redis = RedisServer()
    provider: Proc | None = None
    cluster: Cluster | None = None
    try:
        provider = await start_provider(directory, *provider_flags)
        config = directory / "gateway.toml"
        config.write_text(to_toml(gateway_settings(**delivery)))
        cluster = Cluster(redis, provider, config, directory)
        await cluster.start_gateway("a")
        await cluster.start_gateway("b")
        yield cluster
    finally:
        if cluster is not None:
            for client in cluster.clients:
                await client.close()
            for proc in cluster.gateways.values():
                await proc.stop()
            print(cluster.output())
        elif provider is not None:
            print(provider.output())
        if provider is not None:
            await provider.stop()
        redis.stop()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A fast provider (no rendering), A and B on one redis-server."""
    async with make_cluster(tmp_path) as instance:
        yield instance


# --------------------------------------------------------------------------- the client


class Client:
    """A raw client of Runware's WebSocket protocol, for reading frames item by item."""

    def __init__(self, ws: ClientConnection, name: str) -> None:
        self.ws = ws
        self.name = name
        self.session = ""
        self.backlog: list[Item] = []  # items read while looking for others

    @classmethod
    async def open(cls, url: str, name: str) -> Client:
        ws = await connect(url, max_size=None, open_timeout=10000 * MS, ping_interval=None)
        return cls(ws, name)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 2000 * MS)

    async def send(self, *tasks: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(list(tasks)))

    async def frame(self, within: float) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), within)
        assert isinstance(raw, str), raw
        frame: dict[str, Any] = json.loads(raw)
        return frame

    async def items(self, within: float) -> list[Item]:
        """The backlog, or the next frame's items."""
        if self.backlog:
            items, self.backlog = self.backlog, []
            return items
        frame = await self.frame(within)
        items = [("data", item) for item in frame.get("data", [])]
        items += [("errors", item) for item in frame.get("errors", [])]
        assert items, f"{self.name}: a frame with no items: {frame}"
        return items

    async def auth(self, key: str, session: str | None = None) -> str:
        """Authenticated: the connectionSessionUUID of the reply (the next frame)."""
        message: dict[str, Any] = {"taskType": "authentication", "apiKey": key}
        if session is not None:
            message["connectionSessionUUID"] = session
        await self.send(message)
        reply = await self.frame(10000 * MS)
        assert "errors" not in reply, f"{self.name}: authentication refused: {reply}"
        item = reply["data"][0]
        assert item["taskType"] == "authentication", reply
        self.session = str(item["connectionSessionUUID"])
        return self.session

    async def answer(self, task_uuid: str, within: float = 10000 * MS) -> Item:
        """The first item naming ``task_uuid``; others read meanwhile stay in the backlog."""
        deadline = Deadline(within, f"{self.name}: an answer for {task_uuid}")
        kept: list[Item] = []
        try:
            while True:
                items = await self.items(deadline.left())
                for index, (kind, item) in enumerate(items):
                    if item.get("taskUUID") == task_uuid:
                        kept += items[index + 1 :]
                        return kind, item
                    kept.append((kind, item))
        finally:
            self.backlog = kept + self.backlog

    async def get_response(self, task_uuid: str, within: float = 5000 * MS) -> list[Item]:
        """One getResponse: the items of its answer (use on a socket where no other answer
        names the task)."""
        await self.send({"taskType": "getResponse", "taskUUID": task_uuid})
        deadline = Deadline(within, f"{self.name}: getResponse of {task_uuid}")
        while True:
            items = await self.items(deadline.left())
            mine = [(kind, item) for kind, item in items if item.get("taskUUID") == task_uuid]
            if mine:
                return mine

    async def poll_done(
        self, task_uuid: str, results: int, within: float = 15000 * MS
    ) -> list[dict[str, Any]]:
        """getResponse until ``results`` generations succeeded; fails with the last answer
        when an error comes or the time runs out."""
        deadline = Deadline(within, f"{self.name}: {results} results of {task_uuid}")
        last: list[Item] = []
        while not deadline.passed:
            last = await self.get_response(task_uuid, deadline.left())
            assert all(kind == "data" for kind, _ in last) or any(
                item.get("code") == "taskNotFound" for _, item in last
            ), f"{self.name}: getResponse {task_uuid}: {last}"
            done = [item for kind, item in last if kind == "data" and item.get("imageUUID")]
            if len(done) >= results and all(item.get("status") == "success" for item in done):
                return done
            await asyncio.sleep(100 * MS)
        raise AssertionError(f"{self.name}: getResponse {task_uuid} not done in time: {last}")

    async def drain(self, within: float) -> list[Item]:
        """Whatever arrives within ``within`` (the backlog first), until the socket closes."""
        got, self.backlog = self.backlog, []
        deadline = time.monotonic() + within
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            while (left := deadline - time.monotonic()) > 0:
                got += await self.items(left)
        return got


def new_uuid() -> str:
    return str(uuid.uuid4())
