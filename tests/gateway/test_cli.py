"""The ``tenebra`` command as a user runs it: a real process on loopback."""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp

from tests.timing import MS


async def test_tenebra_provider_runs_standalone_with_faults() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "provider", "--port", "0", "--key", "k1",
        "--latency-ms", "5", "--fast",
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
                faults = await response.json()
            assert faults["fast"] is True and faults["latency"]["ms"] == 5
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10000 * MS) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_tenebra_provider_needs_a_key() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "provider", "--port", "0",
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30000 * MS)
    assert process.returncode == 2
    assert b"--key" in stderr
