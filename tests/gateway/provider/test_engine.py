"""The task engine: what it draws from the injected randomness, and what it must not."""

from __future__ import annotations

import random
from typing import Any

import aiohttp

from gateway.provider.pool import RenderPool
from gateway.provider.server import LocalProvider, ProviderConfig
from tests.gateway.conftest import KEY, connect, set_faults, task


async def results(render_pool: RenderPool, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
    provider = LocalProvider(
        ProviderConfig(keys=frozenset({KEY})), rng=random.Random(11), pool=render_pool
    )
    set_faults(provider, fast=True)
    await provider.start()
    try:
        client = await connect(http, provider.url)
        await client.auth()
        await client.send(task(numberResults=3))
        return [(await client.recv())["data"][0] for _ in range(3)]
    finally:
        await provider.stop()


async def test_image_uuids_are_secret_while_seeds_repeat(
    render_pool: RenderPool, http: aiohttp.ClientSession
) -> None:
    """An image's UUID is the only secret in its /images URL: never drawn from a seeded rng."""
    first, second = await results(render_pool, http), await results(render_pool, http)
    assert {i["imageUUID"] for i in first}.isdisjoint(i["imageUUID"] for i in second)
    assert sorted(i["seed"] for i in first) == sorted(i["seed"] for i in second)


async def test_an_unpriced_provider_costs_nothing(
    render_pool: RenderPool, http: aiohttp.ClientSession
) -> None:
    """Synthetic images cost 0 where the provider is told they are not priced."""
    answers: dict[bool, list[Any]] = {}
    for priced in (True, False):
        config = ProviderConfig(keys=frozenset({KEY}), priced=priced)
        provider = LocalProvider(config, pool=render_pool)
        set_faults(provider, fast=True)
        await provider.start()
        try:
            client = await connect(http, provider.url)
            await client.auth()
            await client.send(task(includeCost=True, numberResults=2))
            await client.send(task(includeCost=False))
            frames = [(await client.recv())["data"][0] for _ in range(3)]
            answers[priced] = sorted((i.get("cost", "absent") for i in frames), key=str)
        finally:
            await provider.stop()
    assert answers[True] == [0.195, 0.195, "absent"]
    assert answers[False] == [0, 0, "absent"]
