"""The local provider's test controls: ``/control/*``.

``GET|POST /control/faults`` reads or changes the fault switches (a partial object updates),
``POST /control/forget`` forgets everything as a restart would, ``GET /control/stats`` counts.

They can stall, drop and wipe the provider, so they exist only with a control key
(``ProviderConfig.control_key``): without one every ``/control/*`` path is 404, with one a
request without ``Authorization: Bearer <key>`` is 401.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
from aiohttp import web

from gateway.provider.config import Stats
from gateway.provider.faults import Faults

__all__ = ["FaultControl"]


class Controlled(Protocol):
    faults: Faults
    stats: Stats

    def forget(self) -> None: ...


Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FaultControl:
    def __init__(self, provider: Controlled, key: str | None) -> None:
        self._provider = provider
        self._expected = None if key is None else f"Bearer {key}".encode()

    def add_routes(self, app: web.Application) -> None:
        if self._expected is None:
            return
        app.router.add_get("/control/faults", self._keyed(self._get_faults))
        app.router.add_post("/control/faults", self._keyed(self._set_faults))
        app.router.add_post("/control/forget", self._keyed(self._forget))
        app.router.add_get("/control/stats", self._keyed(self._get_stats))

    def _keyed(self, route: Route) -> Route:
        expected = self._expected
        assert expected is not None

        async def keyed(request: web.Request) -> web.StreamResponse:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})
            return await route(request)

        return keyed

    async def _get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=msgspec.json.encode(self._provider.faults), content_type="application/json"
        )

    async def _set_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            changes = msgspec.json.decode(await request.read(), type=dict[str, Any])
            self._provider.faults = self._provider.faults.updated(changes)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return await self._get_faults(request)

    async def _forget(self, request: web.Request) -> web.StreamResponse:
        self._provider.forget()
        return web.Response(status=204)

    async def _get_stats(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=msgspec.json.encode(self._provider.stats), content_type="application/json"
        )
