"""The ``tenebra`` command as a user runs it: a real process on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from gateway.cli import build_parser, main, serve_config
from gateway.config import RUNWARE_URL, ConfigError
from tests.timing import MS

# `python -c SLIM serve ...` runs the command as on `pip install tenebra`, without the [provider]
# and [test] extras: importing numpy, PIL or websockets fails, as it would there.
SLIM = (
    "import runpy, sys; sys.modules.update(numpy=None, PIL=None, websockets=None); "
    "runpy.run_module('gateway.cli', run_name='__main__')"
)


async def _end(process: asyncio.subprocess.Process) -> None:
    """Stop a command a failed test left running, without hanging the suite.

    SIGTERM first: a killed server leaves its render workers behind holding its stdout, and
    asyncio's wait() (3.11) returns only when every pipe is closed, so after a kill the wait is
    bounded instead.
    """
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 30000 * MS)
    except TimeoutError:
        process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 5000 * MS)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"tenebra {importlib.metadata.version('tenebra')}"


def test_a_provider_key_flag_without_a_url_means_runware() -> None:
    """Never rendered locally with a key given: flags resolve like the file and environment."""
    args = build_parser().parse_args(["serve", "--provider-key", "rk"])
    config = serve_config(args, env={})
    assert (config.provider.url, config.provider.api_key) == (RUNWARE_URL, "rk")
    args = build_parser().parse_args(["serve", "--local-cost", "--port", "9000"])
    config = serve_config(args, env={})
    assert config.provider.url is None and config.provider.local_cost is True
    assert config.server.port == 9000


def test_flags_are_range_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"^server\.port: Expected `int` <= 65535"):
        serve_config(build_parser().parse_args(["serve", "--port", "70000"]), env={})


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_serve_with_a_provider_url_needs_no_numpy_or_pillow() -> None:
    """The gateway alone (``pip install tenebra``) starts; its link retries a closed port."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SLIM, "serve", "--port", "0", "--demo-key", "dk",
        "--provider-url", f"ws://127.0.0.1:{_closed_port()}/v1", "--provider-key", "pk",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30000 * MS)).decode()
        assert line.startswith("tenebra: listening on ws://127.0.0.1:"), line
        process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(process.communicate(), 30000 * MS)
        assert process.returncode == 0
        assert b"local provider" not in out
    finally:
        await _end(process)


async def test_serve_without_the_provider_extra_says_how_to_install_it() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SLIM, "serve", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, stderr = await asyncio.wait_for(process.communicate(), 30000 * MS)
    assert process.returncode == 2
    assert b"pip install 'tenebra[provider]'" in stderr
    assert b"listening" not in out


async def test_tenebra_provider_runs_standalone_with_faults() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "provider", "--port", "0", "--key", "k1",
        "--latency-ms", "5", "--fast", "--control-key", "ck1",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30000 * MS)).decode()
        assert "listening on ws://127.0.0.1:" in line
        url = line.rsplit(" ", 1)[1].strip()
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            await ws.send_str('[{"taskType":"authentication","apiKey":"k1"}]')
            reply = await ws.receive_json(timeout=10000 * MS)
            assert reply["data"][0]["taskType"] == "authentication"
            control = url.replace("ws://", "http://").replace("/v1", "/control/faults")
            async with http.get(control) as response:
                assert response.status == 401
            async with http.get(control, headers={"Authorization": "Bearer ck1"}) as response:
                faults = await response.json()
            assert faults["fast"] is True and faults["latency"]["ms"] == 5
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10000 * MS) == 0
    finally:
        await _end(process)


async def test_tenebra_provider_needs_a_key() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "provider", "--port", "0",
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30000 * MS)
    assert process.returncode == 2
    assert b"--key" in stderr


@pytest.mark.parametrize(
    ("flags", "says", "cost"),
    [
        ([], "no cost", b"cost: $0.000"),  # synthetic images are not billed
        (["--local-cost"], "catalogue prices", b"cost: $0.390"),
    ],
)
async def test_serve_then_generate_writes_pictures(
    tmp_path: Path, flags: list[str], says: str, cost: bytes
) -> None:
    """The README's quick start: `tenebra serve` on its embedded default, then `generate`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--demo-key", "demo-k",
        *flags, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30000 * MS)).decode()
        assert line.startswith("tenebra: listening on ws://127.0.0.1:")
        url = line.rsplit(" ", 1)[1].strip()
        assert (await process.stdout.readline()).decode().strip() == "tenebra: demo API key: demo-k"
        local = (await asyncio.wait_for(process.stdout.readline(), 30000 * MS)).decode()
        assert local.strip() == f"tenebra: local provider: synthetic images, {says}"
        generate = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "generate", "a saxophonist, spotlight, smoke",
            "-n", "2", "--size", "896x1200", "--format", "png", "--url", url,
            "--key", "demo-k", "--out", str(tmp_path),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(generate.communicate(), 120000 * MS)
        assert generate.returncode == 0, out
        files = sorted(tmp_path.glob("*.png"))  # noqa: ASYNC240 (a test's own temp dir)
        assert len(files) == 2
        assert all(Image.open(f).size == (896, 1200) for f in files)
        assert cost in out
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30000 * MS) == 0
    finally:
        await _end(process)


async def test_serve_refuses_bad_configuration(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nport = 'x'\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30000 * MS)
    assert process.returncode == 2
    assert b"invalid configuration: server.port" in stderr


async def test_a_second_sigterm_stops_the_drain_at_once() -> None:
    provider = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "provider", "--port", "0", "--key", "pk",
        "--fast", "--latency-ms", "20000", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    gateway = None
    try:
        assert provider.stdout is not None
        provider_url = (await provider.stdout.readline()).decode().rsplit(" ", 1)[1].strip()
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--demo-key", "dk",
            "--provider-url", provider_url, "--provider-key", "pk",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert gateway.stdout is not None
        url = (await gateway.stdout.readline()).decode().rsplit(" ", 1)[1].strip()
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            await ws.send_str('[{"taskType":"authentication","apiKey":"dk"}]')
            await ws.receive_json(timeout=10000 * MS)
            task = {
                "taskType": "imageInference",
                "taskUUID": "0b7a2d2e-4c1e-4d7e-9b8f-3a1c2d4e5f60",
                "model": "exactly:photo@extreme-contrast",
                "positivePrompt": "a long task",
            }
            await ws.send_json([task])
            await asyncio.sleep(500 * MS)
            gateway.send_signal(signal.SIGTERM)  # drains: the task has 20 s to go
            await asyncio.sleep(500 * MS)
            assert gateway.returncode is None
            started = asyncio.get_running_loop().time()
            gateway.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(gateway.wait(), 10000 * MS) == 1
            assert asyncio.get_running_loop().time() - started < 5000 * MS
    finally:
        for process in (provider, gateway):
            if process is not None:
                await _end(process)


async def test_provider_without_the_extra_says_how_to_install_it() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SLIM, "provider", "--port", "0", "--key", "k",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30000 * MS)
    assert process.returncode == 2
    assert b"pip install 'tenebra[provider]'" in stderr


def test_serve_raises_its_open_files_limit_to_the_hard_limit() -> None:
    import resource

    from gateway.cli import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here: nothing to raise to")
    try:
        if soft == hard and hard > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
