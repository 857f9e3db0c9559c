"""The console and the playground in a real browser (headless Chromium, the OS package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.gateway.conftest import ALPHA, BETA
from tests.gateway.console.conftest import ADMIN, base_url
from tests.gateway.console.test_console import console_of, run_task

TIMEOUT = 20_000  # ms, Playwright's unit

PROMPT = "a boxer backstage under a hard spotlight, chalk dust"


async def open_page(browser: Any, url: str) -> Any:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # read by check_clean
    await page.goto(url)
    return page


def check_clean(page: Any) -> None:
    """No script error on the page (a CSP refusal would be one)."""
    assert page.errors == []


async def generate(page: Any, key: str, *, results: int = 2) -> None:
    await page.fill("#key", key)
    await page.fill("#prompt", PROMPT)
    await page.select_option("#size", "1264x848")
    await page.fill("#number", str(results))
    await page.select_option("#format", "PNG")
    await page.click("#send")


async def test_the_playground_produces_images_from_a_prompt(
    gateway: Any, browser: Any, tmp_path: Path
) -> None:
    page = await open_page(browser, base_url(gateway) + "/playground")
    # the size list is the gateway's catalogue
    assert "848x1264 (2:3)" in await page.locator("#size").inner_text()
    await generate(page, ALPHA, results=3)
    images = page.locator("figure.image img")
    await images.nth(2).wait_for(timeout=TIMEOUT)
    await page.locator("#summary", has_text="3 images in").wait_for(timeout=TIMEOUT)
    for i in range(3):  # each one loaded: decoded by the browser, not a broken image
        await images.nth(i).evaluate("img => img.decode()")
        assert await images.nth(i).evaluate("img => img.naturalWidth") == 1264
    captions = await page.locator("figure.image figcaption").all_inner_texts()
    assert len(captions) == 3 and all(" s" in c and "$" in c for c in captions)
    # the gateway ran it as any client's task, for the key's tenant
    ended = console_of(gateway).all.recent[-1]
    assert (ended.tenant, ended.state, ended.images) == ("alpha", "done", 3)
    check_clean(page)
    await page.screenshot(path=tmp_path / "playground.png")


async def test_a_bad_size_shows_the_error_on_the_size_field(gateway: Any, browser: Any) -> None:
    page = await open_page(browser, base_url(gateway) + "/playground")
    await page.fill("#key", ALPHA)
    await page.fill("#prompt", PROMPT)
    await page.select_option("#size", "custom")
    await page.fill("#width", "1000")
    await page.fill("#height", "1000")
    await page.click("#send")
    error = page.locator("#size-field .error")
    await error.wait_for(timeout=TIMEOUT)
    assert "1000x1000" in await error.inner_text()
    assert "1024x1024" in await error.inner_text()  # what is allowed, from the error
    assert await page.locator(".field.invalid").count() == 1
    assert await page.locator("#size-field.invalid").count() == 1
    assert await page.locator("figure.image img").count() == 0
    check_clean(page)


async def test_a_wrong_key_shows_on_the_key_field(gateway: Any, browser: Any) -> None:
    page = await open_page(browser, base_url(gateway) + "/playground")
    await generate(page, "not-a-key")
    error = page.locator(".field[data-params~='apiKey'] .error")
    await error.wait_for(timeout=TIMEOUT)
    assert await error.inner_text()
    check_clean(page)


async def sign_in(page: Any, key: str) -> None:
    await page.fill("#key", key)
    await page.click("#login button[type=submit]")


async def test_the_console_shows_the_link_ready_and_the_task_the_playground_ran(
    gateway: Any, browser: Any, tmp_path: Path
) -> None:
    playground = await open_page(browser, base_url(gateway) + "/playground")
    await generate(playground, ALPHA)
    await playground.locator("#summary", has_text="2 images in").wait_for(timeout=TIMEOUT)
    task_uuid = console_of(gateway).all.recent[-1].task_uuid
    page = await open_page(browser, base_url(gateway) + "/console")
    await sign_in(page, ADMIN)
    await page.locator("#scope", has_text="admin").wait_for(timeout=TIMEOUT)
    await page.locator("#links .state.ready").wait_for(timeout=TIMEOUT)
    row = page.locator(f'#tasks tr:has(td[title="{task_uuid}"])')
    await row.wait_for(timeout=TIMEOUT)
    text = await row.inner_text()
    assert "alpha" in text and "done" in text and "2/2" in text
    tenants = await page.locator("#tenants tbody tr").all_inner_texts()
    assert any(t.startswith("alpha") for t in tenants) and any(
        t.startswith("beta") for t in tenants
    )
    # the plots are drawn, from the producer's points
    await page.locator("#plot-rate path.rate").wait_for(state="attached", timeout=TIMEOUT)
    check_clean(page)
    await page.screenshot(path=tmp_path / "console.png", full_page=True)


async def test_the_console_refuses_without_a_key_that_opens_it(gateway: Any, browser: Any) -> None:
    page = await open_page(browser, base_url(gateway) + "/console")
    await page.locator("#login").wait_for(timeout=TIMEOUT)  # no key yet: the form, no data
    assert await page.locator("#board").is_hidden()
    await sign_in(page, "not-an-admin-key")
    error = page.locator("#login-error")
    await error.wait_for(timeout=TIMEOUT)
    assert "opens nothing" in await error.inner_text()
    assert await page.locator("#board").is_hidden()
    check_clean(page)


async def test_a_tenant_key_sees_its_own_tenant_only(gateway: Any, browser: Any, http: Any) -> None:
    alpha = await run_task(http, gateway, ALPHA)
    beta = await run_task(http, gateway, BETA)
    page = await open_page(browser, base_url(gateway) + "/console")
    await sign_in(page, BETA)
    await page.locator("#scope", has_text="tenant: beta").wait_for(timeout=TIMEOUT)
    await page.locator(f'#tasks td[title="{beta}"]').wait_for(timeout=TIMEOUT)
    assert await page.locator(f'#tasks td[title="{alpha}"]').count() == 0
    tenants = await page.locator("#tenants tbody tr").all_inner_texts()
    assert len(tenants) == 1 and tenants[0].startswith("beta")
    headers = await page.locator("#links th").all_inner_texts()
    assert headers == ["link", "state"]  # the window and the rest are the operator's
    check_clean(page)
