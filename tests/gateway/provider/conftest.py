from __future__ import annotations

import io
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from PIL import Image

from tests.gateway.fakes import serve_on_loopback


class PictureServer:
    """A loopback HTTP server that serves one PNG and counts every request it receives."""

    def __init__(self) -> None:
        buffer = io.BytesIO()
        Image.new("RGB", (300, 200), (120, 100, 90)).save(buffer, "PNG")
        self.body = buffer.getvalue()
        self.requests: list[str] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/ref.png", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        if request.path == "/ref.png":
            return web.Response(body=self.body, content_type="image/png")
        if request.path == "/text":
            return web.Response(text="not a picture")
        if request.path == "/redirect":
            raise web.HTTPFound("/ref.png")
        raise web.HTTPNotFound()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._serve)
        self._runner, self.port = await serve_on_loopback(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def picture_server() -> AsyncIterator[PictureServer]:
    server = PictureServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
