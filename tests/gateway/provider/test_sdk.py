"""The official Runware Python SDK (``runware`` 0.5.24), pointed straight at the local provider."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from runware import IImageInference, Runware

from gateway.provider.server import LocalProvider
from tests.gateway.conftest import KEY, MODEL
from tests.timing import MS

PROMPT = "A cinematic photograph of a lone fencer in a floodlit tunnel, mist"


async def sdk_client(provider: LocalProvider) -> Runware:
    client = Runware(api_key=KEY, url=provider.url)
    await asyncio.wait_for(client.connect(), 10000 * MS)
    return client


async def test_sdk_sync(provider: LocalProvider) -> None:
    client = await sdk_client(provider)
    try:
        images = await asyncio.wait_for(
            client.imageInference(
                requestImage=IImageInference(
                    model=MODEL,
                    positivePrompt=PROMPT,
                    width=1264,
                    height=848,
                    numberResults=2,
                    includeCost=True,
                )
            ),
            30000 * MS,
        )
        assert images is not None and len(images) == 2
        assert all(i.imageURL and i.imageUUID and i.cost == 0.195 for i in images)
        assert len({i.imageUUID for i in images}) == 2
    finally:
        await client.disconnect()


async def test_sdk_async_with_get_response(provider: LocalProvider) -> None:
    # (SDK 0.5 waits 30 s after a poll that finds its images still processing: render first)
    client = await sdk_client(provider)
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
        # SDK 0.5 filters out "processing" items and then waits 30 s for its future: poll once
        # the image is there, as its docs advise (a poll 1-2 s after the ack)
        for _ in range(1000):
            if provider.stats.images:
                break
            await asyncio.sleep(10 * MS)
        images = await asyncio.wait_for(client.getResponse(taskUUID=task_uuid), 60000 * MS)
        assert len(images) == 1
        assert images[0].imageURL and images[0].taskUUID == task_uuid
    finally:
        await client.disconnect()


async def test_sdk_sees_validation_errors_with_their_code(provider: LocalProvider) -> None:
    client = await sdk_client(provider)
    try:
        with pytest.raises(Exception) as raised:
            await asyncio.wait_for(
                client.imageInference(
                    requestImage=IImageInference(
                        model=MODEL, positivePrompt=PROMPT, width=1000, height=1000
                    )
                ),
                30000 * MS,
            )
        assert "unsupportedDimensions" in str(raised.value)
    finally:
        await client.disconnect()
