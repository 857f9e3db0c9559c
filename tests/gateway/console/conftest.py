"""A gateway as `make run` starts it (the embedded local provider), with two tenants and an
admin key, and a headless Chromium driven by Playwright for the pages.

Chromium is the OS package (`make test` installs it with apt-get where it can), launched by its
path: nothing is downloaded at run time. Where there is none, or Playwright is not installed,
the browser tests skip and say why."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.gateway.conftest import ALPHA, BETA, running

ADMIN = "admin-key-for-tests"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    """CHROMIUM_PATH, else the first Chromium on PATH."""
    given = os.environ.get("CHROMIUM_PATH")
    if given:
        return given
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def console_config(**tenants: Any) -> Any:
    from gateway.config import AdminSettings, Config, ServerSettings, Tenant

    return Config(
        server=ServerSettings(port=0, drain_deadline=0.5),
        # no provider URL and no key: the embedded local provider, as `make run`
        admin=AdminSettings(keys=[ADMIN]),
        tenants={
            "alpha": Tenant(keys=[ALPHA], budget_per_day=5.0),
            "beta": Tenant(keys=[BETA]),
            **tenants,
        },
    )


@contextlib.asynccontextmanager
async def console_gateway(config: Any | None = None) -> AsyncIterator[Any]:
    async with running(config or console_config()) as instance:
        yield instance


@pytest.fixture
async def gateway() -> AsyncIterator[Any]:
    async with console_gateway() as instance:
        yield instance


def base_url(gateway: Any) -> str:
    return f"http://127.0.0.1:{gateway.port}"


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install -e '.[test]'")
    path = chromium_path()
    if path is None:
        pytest.skip(
            "no Chromium on PATH (nor CHROMIUM_PATH): `make test` installs the OS package "
            "chromium with apt-get where it can (root, Debian); the browser tests need it"
        )
    async with async_playwright() as playwright:
        # --no-sandbox: CI and developers' machines run as root, where Chromium's sandbox
        # refuses to start; the pages are this gateway's own, on loopback
        instance = await playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield instance
        finally:
            await instance.close()
