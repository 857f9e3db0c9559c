"""The tenant table: hashed keys, key creation, and reload (in process and by SIGHUP)."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.cli import main
from gateway.clients import CLOSE_REVOKED
from gateway.config import Config, ConfigError, Tenant, load_config
from gateway.provider.server import LocalProvider
from gateway.tenants import TenantTable, forget_plain_keys, hash_key
from tests.gateway.conftest import KEY, connect, running, set_faults, task, until
from tests.gateway.test_cli import _end
from tests.gateway.test_clients import closed_with
from tests.timing import MS


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_keys_are_found_by_their_hash_and_the_plain_ones_forgotten() -> None:
    config = Config(
        tenants={
            "studio": Tenant(keys=["plain-key"], key_sha256=[sha("hashed-key").upper()]),
            "lab": Tenant(rate=2.5),
        },
        demo_key="demo-key",
    )
    table = TenantTable.from_config(config)
    forget_plain_keys(config)
    assert table.tenant_of("plain-key") == table.tenant_of("hashed-key") == "studio"
    assert table.tenant_of("demo-key") == "demo"
    assert table.tenant_of("plain-keY") is None and table.tenant_of("") is None
    assert config.tenants["studio"].keys == [] and config.demo_key is None
    assert "plain-key" not in repr(config) and "demo-key" not in repr(vars(table))
    assert set(config.tenants["studio"].key_sha256) == {sha("hashed-key").upper(), sha("plain-key")}
    assert table.policies["lab"].burst == 3  # the rate rounded up
    assert set(table.checked) == {"lab"}  # studio and demo have nothing to check per task


def test_a_key_and_its_hash_in_two_tenants_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(f'[tenants.a]\nkeys = ["k"]\n[tenants.b]\nkey_sha256 = ["{sha("k")}"]\n')
    with pytest.raises(ConfigError, match=r"tenants\.b\.key_sha256: key also belongs to a"):
        load_config(path, env={})
    for digest in ("not-hex", sha("k") + "\\n"):  # a digest with a newline: one never matched
        path.write_text(f'[tenants.a]\nkey_sha256 = ["{digest}"]\n')
        with pytest.raises(ConfigError, match=r"key_sha256\[0\]: Expected `str` matching regex"):
            load_config(path, env={})


def test_revoked_keys_and_tenants() -> None:
    old = TenantTable.from_config(
        Config(tenants={"a": Tenant(keys=["k1", "k2"]), "b": Tenant(keys=["k3"])})
    )
    new = TenantTable.from_config(Config(tenants={"a": Tenant(keys=["k2", "k4"])}))
    revoked = old.revoked_by(new)
    assert revoked.keys == {hash_key("k1"), hash_key("k3")}
    assert revoked.tenants == {"b"}
    assert not new.revoked_by(new)


def test_a_made_up_demo_key_survives_a_reload_without_tenants() -> None:
    started = TenantTable.from_config(Config(demo_key="made-up"))
    again = TenantTable.from_config(Config(), previous=started)
    assert again.tenant_of("made-up") == "demo"
    given = TenantTable.from_config(Config(tenants={"a": Tenant(keys=["k"])}), previous=started)
    assert given.tenant_of("made-up") is None  # tenants configured: no demo unless asked


def test_keys_create_prints_the_key_once_and_its_hash_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["keys", "create", "--tenant", "studio"]) == 0
    key, section, line = capsys.readouterr().out.splitlines()
    assert len(key) >= 40 and section == "[tenants.studio]"
    assert line == f'key_sha256 = ["{sha(key)}"]'
    assert main(["keys", "create", "--tenant", "the studio"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == '[tenants."the studio"]'


# --------------------------------------------------------------------------- reload


def write_config(path: Path, provider_url: str, tenants: str) -> None:
    path.write_text(
        f'[server]\nport = 0\ndrain_deadline = 0.5\n[provider]\nurl = "{provider_url}"\n'
        f'api_key = "{KEY}"\n{tenants}'
    )


async def authenticates(http: aiohttp.ClientSession, url: str, key: str) -> bool:
    client = await connect(http, url)
    try:
        await client.send({"taskType": "authentication", "apiKey": key})
        return "errors" not in await client.recv()
    finally:
        await client.ws.close()


async def test_reload_swaps_the_table_and_keeps_it_on_a_bad_file(
    provider: LocalProvider, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "tenebra.toml"
    write_config(path, provider.url, '[tenants.a]\nkeys = ["old"]\nmax_in_flight = 5\n')
    set_faults(provider, fast=True)
    async with running(load_config(path, env={})) as gateway:
        client = await connect(http, gateway.url)
        await client.auth("old")
        await client.send(task())
        assert "data" in await client.recv()
        assert gateway.pool.queue._tenants["a"].limits.max_in_flight == 5

        new = f'[tenants.a]\nkey_sha256 = ["{sha("new")}"]\nmax_in_flight = 2\nrate = 9.0\n'
        write_config(path, provider.url, new)
        revoked = gateway.reload_tenants(lambda: load_config(path, env={}))
        assert revoked is not None and revoked.keys == {hash_key("old")}
        assert await authenticates(http, gateway.url, "new")
        assert not await authenticates(http, gateway.url, "old")
        assert gateway.pool.queue._tenants["a"].limits.max_in_flight == 2  # reconfigured
        assert "a" in gateway.intake.checked  # its rate applies from the next task

        path.write_text("[tenants.a\nkeys = ")
        with capture_logs() as logs:
            assert gateway.reload_tenants(lambda: load_config(path, env={})) is None
        [entry] = [e for e in logs if e["log_level"] == "error"]
        assert entry["event"] == "tenants not reloaded: the configuration does not load"
        assert "tenebra.toml" in entry["error"]
        assert await authenticates(http, gateway.url, "new")  # the old table stands


async def test_sighup_lets_a_new_key_in_without_a_restart(tmp_path: Path) -> None:
    """``tenebra serve`` as run: a key made by ``tenebra keys create`` works after SIGHUP."""
    path = tmp_path / "tenebra.toml"
    path.write_text(f'[server]\nport = 0\n[tenants.studio]\nkey_sha256 = ["{sha("old")}"]\n')
    made = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "keys", "create", "--tenant", "studio",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(made.communicate(), 30000 * MS)
    key, _, line = out.decode().splitlines()
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        first = await asyncio.wait_for(serve.stdout.readline(), 30000 * MS)
        url = first.decode().rsplit(" ", 1)[1].strip()
        async with aiohttp.ClientSession() as http:
            assert await authenticates(http, url, "old")
            assert not await authenticates(http, url, key)
            path.write_text(f"[server]\nport = 0\n[tenants.studio]\n{line}\n")
            serve.send_signal(signal.SIGHUP)
            deadline = asyncio.get_running_loop().time() + 10000 * MS
            while not await authenticates(http, url, key):  # the signal is handled in turn
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(20 * MS)
            assert not await authenticates(http, url, "old")
            client = await connect(http, url)
            await client.auth(key)
            sent: dict[str, Any] = task()
            await client.send(sent)
            [item] = (await client.recv(within=60000 * MS))["data"]
            assert item["taskUUID"] == sent["taskUUID"]
            await client.ws.close()
        assert serve.returncode is None  # no restart
        serve.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serve.wait(), 30000 * MS) == 0
    finally:
        await _end(serve)


async def test_a_reload_closes_the_sockets_of_revoked_keys_with_4003(
    provider: LocalProvider, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """alpha loses one of its two keys, then beta goes altogether: only the sockets of what
    was taken away close (4003); a new key works at once."""
    path = tmp_path / "tenebra.toml"
    alpha = '[tenants.alpha]\nkeys = ["a-old", "a-kept"]\nmax_connections = 2\n'
    write_config(path, provider.url, alpha + '[tenants.beta]\nkeys = ["b"]\n')
    set_faults(provider, fast=True)
    async with running(load_config(path, env={})) as gateway:
        assert gateway.intake is not None
        revoked, kept, beta = [await connect(http, gateway.url) for _ in range(3)]
        await revoked.auth("a-old")
        await kept.auth("a-kept")
        await beta.auth("b")

        alpha = '[tenants.alpha]\nkeys = ["a-kept", "a-new"]\nmax_connections = 2\n'
        write_config(path, provider.url, alpha + '[tenants.beta]\nkeys = ["b"]\n')
        assert gateway.reload_tenants(lambda: load_config(path, env={}))
        assert await closed_with(revoked.ws) == CLOSE_REVOKED == 4003
        # its connection is no longer counted: alpha's new key gets in beside the kept one
        await until(lambda: gateway.intake.quotas.connections("alpha") == 1)
        new = await connect(http, gateway.url)
        await new.auth("a-new")
        for client in (kept, beta, new):  # nobody else is disturbed
            sent: dict[str, Any] = task()
            await client.send(sent)
            [item] = (await client.recv())["data"]
            assert item["taskUUID"] == sent["taskUUID"]

        write_config(path, provider.url, alpha)  # beta goes altogether
        assert gateway.reload_tenants(lambda: load_config(path, env={}))
        assert await closed_with(beta.ws) == 4003
        await kept.send({"taskType": "ping", "ping": True})
        assert (await kept.recv())["data"] == [{"taskType": "ping", "pong": True}]
