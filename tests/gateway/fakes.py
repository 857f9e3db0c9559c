"""A Runware-protocol provider for tests, small enough to script: what it answers to the next
authentications, frames it sends after a good reply, and a capacity past which it refuses
tasks (``rateLimitExceeded``, before accepting them) as Runware's queue does."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from typing import Any

import aiohttp
from aiohttp import web

SESSION = "5f0c7a52-1a3c-4b7e-9c1d-2f3b4a5c6d7e"
AUTH_REPLY = json.dumps(
    {"data": [{"taskType": "authentication", "connectionSessionUUID": SESSION}]}
).encode()


async def serve_on_loopback(app: web.Application) -> tuple[web.AppRunner, int]:
    """``app`` served on 127.0.0.1 at a free port: its runner (to clean up) and the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port: int = runner.addresses[0][1]
    return runner, port


class FakeProvider:
    """A Runware-protocol provider with a script: what it answers to the next authentications
    in place of the reply, and frames it sends after a good reply. Past the script it behaves:
    one result per image asked, pongs, and getResponse answers from what it has done."""

    def __init__(self, *, capacity: int | None = None, latency: float = 0.0) -> None:
        self.capacity = capacity  # tasks it works on at once; one more is refused
        self.latency = latency  # before a task's results
        self.busy = 0
        self.most_busy = 0
        self.refusals = 0
        self.auth_answers: deque[bytes] = deque()
        self.after_auth: deque[bytes] = deque()
        self.connections = 0
        self.authenticated = 0
        self.submissions: list[str] = []
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1", self._handle)
        self._runner, self.port = await serve_on_loopback(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def drop(self) -> None:
        """Close every open socket, as a provider that restarts its front end would."""
        for ws in list(self._sockets):
            await ws.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        self._sockets.add(ws)
        try:
            return await self._serve(ws)
        finally:
            self._sockets.discard(ws)

    async def _serve(self, ws: web.WebSocketResponse) -> web.WebSocketResponse:
        await ws.receive()  # the authentication
        if self.auth_answers:
            await ws.send_bytes(self.auth_answers.popleft())
        else:
            self.authenticated += 1
            await ws.send_bytes(AUTH_REPLY)
            while self.after_auth:
                await ws.send_bytes(self.after_auth.popleft())
        work: set[asyncio.Task[None]] = set()
        try:
            async for message in ws:
                if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    for frame in self._answer(json.loads(message.data), ws, work):
                        await ws.send_str(json.dumps(frame))
        finally:
            for job in work:
                job.cancel()
        return ws

    async def _later(self, ws: web.WebSocketResponse, results: list[dict[str, Any]]) -> None:
        try:
            await asyncio.sleep(self.latency)
            for result in results:
                await ws.send_str(json.dumps({"data": [result]}))
        finally:
            self.busy -= 1

    def _answer(
        self, items: list[dict[str, Any]], ws: web.WebSocketResponse, work: set[asyncio.Task[None]]
    ) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        for item in items:
            kind, task_uuid = item.get("taskType"), str(item.get("taskUUID"))
            if kind == "ping":
                frames.append({"data": [{"taskType": "ping", "pong": True, "taskUUID": task_uuid}]})
            elif kind == "imageInference":
                if self.capacity is not None and self.busy >= self.capacity:
                    self.refusals += 1
                    refusal = {"code": "rateLimitExceeded", "message": "queue full"}
                    frames.append({"errors": [{**refusal, "taskUUID": task_uuid}]})
                    continue
                self.submissions.append(task_uuid)
                results = [
                    {
                        "taskType": "imageInference",
                        "taskUUID": task_uuid,
                        "imageUUID": str(uuid.uuid4()),
                        "imageURL": "http://127.0.0.1:9/image.jpg",
                        "cost": 0.0,
                    }
                    for _ in range(item.get("numberResults", 1))
                ]
                self.results[task_uuid] = results
                self.busy += 1
                self.most_busy = max(self.most_busy, self.busy)
                job = asyncio.create_task(self._later(ws, results))
                work.add(job)
                job.add_done_callback(work.discard)
            elif kind == "getResponse":
                known = self.results.get(task_uuid)
                if known is None:
                    error = {"code": "taskNotFound", "taskType": "getResponse"}
                    frames.append({"errors": [{**error, "taskUUID": task_uuid, "message": "?"}]})
                else:
                    frames.append({"data": known})
        return frames
