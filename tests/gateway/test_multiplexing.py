"""Many clients, one provider socket: each gets exactly its own results, and nobody else's."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from typing import Any

import aiohttp

from gateway.app import Gateway
from gateway.provider.server import LocalProvider
from tests.gateway.conftest import ALPHA, BETA, MODEL, connect, set_faults
from tests.timing import MS

CLIENTS, TASKS = 200, 10


async def test_200_clients_x_10_tasks_over_one_provider_socket(
    gateway: Gateway, provider: LocalProvider
) -> None:
    set_faults(provider, fast=True, latency={"kind": "uniform", "ms": 0, "high_ms": 20})
    connector = aiohttp.TCPConnector(limit=0)
    handshakes = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one_client(n: int) -> tuple[str, list[str], Counter[str]]:
            key = ALPHA if n % 2 else BETA
            async with handshakes:  # at most 16 unauthenticated sockets per address
                client = await connect(http, gateway.url)
                await client.auth(key=key)
            tasks: list[dict[str, Any]] = [
                {
                    "taskType": "imageInference",
                    "taskUUID": str(uuid.uuid4()),
                    "model": MODEL,
                    "positivePrompt": f"client {n} task {i}",
                    "width": 1024,
                    "height": 1024,
                    "numberResults": 1 + (n + i) % 3,
                }
                for i in range(TASKS)
            ]
            await client.ws.send_str(json.dumps(tasks))
            expected = sum(t["numberResults"] for t in tasks)
            seen: Counter[str] = Counter()
            images: set[str] = set()
            while sum(seen.values()) < expected:
                frame = await client.recv(within=30000 * MS)
                assert "errors" not in frame, frame
                for item in frame["data"]:
                    seen[item["taskUUID"]] += 1
                    images.add(item["imageUUID"])
            assert len(images) == expected  # every image once
            for t in tasks:
                assert seen[t["taskUUID"]] == t["numberResults"]  # exact counts, no cross-talk
            # and nothing more arrives for this client
            try:
                extra = await client.recv(within=100 * MS)
            except TimeoutError:
                extra = None
            assert extra is None, extra
            await client.ws.close()
            return key, [t["taskUUID"] for t in tasks], seen

        outcomes = await asyncio.wait_for(
            asyncio.gather(*(one_client(n) for n in range(CLIENTS))), 120000 * MS
        )
        # one provider socket carried it all
        assert provider.stats.connections == 1
        assert provider.stats.submissions == CLIENTS * TASKS
        # getResponse never shows a task to another tenant
        probe = await connect(http, gateway.url)
        await probe.auth(key=ALPHA)
        foreign = [uuids[0] for key, uuids, _ in outcomes if key == BETA][:20]
        await probe.ws.send_str(
            json.dumps([{"taskType": "getResponse", "taskUUID": u} for u in foreign])
        )
        errors = (await probe.recv())["errors"]
        assert [e["code"] for e in errors] == ["taskNotFound"] * len(foreign)
