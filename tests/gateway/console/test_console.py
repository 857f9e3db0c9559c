"""The console's producer and its socket, without a browser: who sees what, the refusal, the
one producer for every viewer, and a viewer that does not keep up dropped."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

import gateway.console.producer
from gateway.config import ConfigError, load_config
from gateway.console import CONSOLE_KEY, Console
from gateway.console.producer import ADMIN
from tests.compiled import pure_python_only
from tests.gateway.conftest import ALPHA, BETA, Client, task
from tests.gateway.console.conftest import ADMIN as ADMIN_KEY
from tests.gateway.console.conftest import base_url
from tests.timing import MS


def console_of(gateway: Any) -> Console:
    assert gateway._runner is not None
    console: Console = gateway._runner.app[CONSOLE_KEY]
    return console


async def run_task(http: aiohttp.ClientSession, gateway: Any, key: str, results: int = 1) -> str:
    client = Client(await http.ws_connect(gateway.url, max_msg_size=0))
    await client.auth(key)
    sent = task(numberResults=results)
    await client.send(sent)
    for _ in range(results):
        frame = await client.recv()
        assert "errors" not in frame, frame
    await client.ws.close()
    uuid: str = sent["taskUUID"]
    return uuid


async def open_viewer(
    http: aiohttp.ClientSession, gateway: Any, key: str | None, *, header: bool = False
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    url = base_url(gateway) + "/console/events"
    headers = {"Authorization": f"Bearer {key}"} if header and key else {}
    ws = await http.ws_connect(url, headers=headers)
    if not header:
        await ws.send_str(json.dumps({"key": key or ""}))
    first = await ws.receive(timeout=5000 * MS)
    assert first.type == aiohttp.WSMsgType.TEXT, first
    reply: dict[str, Any] = json.loads(first.data)
    return ws, reply


async def next_of(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    while True:
        message = await ws.receive(timeout=5000 * MS)
        assert message.type == aiohttp.WSMsgType.TEXT, message
        frame: dict[str, Any] = json.loads(message.data)
        if frame["type"] == kind:
            return frame


async def test_an_admin_sees_every_tenant_the_links_and_the_tasks(
    gateway: Any, http: aiohttp.ClientSession
) -> None:
    alpha = await run_task(http, gateway, ALPHA, results=2)
    beta = await run_task(http, gateway, BETA)
    ws, hello = await open_viewer(http, gateway, ADMIN_KEY)
    assert hello == {"type": "hello", "scope": "admin"}
    history = await next_of(ws, "history")
    assert isinstance(history["points"], list)
    frame = await next_of(ws, "tick")
    assert frame["links"][0]["state"] == "ready"
    assert {"window", "in_flight", "reconnects", "session_age"} <= frame["links"][0].keys()
    assert {row["tenant"] for row in frame["tenants"]} >= {"alpha", "beta"}
    tasks = {t["taskUUID"]: t for t in frame["tasks"]}
    assert tasks[alpha]["images"] == 2 and tasks[alpha]["state"] == "done"
    assert tasks[beta]["tenant"] == "beta"
    alpha_row = next(row for row in frame["tenants"] if row["tenant"] == "alpha")
    assert alpha_row["budget"] == 5.0
    await ws.close()


async def test_a_tenant_key_sees_its_own_tenant_only(
    gateway: Any, http: aiohttp.ClientSession
) -> None:
    await run_task(http, gateway, ALPHA)
    beta = await run_task(http, gateway, BETA)
    ws, hello = await open_viewer(http, gateway, BETA, header=True)
    assert hello == {"type": "hello", "scope": "beta"}
    frame = await next_of(ws, "tick")
    assert [row["tenant"] for row in frame["tenants"]] == ["beta"]
    assert [t["taskUUID"] for t in frame["tasks"]] == [beta]
    assert all(t["tenant"] == "beta" for t in frame["tasks"])
    assert frame["links"] == [{"index": 0, "state": "ready"}]  # up or not; no more
    assert frame["viewers"] is None and frame["dropped"] is None
    await ws.close()


@pytest.mark.parametrize("key", [None, "not-a-key"])
async def test_no_key_or_a_wrong_key_is_refused(
    gateway: Any, http: aiohttp.ClientSession, key: str | None
) -> None:
    ws, reply = await open_viewer(http, gateway, key)
    assert reply["type"] == "refused"
    closing = await ws.receive(timeout=5000 * MS)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4001
    assert console_of(gateway).viewer_count == 0


@pure_python_only(gateway.console.producer)  # counts calls by patching the console
async def test_one_producer_encodes_once_per_scope(
    gateway: Any, http: aiohttp.ClientSession
) -> None:
    console = console_of(gateway)
    viewers = [await open_viewer(http, gateway, ADMIN_KEY) for _ in range(3)]
    viewers.append(await open_viewer(http, gateway, ALPHA))
    assert console.viewer_count == 4
    assert set(console.viewers) == {ADMIN, "alpha"}
    built: list[str] = []
    snapshot = console.snapshot

    def counted(scope: str) -> dict[str, Any]:
        built.append(scope)
        return snapshot(scope)

    console.snapshot = counted  # type: ignore[method-assign]
    console.tick()
    assert sorted(built) == [ADMIN, "alpha"]  # four viewers, two frames built
    for ws, _ in viewers:
        await ws.close()


async def test_a_viewer_that_does_not_keep_up_is_dropped(gateway: Any) -> None:
    console = console_of(gateway)
    slow = console.join(ADMIN)
    fast = console.join(ADMIN)
    assert slow is not None and fast is not None
    dropped: list[int] = []
    slow.on_drop = lambda: dropped.append(slow.ident)
    for _ in range(slow.mailbox.capacity + 1):  # the slow one never reads
        console.tick()
        while len(fast.mailbox):  # the fast one reads everything
            await fast.mailbox.next()
    assert slow.dropped and dropped == [slow.ident]
    assert slow not in console.viewers[ADMIN] and fast in console.viewers[ADMIN]
    assert console.dropped == 1 and console.viewer_count == 1
    assert len(slow.mailbox) == 0 and slow.mailbox.closed  # its frames freed at once
    console.leave(fast)


async def test_viewers_are_bounded(gateway: Any) -> None:
    console = console_of(gateway)
    console.max_viewers = 2
    first, second = console.join(ADMIN), console.join("alpha")
    assert first is not None and second is not None
    assert console.join(ADMIN) is None
    console.leave(first)
    assert console.join(ADMIN) is not None


async def test_the_rings_keep_the_last_tasks_only(
    gateway: Any, http: aiohttp.ClientSession
) -> None:
    console = console_of(gateway)
    for _ in range(3):
        await run_task(http, gateway, ALPHA)
    assert len(console.all.recent) == 3
    assert console.all.recent.maxlen == 50
    # summaries, not records: a ring never keeps a task's images alive
    assert not any(hasattr(ended, "results") for ended in console.all.recent)
    console.tick()
    point = console.all.series.last()
    assert point is not None and point[1] >= 0


async def test_the_pages_and_the_catalogue_are_served(
    gateway: Any, http: aiohttp.ClientSession
) -> None:
    base = base_url(gateway)
    for path in ("/console", "/playground"):
        async with http.get(base + path) as response:
            assert response.status == 200
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            assert "<script" in await response.text()
    async with http.get(base + "/console/static/../app.py") as response:
        assert response.status == 404
    async with http.get(base + "/console/catalogue.json") as response:
        catalogue = await response.json()
    model = catalogue["models"][0]
    assert model["air"] == "exactly:photo@extreme-contrast"
    assert {"label": "1264x848", "width": 1264, "height": 848}.items() <= model["sizes"][1].items()
    assert catalogue["numberResults"] == [1, 20]


def test_admin_keys_from_the_file_and_the_environment() -> None:
    config = load_config(env={"TENEBRA_ADMIN_KEY": "from-env"})
    assert config.admin.keys == ["from-env"]
    config = load_config(env={"TENEBRA_ADMIN_KEYS": '["a", "b"]', "TENEBRA_ADMIN_KEY": "c"})
    assert config.admin.keys == ["a", "b", "c"]


def test_an_admin_key_may_not_be_a_tenants(tmp_path: Any) -> None:
    path = tmp_path / "tenebra.toml"
    path.write_text('[admin]\nkeys = ["shared"]\n[tenants.alpha]\nkeys = ["shared"]\n')
    with pytest.raises(ConfigError, match="admin: a key also belongs to tenant alpha"):
        load_config(path, env={})


async def test_spend_and_images_today_come_from_the_usage_ledger(
    gateway: Any, http: aiohttp.ClientSession
) -> None:
    if getattr(gateway, "usage", None) is None:
        pytest.skip("this version has no usage ledger: the budget ledger's spend is shown")
    await run_task(http, gateway, ALPHA, results=2)
    ws, _ = await open_viewer(http, gateway, ADMIN_KEY)
    for _ in range(5):  # the producer reads the ledger before its next tick
        frame = await next_of(ws, "tick")
        alpha = next(row for row in frame["tenants"] if row["tenant"] == "alpha")
        if alpha["images_today"] == 2:
            break
    assert alpha["images_today"] == 2 and alpha["spend_today"] == 0.0
    await ws.close()
