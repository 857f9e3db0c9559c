"""The official Runware SDK (``runware`` 0.5.24) pointed at tenebra instead of Runware."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from runware import IImageInference, Runware

from gateway.app import Gateway
from gateway.provider.server import LocalProvider
from tests.gateway.conftest import ALPHA, MODEL
from tests.timing import MS

PROMPT = "A dramatic editorial photograph of a boxer backstage under a spotlight, chalk dust"


async def sdk(gateway: Gateway) -> Runware:
    client = Runware(api_key=ALPHA, url=gateway.url)
    await asyncio.wait_for(client.connect(), 10000 * MS)
    return client


async def test_sdk_sync_with_four_results(gateway: Gateway) -> None:
    client = await sdk(gateway)
    try:
        images = await asyncio.wait_for(
            client.imageInference(
                requestImage=IImageInference(
                    model=MODEL, positivePrompt=PROMPT, width=1264, height=848, numberResults=4
                )
            ),
            60000 * MS,
        )
        assert images is not None and len(images) == 4
        assert len({i.imageUUID for i in images}) == 4
        assert all(i.imageURL and i.imageURL.endswith(".jpg") for i in images)
    finally:
        await client.disconnect()


async def test_sdk_async_then_get_response(gateway: Gateway, provider: LocalProvider) -> None:
    client = await sdk(gateway)
    task_uuid = str(uuid.uuid4())
    try:
        ack = await asyncio.wait_for(
            client.imageInference(
                requestImage=IImageInference(
                    taskUUID=task_uuid,
                    model=MODEL,
                    positivePrompt=PROMPT,
                    width=1024,
                    height=1024,
                    deliveryMethod="async",
                )
            ),
            30000 * MS,
        )
        assert getattr(ack, "taskUUID", None) == task_uuid
        # SDK 0.5 waits 30 s after a poll that finds the image still processing: poll once the
        # image exists, as Runware's docs advise (1-2 s after the ack)
        record = gateway.registry.lookup("alpha", task_uuid)
        assert record is not None
        for _ in range(2000):
            if not record.open:
                break
            await asyncio.sleep(10 * MS)
        images = await asyncio.wait_for(client.getResponse(taskUUID=task_uuid), 60000 * MS)
        assert [i.taskUUID for i in images] == [task_uuid]
        assert images[0].imageUUID and images[0].imageURL
    finally:
        await client.disconnect()


async def test_sdk_surfaces_validation_errors_with_their_code(gateway: Gateway) -> None:
    client = await sdk(gateway)
    try:
        with pytest.raises(Exception, match="invalidOutputQuality"):
            await asyncio.wait_for(
                client.imageInference(
                    requestImage=IImageInference(
                        model=MODEL, positivePrompt=PROMPT, width=1024, height=1024,
                        outputQuality=100,
                    )
                ),
                30000 * MS,
            )  # fmt: skip
    finally:
        await client.disconnect()


async def test_sdk_reconnect_resends_the_task_and_ends_with_its_results(
    gateway: Gateway, provider: LocalProvider
) -> None:
    """SDK 0.5 answers a dropped socket by reconnecting and sending the same taskUUID again;
    tenebra says conflictTaskUUID, and the SDK falls back to getResponse: results, not an
    error, and the provider billed once."""
    from tests.gateway.conftest import set_faults

    set_faults(provider, fast=True, latency={"kind": "fixed", "ms": 400 * MS * 1000})
    client = await sdk(gateway)
    try:
        request = asyncio.ensure_future(
            client.imageInference(
                requestImage=IImageInference(
                    model=MODEL, positivePrompt=PROMPT, width=1024, height=1024
                )
            )
        )
        for _ in range(500):
            if provider.stats.submissions:
                break
            await asyncio.sleep(10 * MS)
        assert gateway.clients is not None
        for connection in list(gateway.clients.connections):
            await connection.ws.close(code=1011, message=b"test: drop the client")
        images = await asyncio.wait_for(request, 60000 * MS)
        assert images is not None and len(images) == 1 and images[0].imageURL
        assert provider.stats.submissions == 1
    finally:
        await client.disconnect()
