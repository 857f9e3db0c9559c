"""``tenebra serve --workers N`` as a user runs it: a real supervisor and its workers on loopback,
against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websockets

from gateway.workers import MAX_RESTARTS_PER_MINUTE
from tests.gateway.conftest import task, until
from tests.redis_server import free_port
from tests.timing import MS

DEMO = "workers-demo-key"
WORKER_LINE = re.compile(r"^tenebra: worker (\d+) \(pid (\d+)\) listening on (\S+)$")


@dataclass
class Served:
    process: asyncio.subprocess.Process
    port: int
    stderr: Path
    pids: dict[int, int] = field(default_factory=dict)  # worker number: pid
    url: str = ""

    async def line(self, within: float = 60000 * MS) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), within)
        assert raw, f"stdout closed; stderr: {self.stderr.read_text()[-2000:]}"
        return raw.decode().rstrip("\n")

    async def worker_line(self) -> tuple[int, int]:
        """The next "worker N (pid P) listening" line, other lines skipped."""
        while True:
            match = WORKER_LINE.match(await self.line())
            if match:
                assert match.group(3) == self.url or not self.url
                return int(match.group(1)), int(match.group(2))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENEBRA_STORE_")}
    env.pop("RUNWARE_API_KEY", None)  # the shared local provider, whatever the shell has
    return {**env, **extra}


async def _end(process: asyncio.subprocess.Process) -> None:
    """Stop what a failed test left running, bounded (the workers die with the supervisor)."""
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 30000 * MS)
    except TimeoutError:
        process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 5000 * MS)


@contextlib.asynccontextmanager
async def serving(redis_url: str, tmp_path: Path, *flags: str) -> AsyncIterator[Served]:
    """``tenebra serve --workers N`` on a free port, once it says it listens."""
    port = free_port()
    stderr = tmp_path / "serve.err"
    with stderr.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--workers", "2",
            "--port", str(port), "--demo-key", DEMO, *flags,
            stdout=asyncio.subprocess.PIPE, stderr=err,
            env=_env(TENEBRA_STORE_URL=redis_url, TENEBRA_SERVER_DRAIN_DEADLINE="2"),
        )  # fmt: skip
    served = Served(process, port, stderr)
    try:
        while True:
            line = await served.line()
            if match := WORKER_LINE.match(line):
                served.pids[int(match.group(1))] = int(match.group(2))
                continue
            assert line.startswith("tenebra: listening on "), line
            served.url = line.rsplit(" ", 1)[1]
            break
        assert sorted(served.pids) == [1, 2]
        assert served.url == f"ws://127.0.0.1:{port}/v1"
        assert await served.line() == f"tenebra: demo API key: {DEMO}"
        assert await served.line() == "tenebra: local provider: synthetic images, no cost"
        yield served
    finally:
        await _end(process)


async def _authenticated(url: str, key: str = DEMO) -> Any:
    ws = await websockets.connect(url, max_size=None, open_timeout=10000 * MS)
    await ws.send(json.dumps([{"taskType": "authentication", "apiKey": key}]))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 10000 * MS))
    assert reply["data"][0]["taskType"] == "authentication", reply
    return ws


async def _run_task(ws: Any) -> dict[str, Any]:
    sent = task()
    await ws.send(json.dumps([sent]))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 60000 * MS))
    assert "errors" not in reply, reply
    (item,) = reply["data"]
    assert item["taskUUID"] == sent["taskUUID"] and item["imageUUID"], item
    return dict(item)


def _owners(port: int, pids: dict[int, int]) -> dict[int, int]:
    """Each established server-side connection on ``port``, by the client's port: the worker
    number holding it (Linux: /proc)."""
    by_inode: dict[str, int] = {}
    for number, pid in pids.items():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    by_inode[target[8:-1]] = number
    owners: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for row in Path(table).read_text().splitlines()[1:]:
                cells = row.split()
                local, remote, state, inode = cells[1], cells[2], cells[3], cells[9]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode in by_inode:
                    owners[int(remote.rsplit(":", 1)[1], 16)] = by_inode[inode]
    return owners


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and " Z " in Path(f"/proc/{pid}/stat").read_text()


pytestmark = pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="which worker holds a socket is read from /proc"
)


async def test_two_workers_share_the_port_and_stop_on_sigterm(
    redis_url: str, tmp_path: Path
) -> None:
    async with serving(redis_url, tmp_path) as served:
        clients = [await _authenticated(served.url) for _ in range(20)]
        try:
            owners = _owners(served.port, served.pids)
            by_worker: dict[int, list[Any]] = {1: [], 2: []}
            for ws in clients:
                by_worker[owners[ws.local_address[1]]].append(ws)
            # SO_REUSEPORT hashes each connection to a listener: with 20, both get some but
            # for a chance of 2 in a million
            assert by_worker[1] and by_worker[2], {n: len(c) for n, c in by_worker.items()}
            picked = by_worker[1][:3] + by_worker[2][:3]
            items = await asyncio.gather(*(_run_task(ws) for ws in picked))
            assert len({item["imageUUID"] for item in items}) == 6
            assert all(item["imageURL"].startswith("http://127.0.0.1:") for item in items)
        finally:
            for ws in clients:
                await ws.close()
        served.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.process.wait(), 30000 * MS) == 0
        for pid in served.pids.values():
            assert _gone(pid), pid


async def test_a_killed_worker_is_restarted_and_the_port_still_serves(
    redis_url: str, tmp_path: Path
) -> None:
    async with serving(redis_url, tmp_path) as served:
        os.kill(served.pids[1], signal.SIGKILL)
        number, pid = await served.worker_line()
        assert number == 1 and pid != served.pids[1]
        said = served.stderr.read_text()
        assert f"worker 1 (pid {served.pids[1]}) was killed by SIGKILL; restarting it" in said
        served.pids[1] = pid
        clients = [await _authenticated(served.url) for _ in range(10)]
        try:
            assert set(_owners(served.port, served.pids).values()) <= {1, 2}
            await _run_task(clients[0])
        finally:
            for ws in clients:
                await ws.close()
        served.process.send_signal(signal.SIGINT)  # Ctrl-C: the workers drain as on SIGTERM
        assert await asyncio.wait_for(served.process.wait(), 30000 * MS) == 0
        assert all(_gone(pid) for pid in served.pids.values())


async def test_a_worker_that_keeps_dying_stops_everything(redis_url: str, tmp_path: Path) -> None:
    async with serving(redis_url, tmp_path) as served:
        for _ in range(MAX_RESTARTS_PER_MINUTE):
            os.kill(served.pids[2], signal.SIGKILL)
            number, served.pids[2] = await served.worker_line()
            assert number == 2
        os.kill(served.pids[2], signal.SIGKILL)
        assert await asyncio.wait_for(served.process.wait(), 30000 * MS) == 1
        said = served.stderr.read_text()
        assert "tenebra serve: stopping: worker 2 was killed by SIGKILL" in said
        assert f"at most {MAX_RESTARTS_PER_MINUTE} restarts a minute" in said
        assert _gone(served.pids[1])


async def test_sighup_reloads_the_tenants_of_every_worker(redis_url: str, tmp_path: Path) -> None:
    config = tmp_path / "tenebra.toml"
    config.write_text('[tenants.studio]\nkeys = ["studio-1"]\n')
    async with serving(redis_url, tmp_path, "--config", str(config)) as served:
        config.write_text('[tenants.studio]\nkeys = ["studio-1", "studio-2"]\n')
        served.process.send_signal(signal.SIGHUP)
        await until(lambda: served.stderr.read_text().count('"tenants reloaded"') == 2)
        clients = [await _authenticated(served.url, "studio-2") for _ in range(20)]
        try:
            assert set(_owners(served.port, served.pids).values()) == {1, 2}
        finally:
            for ws in clients:
                await ws.close()


async def _refused(*flags: str, env: dict[str, str]) -> bytes:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--workers", "2", *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), 30000 * MS)
    finally:
        await _end(process)
    assert process.returncode == 2, err
    assert b"listening" not in out
    return err


async def test_workers_without_a_store_are_refused() -> None:
    err = await _refused("--port", str(free_port()), env=_env())
    assert b"--workers 2 needs a shared store" in err
    assert b"store.url" in err and b"TENEBRA_STORE_URL" in err


async def test_workers_on_port_0_are_refused(redis_url: str) -> None:
    err = await _refused("--port", "0", env=_env(TENEBRA_STORE_URL=redis_url))
    assert b"needs a fixed port" in err


async def test_workers_must_be_at_least_one() -> None:
    err = await _refused("--workers", "0", env=_env())
    assert b"must be at least 1" in err
