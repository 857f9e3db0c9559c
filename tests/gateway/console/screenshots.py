"""The README's screenshots: docs/playground.png and docs/console.png.

    .venv/bin/python -m tests.gateway.console.screenshots [--seconds 60] [--out docs]

A gateway as `make run` starts it (the embedded local provider, here at catalogue prices so that
spend shows), three tenants, some traffic for the plots (two tenants at changing rates, a few
webhooks to a receiver on loopback that fails now and then, a few bad tasks for the errors
table), then the playground in headless Chromium, then the console with the admin key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.gateway.console.conftest import chromium_path, console_gateway

ADMIN, ALPHA, BETA, GAMMA = "admin-demo", "alpha-demo", "beta-demo", "gamma-demo"
PROMPT = "a boxer backstage under a hard spotlight, chalk dust"


def config() -> Any:
    from gateway.config import AdminSettings, Config, DeliverySettings, ServerSettings, Tenant

    return Config(
        server=ServerSettings(port=0, drain_deadline=0.5),
        admin=AdminSettings(keys=[ADMIN]),
        delivery=DeliverySettings(allow=["127.0.0.1"], backoff_initial=1.0, backoff_max=2.0),
        tenants={
            "alpha": Tenant(keys=[ALPHA], budget_per_day=25.0),
            "beta": Tenant(keys=[BETA], budget_per_day=12.0),
            "gamma": Tenant(keys=[GAMMA]),
        },
    )


async def receiver() -> tuple[web.AppRunner, str]:
    """A webhook receiver on loopback that refuses one delivery in four (retried)."""

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=503 if random.random() < 0.25 else 200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"


def image_task(**extra: Any) -> dict[str, Any]:
    return {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "exactly:photo@extreme-contrast",
        "positivePrompt": PROMPT,
        "width": 1024,
        "height": 1024,
        "numberResults": 1,
        **extra,
    }


async def tenant_load(
    http: aiohttp.ClientSession, url: str, key: str, rate: Any, until: float, **extra: Any
) -> None:
    """Tasks at ``rate(t)`` per second, t seconds from the start, on one socket."""
    ws = await http.ws_connect(url, max_msg_size=0)
    await ws.send_str(json.dumps([{"taskType": "authentication", "apiKey": key}]))
    await ws.receive()
    reader = asyncio.create_task(_drain(ws))
    started = time.monotonic()
    while (now := time.monotonic()) < until:
        per_second = max(0.2, rate(now - started))
        fields = {k: v(now - started) if callable(v) else v for k, v in extra.items()}
        await ws.send_str(json.dumps([image_task(**fields)]))
        await asyncio.sleep(random.expovariate(per_second))
    await asyncio.sleep(1.0)
    reader.cancel()
    await ws.close()


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass


async def main(seconds: float, out: Path) -> None:
    from playwright.async_api import async_playwright

    path = chromium_path()
    if path is None:
        raise SystemExit("no Chromium on PATH: make chromium")
    hooks, hook_url = await receiver()
    settings = config()
    settings.provider.local_cost = True  # spend against the budgets
    async with (
        console_gateway(settings) as gateway,
        aiohttp.ClientSession() as http,
        async_playwright() as playwright,
    ):
        base = f"http://127.0.0.1:{gateway.port}"
        until = time.monotonic() + seconds
        loads = [
            tenant_load(http, gateway.url, ALPHA, lambda t: 1.4 + 1.1 * math.sin(t / 8), until),
            tenant_load(
                http,
                gateway.url,
                BETA,
                lambda t: 0.6,
                until,
                deliveryMethod="async",
                webhookURL=hook_url,
                numberResults=lambda t: 1 + int(t) % 2,
            ),
            # a client that gets the sizes wrong now and then: errors by code
            tenant_load(http, gateway.url, GAMMA, lambda t: 0.3, until, width=1000),
        ]
        running = [asyncio.create_task(load) for load in loads]
        browser = await playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1280, "height": 820})
        await page.goto(base + "/playground")
        await asyncio.sleep(max(0.0, seconds - 10))
        await page.fill("#key", ALPHA)
        await page.fill("#prompt", PROMPT)
        await page.select_option("#size", "1264x848")
        await page.fill("#number", "4")
        await page.click("#send")
        await page.locator("#summary", has_text="4 images in").wait_for(timeout=30_000)
        for image in await page.locator("figure.image img").all():
            await image.evaluate("img => img.decode()")
        await page.screenshot(path=out / "playground.png")
        console = await browser.new_page(viewport={"width": 1280, "height": 1100})
        await console.goto(base + "/console")
        await console.fill("#key", ADMIN)
        await console.click("#login button[type=submit]")
        await console.locator("#links .state.ready").wait_for(timeout=10_000)
        await asyncio.sleep(3)  # a few ticks while the load still runs
        await console.screenshot(path=out / "console.png", full_page=True)
        await asyncio.gather(*running)
        await browser.close()
    await hooks.cleanup()
    print(f"wrote {out / 'playground.png'} and {out / 'console.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.seconds, args.out))
