"""The operator's console (``GET /console``) and the playground (``GET /playground``), served by
the gateway itself: see :mod:`gateway.console.pages` for the routes and keys and
:mod:`gateway.console.producer` for what is shown and how it is bounded."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.console.pages import ConsoleWeb
from gateway.console.producer import Console

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["CONSOLE_KEY", "Console", "install"]

CONSOLE_KEY = web.AppKey("console", Console)


def install(app: web.Application, gateway: Gateway) -> Console:
    """The console's routes on ``app``; its producer runs while the app does (started with
    the server, stopped, its viewers closed, when the server shuts down)."""
    console = Console(
        gateway,
        max_viewers=gateway.config.admin.max_viewers,
        clock=gateway.clock,  # the registry's: tasks' times are on it
        wall_clock=gateway.wall_clock,
    )
    console.usage_today = _usage_today(gateway)
    ConsoleWeb(gateway, console).routes(app)
    app[CONSOLE_KEY] = console

    async def start(app: web.Application) -> None:
        console.start()

    async def stop(app: web.Application) -> None:
        await console.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)  # before aiohttp waits for handlers: the viewers' end
    return console


def _usage_today(gateway: Gateway) -> Callable[[], Awaitable[dict[str, dict[str, float]]]] | None:
    """Today's spend and images by tenant from the usage ledger (gateway/usage.py), where the
    gateway has one; None otherwise (the console then shows the budget ledger's spend)."""
    usage: Any = getattr(gateway, "usage", None)
    if usage is None or not hasattr(usage, "rows") or not hasattr(usage, "today"):
        return None

    async def today() -> dict[str, dict[str, float]]:
        day = usage.today()
        totals: dict[str, dict[str, float]] = {}
        for row in await usage.rows(day, day, None):  # by tenant and key: summed by tenant
            figures = totals.setdefault(row.tenant, {"spend": 0.0, "images": 0.0})
            figures["spend"] += row.spend
            figures["images"] += row.images
        return totals

    return today
