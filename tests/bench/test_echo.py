"""The echo provider (bench/echo.py): its framing, in-process, over a real socket, and read the
way the gateway's upstream link reads a provider's frames."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bench import echo
from protocol.codec import decode_image_result, decode_server_frame

TASK = "0b3bd4c6-8f3e-4a43-9c7c-2a1e8b1c9d10"
OTHER = "5f0c2d1e-2b3a-4c5d-8e9f-0a1b2c3d4e5f"


@pytest.fixture
async def url() -> AsyncIterator[str]:
    server = TestServer(echo.application(key="pk", remember=2))
    await server.start_server()
    try:
        yield str(server.make_url("/v1")).replace("http://", "ws://")
    finally:
        await server.close()


async def exchange(ws: aiohttp.ClientWebSocketResponse, frame: Any, replies: int) -> list[Any]:
    await ws.send_str(json.dumps(frame))
    return [json.loads((await ws.receive(timeout=5)).data) for _ in range(replies)]


def image(task_uuid: str, results: int = 1, **more: Any) -> dict[str, Any]:
    return {"taskType": "imageInference", "taskUUID": task_uuid, "numberResults": results,
            "positivePrompt": "ignored", **more}  # fmt: skip


async def authenticated(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(url)
    [reply] = await exchange(ws, [{"taskType": "authentication", "apiKey": "pk"}], 1)
    assert reply["data"][0]["taskType"] == "authentication"
    assert reply["data"][0]["connectionSessionUUID"]
    return ws


async def test_results_of_a_frame_come_in_one_data_frame_the_gateway_reads(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await authenticated(http, url)
        frame = [image(TASK, 3, seed=42, includeCost=True), image(OTHER)]
        await ws.send_str(json.dumps(frame))
        raw = (await ws.receive(timeout=5)).data
        server_frame = decode_server_frame(raw)
        assert len(server_frame.data) == 4 and not server_frame.errors
        results = [decode_image_result(item) for item in server_frame.data]
        assert [r.taskUUID for r in results] == [TASK, TASK, TASK, OTHER]
        assert len({r.imageUUID for r in results}) == 4  # distinct: the gateway counts each
        assert [r.seed for r in results[:3]] == [42, 42, 42]
        assert all(r.cost == 0.0013 for r in results[:3]) and results[3].cost is None
        assert all(r.imageURL and r.imageURL.startswith("https://") for r in results)
        await ws.close()


async def test_ping_is_a_frame_of_its_own_before_the_results(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await authenticated(http, url)
        frame = [image(TASK), {"taskType": "ping", "ping": True, "taskUUID": OTHER}]
        pong, results = await exchange(ws, frame, 2)
        assert pong == {"data": [{"taskType": "ping", "pong": True, "taskUUID": OTHER}]}
        assert [item["taskUUID"] for item in results["data"]] == [TASK]
        await ws.close()


async def test_get_response_answers_recent_tasks_and_errors_apart(url: str) -> None:
    third = "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a"
    async with aiohttp.ClientSession() as http:
        ws = await authenticated(http, url)
        await exchange(ws, [image(TASK, 2), image(OTHER), image(third)], 1)
        # remember=2: the oldest, TASK, is forgotten
        polls = [{"taskType": "getResponse", "taskUUID": u} for u in (TASK, third)]
        data, errors = await exchange(ws, polls, 2)
        assert [item["taskUUID"] for item in data["data"]] == [third]
        [error] = errors["errors"]
        assert (error["code"], error["taskType"], error["taskUUID"]) == (
            "taskNotFound", "getResponse", TASK,
        )  # fmt: skip
        [unknown] = await exchange(ws, [{"taskType": "imageUpscale", "taskUUID": TASK}], 1)
        assert unknown["errors"][0]["code"] == "unsupportedTaskType"
        await ws.close()


async def test_a_wrong_key_or_none_is_refused(url: str) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        [early] = await exchange(ws, [image(TASK)], 1)
        assert early["errors"][0]["code"] == "missingApiKey"
        [refused] = await exchange(ws, [{"taskType": "authentication", "apiKey": "no"}], 1)
        assert refused["errors"][0]["code"] == "invalidApiKey"
        [bad] = await exchange(ws, {"not": "an array"}, 1)
        assert bad["errors"][0]["code"] == "invalidJSON"


def test_connection_batches_what_one_turn_handled() -> None:
    """Without a socket: what several frames leave pending goes out as one data frame."""
    connection = echo.Connection(key=None, remember=10)
    connection.handle(json.dumps([{"taskType": "authentication", "apiKey": "any"}]).encode())
    for task_uuid in (TASK, OTHER):
        connection.handle(json.dumps([image(task_uuid)]).encode())
    auth, data = connection.frames()
    assert json.loads(auth)["data"][0]["taskType"] == "authentication"
    assert [i["taskUUID"] for i in json.loads(data)["data"]] == [TASK, OTHER]
    assert not connection.pending and connection.frames() == []
