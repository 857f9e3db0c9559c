"""A real redis-server for every test that needs one: one per test session, on a free loopback port,
without persistence. ``make test`` installs it where it is missing (apt-get, as root); where it
cannot, the tests that need it skip and say why."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from bench import harness
from bench.harness import free_port
from tests.timing import MS

__all__ = ["INSTALL_HINT", "answers_ping", "free_port", "redis_url", "start_redis", "stop_redis"]

INSTALL_HINT = (
    "redis-server is not on PATH: `make test` installs it (apt-get install redis-server) when "
    "run as root on Debian; elsewhere install it to run the Redis store tests"
)


def answers_ping(port: int) -> bool:
    return harness.answers_ping(port, 100 * MS)


def start_redis(
    binary: str, *extra: str, port: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Started and answering PING, or pytest fails saying why (three ports tried, or the one
    given: a restart). ``extra``: more options (a ``--dir`` to keep a snapshot in)."""
    for _ in range(3):  # a free port can be taken between the probe and the bind
        port = port or free_port()
        # fmt: off
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        # fmt: on
        deadline = time.monotonic() + 5000 * MS
        while server.poll() is None and time.monotonic() < deadline:
            if answers_ping(port):
                return server, port
            time.sleep(20 * MS)
        stop_redis(server)
    pytest.fail("redis-server did not start answering PING on a loopback port (3 tries)")


def stop_redis(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=3000 * MS)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=3000 * MS)
    if server.stderr is not None:
        server.stderr.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``redis://127.0.0.1:<port>/0`` of a redis-server that lives for the session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(INSTALL_HINT)
    server, port = start_redis(binary)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_redis(server)
