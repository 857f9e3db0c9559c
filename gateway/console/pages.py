"""The console's and the playground's HTTP side.

- ``GET /console`` and ``GET /playground``: static pages (plain JS and SVG, files of this
  package; nothing fetched from elsewhere, no build step).
- ``GET /console/events``: a WebSocket. The page sends ``{"key": "..."}`` as its first message
  (or a script sends ``Authorization: Bearer <key>`` with the upgrade): an admin key
  (``[admin]``) sees every tenant, a tenant's key its own tenant. The key never travels in a
  URL, so no access log or proxy log can hold it, and it is never logged here. Then the
  producer's frames (:mod:`gateway.console.producer`), once a second.
- ``GET /console/catalogue.json``: the models' sizes, formats, output types and the protocol's
  ranges, for the playground's fields (the gateway's own catalogue, not a copy in JS).

Failed keys count with the client door's failures per address (gateway/throttle.py): the same
delay, doubling, and the same refusal of an address that keeps guessing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from importlib import resources
from typing import TYPE_CHECKING, Any, get_args

import aiohttp
import msgspec
from aiohttp import web

from gateway.console.producer import ADMIN, Console, Viewer
from gateway.tenants import hash_key
from protocol.frames import NumberResults, Quality

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["ConsoleWeb"]

CLOSE_REFUSED = 4001  # no key, or a key that is neither an admin's nor a tenant's
CLOSE_SLOW = 4008  # the viewer did not keep up: its mailbox was full (as the client door's 4008)
CLOSE_FULL = 1013  # try again later: max_viewers are open
MAX_MESSAGE = 4096  # what a viewer may send: its key, once
# frames waiting in the socket's own buffer before a send waits for the kernel: small, so that
# a viewer that does not read shows up in its mailbox (and is dropped) within seconds
WRITER_LIMIT = 64 * 1024

STATIC = {  # name -> content type: the only files served, read once at start
    "console.css": "text/css",
    "console.js": "text/javascript",
    "common.js": "text/javascript",
    "playground.js": "text/javascript",
    "LICENSE.txt": "text/plain",
    "favicon.svg": "image/svg+xml",
}
PAGES = ("console.html", "playground.html")


def _read(name: str) -> bytes:
    return (resources.files("gateway.console") / "static" / name).read_bytes()


class ConsoleWeb:
    def __init__(self, gateway: Gateway, console: Console) -> None:
        self.gateway = gateway
        self.console = console
        admin = gateway.config.admin
        # hashed once; the plain keys are forgotten, as tenants' are (gateway.tenants)
        self._admins = frozenset(
            [hash_key(key) for key in admin.keys] + [bytes.fromhex(h) for h in admin.key_sha256]
        )
        admin.key_sha256 = [digest.hex() for digest in self._admins]
        admin.keys = []
        self._files = {name: _read(name) for name in (*STATIC, *PAGES)}
        self._catalogue = msgspec.json.encode(self._catalogue_view())

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/console", self._page("console.html"))
        app.router.add_get("/playground", self._page("playground.html"))
        app.router.add_get("/console/static/{name}", self._static)
        app.router.add_get("/console/catalogue.json", self._catalogue_json)
        app.router.add_get("/console/events", self._events)

    # ------------------------------------------------------------------ who

    def scope_of(self, key: str) -> str | None:
        """ADMIN, a tenant's name, or None for a key that opens nothing."""
        if not key:
            return None
        if hash_key(key) in self._admins:
            return ADMIN
        return self.gateway.tenants.tenant_of(key)  # read each time: a reload swaps the table

    # ------------------------------------------------------------------ pages

    @staticmethod
    def _headers(request: web.Request, content_type: str) -> dict[str, str]:
        # own scripts only; images from anywhere (the provider's URLs) and data: URIs;
        # WebSockets to this host only
        host = request.host
        return {
            "Content-Type": f"{content_type}; charset=utf-8",
            "Content-Security-Policy": (
                "default-src 'none'; script-src 'self'; style-src 'self'; "
                "img-src 'self' data: http: https:; "
                f"connect-src 'self' ws://{host} wss://{host}; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        }

    def _page(self, name: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(body=self._files[name], headers=self._headers(request, "text/html"))

        return handler

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=self._files[name], headers=self._headers(request, STATIC[name]))

    async def _catalogue_json(self, request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "application/json", "Cache-Control": "no-cache"}
        return web.Response(body=self._catalogue, headers=headers)

    def _catalogue_view(self) -> dict[str, Any]:
        catalogue = self.gateway.catalogue
        models = []
        for air in catalogue.airs:
            model = catalogue.get(air)
            assert model is not None
            models.append(
                {
                    "air": model.air,
                    "default_size": model.default_size,
                    "sizes": [
                        {
                            "label": size.label,
                            "width": size.width,
                            "height": size.height,
                            "tier": size.tier,
                            "ratio": size.ratio,
                            "price": model.cost[size.tier],
                        }
                        for size in model.sizes
                    ],
                    "output_types": model.output_types,
                    "output_formats": model.output_formats,
                }
            )
        return {
            "models": models,
            # the protocol's own ranges (protocol/frames.py), read from its types
            "numberResults": _range(NumberResults),
            "outputQuality": _range(Quality),
        }

    # ------------------------------------------------------------------ live

    async def _events(self, request: web.Request) -> web.StreamResponse:
        clients = self.gateway.clients
        assert clients is not None
        throttle, address = clients.throttle, clients.address_of(request)
        refused = throttle.refused(address)
        if refused > 0:
            raise web.HTTPTooManyRequests(headers={"Retry-After": str(int(refused) + 1)})
        if self.console.viewer_count >= self.console.max_viewers:
            raise web.HTTPServiceUnavailable(text="too many console viewers")
        if not throttle.open_unauthenticated(address):
            raise web.HTTPTooManyRequests(text="too many unauthenticated sockets")
        ws = web.WebSocketResponse(
            max_msg_size=MAX_MESSAGE, heartbeat=30.0, compress=False, writer_limit=WRITER_LIMIT
        )
        try:
            await ws.prepare(request)
            scope = await self._authenticate(request, ws, address)
        finally:
            throttle.close_unauthenticated(address)
        if scope is None:
            return ws
        viewer = self.console.join(scope)
        if viewer is None:
            await ws.close(code=CLOSE_FULL, message=b"too many console viewers")
            return ws
        try:
            await self._serve(request, ws, viewer)
        finally:
            self.console.leave(viewer)
        return ws

    async def _authenticate(
        self, request: web.Request, ws: web.WebSocketResponse, address: str
    ) -> str | None:
        """The viewer's scope, or None once refused and closed."""
        clients = self.gateway.clients
        assert clients is not None
        key = ""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            key = header[len("Bearer ") :].strip()
        else:
            with contextlib.suppress(TimeoutError):
                message = await ws.receive(timeout=self.gateway.config.server.auth_timeout)
                if message.type == aiohttp.WSMsgType.TEXT:
                    with contextlib.suppress(ValueError, AttributeError, TypeError):
                        key = str(json.loads(message.data).get("key", ""))
        scope = self.scope_of(key)
        if scope is None:
            if ws.closed:
                return None
            # only this socket waits; the answer says nothing about which keys exist
            await asyncio.sleep(clients.throttle.failed(address))
            with contextlib.suppress(ConnectionError):
                await ws.send_str(json.dumps({"type": "refused", "message": "Not a valid key."}))
            await ws.close(code=CLOSE_REFUSED, message=b"invalid key")
            return None
        clients.throttle.succeeded(address)
        hello = {"type": "hello", "scope": "admin" if scope == ADMIN else scope}
        await ws.send_str(json.dumps(hello))
        return scope

    async def _serve(self, request: web.Request, ws: web.WebSocketResponse, viewer: Viewer) -> None:
        """Frames from the mailbox out; anything the page sends is read and ignored (reading
        is what notices a close). A dropped viewer's writer is cancelled where it waits."""
        writer = asyncio.create_task(self._write(ws, viewer))

        def drop() -> None:
            writer.cancel()

        viewer.on_drop = drop
        reader = asyncio.create_task(self._read(ws))
        try:
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            writer.cancel()
            reader.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
        if viewer.dropped:
            # its socket may be full too: the close frame gets a second, then the connection goes
            try:
                await asyncio.wait_for(ws.close(code=CLOSE_SLOW, message=b"slow viewer"), 1.0)
            except (TimeoutError, ConnectionError):
                transport = request.transport
                if transport is not None:
                    transport.abort()
        elif not ws.closed:
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(ws.close(), 1.0)

    @staticmethod
    async def _write(ws: web.WebSocketResponse, viewer: Viewer) -> None:
        while (frame := await viewer.mailbox.next()) is not None:
            await ws.send_frame(frame, aiohttp.WSMsgType.TEXT)

    @staticmethod
    async def _read(ws: web.WebSocketResponse) -> None:
        async for _ in ws:
            pass


def _range(annotated: Any) -> list[int]:
    meta = get_args(annotated)[1]
    return [int(meta.ge), int(meta.le)]
