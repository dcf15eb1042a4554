"""The dashboard in a real browser: Debian's chromium, driven by Playwright, against a real bgproxy.

The browser is the system's chromium (`apt-get install chromium`, done by .ci/system-deps), never a
browser Playwright downloads. It runs on the test's own event loop (uvloop): Playwright's async API
only needs subprocess pipes, which uvloop has, so the proxy, the origins, the traffic and the browser
share one loop and every wait is on a condition (Playwright's expect), not a sleep.

``BGPROXY_SCREENSHOT=1`` makes the rollout test write docs/dashboard.png after a minute of traffic
(``BGPROXY_SCREENSHOT_SECONDS`` to change that); without it, the test still takes the screenshot, to
its temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import MakeProxy, RunningProxy
from stores import StoreServer
from upstreams import Origin, origin

from bgproxy.admin import ui

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # pragma: no cover - the dev extras install it
    async_playwright = expect = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "browser-test-token-0123456789"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"
# What Chromium logs by itself for an answer the page expects and handles (401 before the token, 409).
HANDLED_STATUS = re.compile(r"^Failed to load resource: the server responded with a status of (401|409)\b")

STATIC = Path(__file__).resolve().parents[1] / "bgproxy" / "admin" / "static"


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if CHROMIUM is None:
        pytest.skip(
            "Debian's chromium is not installed: `bash .ci/system-deps` installs it "
            "(apt-get install chromium); Playwright never downloads a browser here"
        )
    if async_playwright is None or expect is None:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    expect.set_options(timeout=5000)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Tab:
    """A page with its console errors collected (uncaught exceptions and CSP violations included)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def card(self, color: str, name: str) -> Any:
        return self.page.locator(f'#card-{color} [data-f="{name}"]')

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not HANDLED_STATUS.match(e)]


async def open_tab(browser: Any, proxy: RunningProxy, path: str = "/", **viewport: int) -> Tab:
    page = await browser.new_page(
        viewport={"width": viewport.get("width", 1280), "height": viewport.get("height", 800)}
    )
    page.set_default_timeout(5000)
    tab = Tab(page)
    response = await page.goto(proxy.admin_url + path)
    assert response is not None and response.status == 200
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "default-src 'none'" in csp
    return tab


async def confirm(tab: Tab, button: str, *, reason: str | None = None) -> None:
    """Click an action and confirm it in the page's dialog."""
    page = tab.page
    await page.locator(button).click()
    dialog = page.locator("#confirm")
    await expect(dialog).to_be_visible()
    if reason:
        await page.locator("#confirm-reason").fill(reason)
    await page.locator("#confirm-ok").click()
    await expect(dialog).to_be_hidden()


async def send(http: aiohttp.ClientSession, proxy: RunningProxy, n: int) -> list[str]:
    """``n`` requests through the proxy, one after another; the color that answered each."""
    colors = []
    for _ in range(n):
        async with http.get(f"{proxy.url}/echo") as r:
            await r.read()
            colors.append(r.headers.get("X-Color", "none"))
    return colors


async def state(http: aiohttp.ClientSession, proxy: RunningProxy, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(f"{proxy.admin_url}/v1/state", headers=headers) as r:
        assert r.status == 200
        return await r.json()


async def test_the_page_and_its_files_are_served_with_a_strict_policy(
    make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    """Plain HTTP, no browser: what is served, with which headers; the page itself holds no data."""
    proxy = await make_proxy(admin={"listen": "127.0.0.1:0", "tokens": {"ops": TOKEN}})
    base = proxy.admin_url
    pages = []
    for path in ("/", "/ui/"):
        async with http.get(base + path) as r:  # no token: the page asks for one itself
            assert r.status == 200
            assert r.content_type == "text/html"
            headers = r.headers
            pages.append(await r.text())
        csp = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
        assert csp["default-src"] == "'none'"
        for directive in ("script-src", "style-src", "connect-src", "img-src"):
            assert csp[directive] == "'self'"
        assert csp["frame-ancestors"] == "'none'"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"
    assert pages[0] == pages[1] == (STATIC / "index.html").read_text()

    html = pages[0]
    assert "<style" not in html and " style=" not in html  # no inline style
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/ui/app.js" defer>']  # no inline script
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    for name in ("index.html", "app.js", "app.css"):
        text = (STATIC / name).read_text()
        origins = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", text)) - {"http://www.w3.org"}
        assert not origins, f"{name} refers to another origin: {origins}"  # nothing from a CDN

    for path, kind in [("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")]:
        async with http.get(base + path) as r:
            assert r.status == 200 and r.content_type == kind
            assert r.headers["Cache-Control"] == "no-cache"
            etag = r.headers["ETag"]
        async with http.get(base + path, headers={"If-None-Match": etag}) as r:
            assert r.status == 304
    async with http.get(base + "/favicon.ico") as r:
        assert r.status == 200 and r.content_type == "image/svg+xml"
    async with http.get(base + "/ui", allow_redirects=False) as r:
        assert r.status == 308 and r.headers["Location"] == "/ui/"
    for path in ("/ui/nope.js", "/ui/../pyproject.toml", "/ui/static/app.js"):
        async with http.get(base + path) as r:
            assert r.status == 404
    async with http.head(base + "/") as r:
        assert r.status == 200


async def test_an_install_without_the_page_files_still_serves_the_api(
    make_proxy: MakeProxy, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing() -> None:
        raise FileNotFoundError("bgproxy/admin/static/index.html")

    monkeypatch.setattr(ui, "load_assets", missing)
    proxy = await make_proxy()
    async with http.get(proxy.admin_url + "/") as r:
        assert r.status == 500
        assert "the dashboard's files are missing" in await r.text()
    async with http.get(proxy.admin_url + "/v1/state") as r:
        assert r.status == 200


async def test_page_shows_the_weights_and_a_confirmed_flip_moves_live_and_traffic_within_a_second(
    browser: Any, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy(blue=[blue.addr], green=[green.addr])
        # A stream open on blue keeps its drain going after the flip, so the countdown shows.
        stream = await http.get(f"{proxy.url}/sse?n=0&interval=0.2")
        tab = await open_tab(browser, proxy)
        page = tab.page
        await expect(page.locator("#conn")).to_have_text("live")
        await expect(tab.card("blue", "share")).to_have_text("100%")
        await expect(tab.card("blue", "weight")).to_have_text("100")
        await expect(tab.card("green", "share")).to_have_text("0%")
        await expect(tab.card("blue", "status")).to_have_text(re.compile("live", re.I))
        await expect(tab.card("green", "status")).to_have_text(re.compile("idle", re.I))
        await expect(page.locator("#flip")).to_have_text("Flip to green")

        # Cancel changes nothing.
        await page.locator("#flip").click()
        await page.locator("#confirm-cancel").click()
        await expect(page.locator("#confirm")).to_be_hidden()
        assert (await state(http, proxy))["version"] == 0

        await page.locator("#flip").click()
        await expect(page.locator("#confirm-text")).to_contain_text("green")
        await page.locator("#confirm-reason").fill("browser test")
        started = time.monotonic()
        await page.locator("#confirm-ok").click()
        await expect(page.locator("#card-green")).to_have_attribute("data-state", "live", timeout=1000)
        assert time.monotonic() - started < 1.0
        await expect(tab.card("green", "share")).to_have_text("100%", timeout=1000)
        await expect(page.locator("#result")).to_contain_text("green is live")

        # Blue drains with a countdown while its stream is open, and stops when the stream ends.
        await expect(tab.card("blue", "status")).to_have_text(re.compile("draining", re.I))
        await expect(tab.card("blue", "drain")).to_be_visible()
        await expect(tab.card("blue", "drain-left")).to_have_text(re.compile(r"^\d+ s$"))
        await expect(tab.card("blue", "drain-open")).to_contain_text("1 open streams")

        # The traffic follows, and the page counts it.
        assert await send(http, proxy, 30) == ["green"] * 30
        await expect(tab.card("green", "total")).to_have_text("30 since start", timeout=3000)
        await expect(tab.card("green", "rate")).to_have_text(re.compile(r"^[\d.]+/s$"))
        stream.close()
        await expect(tab.card("blue", "drain")).to_be_hidden()
        await expect(tab.card("blue", "status")).to_have_text(re.compile("idle", re.I))

        # The audit log shows the flip with its reason and who made it.
        row = page.locator("#events-body tr").first
        await expect(row).to_contain_text("100/0 → 0/100")
        await expect(row).to_contain_text("browser test")
        await expect(row).to_contain_text("local")

        # Phone width: one column, nothing wider than the screen, the controls still there.
        await page.set_viewport_size({"width": 390, "height": 844})
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await expect(page.locator("#flip")).to_be_visible()
        await expect(page.locator("#weights-slider")).to_be_visible()
        blue_box = await page.locator("#card-blue").bounding_box()
        green_box = await page.locator("#card-green").bounding_box()
        assert blue_box is not None and green_box is not None
        assert green_box["y"] >= blue_box["y"] + blue_box["height"]  # stacked, not squeezed
        assert tab.errors == []


async def test_the_error_ratio_shown_is_the_one_in_v1_state(
    browser: Any, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        blue.fail_ratio = 0.2
        proxy = await make_proxy(blue=[blue.addr], green=[green.addr], weights=(50, 50))
        tab = await open_tab(browser, proxy)
        await expect(tab.page.locator("#conn")).to_have_text("live")
        colors = await send(http, proxy, 60)  # 30 each by smooth weighted round robin; 6 of blue's fail
        assert colors.count("blue") == 30
        pools = (await state(http, proxy))["pools"]
        assert pools["blue"]["error_window"]["requests"] == 30
        for color in ("blue", "green"):
            window = pools[color]["error_window"]
            ratio = tab.card(color, "error-ratio")
            await expect(tab.card(color, "error-counts")).to_have_text(
                f"{window['errors']} of {window['requests']}", timeout=3000
            )
            await expect(ratio).to_have_text(f"{window['error_ratio'] * 100:.2f}%")
            assert float(await ratio.get_attribute("data-value") or "nan") == window["error_ratio"]
        await expect(tab.card("blue", "error-ratio")).to_have_text("20.00%")
        await expect(tab.card("blue", "share")).to_have_text("50%")
        assert tab.errors == []


async def test_with_a_token_configured_nothing_works_until_it_is_given(
    browser: Any, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy(
            blue=[blue.addr], green=[green.addr], admin={"listen": "127.0.0.1:0", "tokens": {"ops": TOKEN}}
        )
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        tab = Tab(page)
        answers: list[tuple[str, int]] = []
        page.on("response", lambda r: answers.append((r.url, r.status)) if "/v1/" in r.url else None)
        await page.goto(proxy.admin_url + "/ui/")
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#dash")).to_be_hidden()
        await expect(page.locator("#flip")).to_be_hidden()
        assert answers and all(status == 401 for _, status in answers)  # the page got nothing

        await page.locator("#token").fill("not-the-token")
        await page.locator("#login-form button").click()
        await expect(page.locator("#login-error")).to_contain_text("refused")
        await expect(page.locator("#dash")).to_be_hidden()
        assert all(status == 401 for _, status in answers)

        await page.locator("#token").fill(TOKEN)
        await page.locator("#login-form button").click()
        await expect(page.locator("#dash")).to_be_visible()
        await expect(page.locator("#login")).to_be_hidden()
        await expect(tab.card("blue", "share")).to_have_text("100%")
        await expect(page.locator("#conn")).to_have_text("live")
        assert await page.evaluate("sessionStorage.length") == 1

        await confirm(tab, "#flip")  # the token goes with the change, and the audit log names it
        await expect(page.locator("#card-green")).to_have_attribute("data-state", "live")
        await expect(page.locator("#events-body tr").first).to_contain_text("ops")
        assert (await state(http, proxy, TOKEN))["active"] == "green"

        await page.reload()  # kept for the tab's life: no second prompt
        await expect(page.locator("#dash")).to_be_visible()
        await expect(page.locator("#login")).to_be_hidden()
        other = await context.new_page()  # another tab has its own sessionStorage: asked again
        await other.goto(proxy.admin_url + "/")
        await expect(other.locator("#login")).to_be_visible()

        await page.locator("#signout").click()
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#dash")).to_be_hidden()
        assert await page.evaluate("sessionStorage.length") == 0
        assert tab.unexpected_errors() == []
        await context.close()


async def test_a_refused_change_shows_the_servers_own_message(
    browser: Any, make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy(blue=[blue.addr], green=[green.addr])
        tab = await open_tab(browser, proxy)
        page = tab.page
        await expect(page.locator("#conn")).to_have_text("live")

        # Green's server is down: the flip probe refuses (409) and names the upstream and why.
        await green.stop()
        async with http.post(f"{proxy.admin_url}/v1/flip", json={"to": "green"}) as r:
            assert r.status == 409
            refused = await r.json()
        await confirm(tab, "#flip")
        await expect(page.locator("#refusal")).to_be_visible()
        await expect(page.locator("#refusal-status")).to_have_text("409")
        await expect(page.locator("#refusal-error")).to_have_text(refused["error"])
        await expect(page.locator("#refusal-detail li")).to_have_text(refused["detail"])
        await expect(page.locator("#card-blue")).to_have_attribute("data-state", "live")

        await page.locator("#weights-slider").fill("30")  # the slider and Apply: refused the same way
        await expect(page.locator("#w-green")).to_have_text("30")
        await page.locator("#refusal").evaluate("node => { node.hidden = true; }")
        await confirm(tab, "#apply")
        await expect(page.locator("#refusal")).to_be_visible()
        await expect(page.locator("#refusal-error")).to_have_text(refused["error"])
        assert (await state(http, proxy))["version"] == 0  # nothing changed

        # A change the page has not seen yet: its If-Match version is stale, and it says so.
        await green.start()
        await page.route("**/v1/watch*", lambda route: route.abort())
        await page.reload()
        await expect(tab.card("blue", "share")).to_have_text("100%")
        async with http.put(f"{proxy.admin_url}/v1/weights", json={"blue": 90, "green": 10}) as r:
            assert r.status == 200 and (await r.json())["version"] == 1
        await confirm(tab, "#flip")
        await expect(page.locator("#refusal-error")).to_have_text(
            "version conflict: expected version 0, current version is 1"
        )
        await expect(page.locator("#refusal-detail li")).to_have_text(
            "nothing was changed; read /v1/state and retry"
        )
        assert (await state(http, proxy))["weights"] == {"blue": 90, "green": 10}


async def _traffic(http: aiohttp.ClientSession, proxy: RunningProxy, stop: asyncio.Event) -> None:
    """Steady traffic with a slow swell, so the sparklines have a shape."""
    started = time.monotonic()
    while not stop.is_set():
        elapsed = time.monotonic() - started
        async with http.get(f"{proxy.url}/echo") as r:
            await r.read()
        await asyncio.sleep(1 / (40 + 25 * math.sin(elapsed / 6)))


async def test_the_rollout_panel_shows_the_steps_and_drives_the_rollout(
    browser: Any, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        await _rollout_panel(browser, make_proxy, http, tmp_path, blue, green)


async def _rollout_panel(
    browser: Any,
    make_proxy: MakeProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    blue: Origin,
    green: Origin,
) -> None:
    proxy = await make_proxy(blue=[blue.addr], green=[green.addr])
    stop = asyncio.Event()
    traffic = asyncio.ensure_future(_traffic(http, proxy, stop))
    try:
        tab = await open_tab(browser, proxy)
        page = tab.page
        await expect(page.locator("#rollout-none")).to_be_visible()
        blue.fail_ratio = 0.002
        screenshot = os.environ.get("BGPROXY_SCREENSHOT")
        seconds = float(os.environ.get("BGPROXY_SCREENSHOT_SECONDS", "60"))
        if screenshot:  # history for the sparklines: two thirds before the rollout, a third after
            await asyncio.sleep(seconds * 2 / 3)
        body = {"to": "green", "steps": [10, 25, 50, 100], "step_pause": "1h", "reason": "deploy 42"}
        async with http.post(f"{proxy.admin_url}/v1/rollouts", json=body) as r:
            assert r.status == 201, await r.text()
            rollout = await r.json()
        await expect(page.locator("#rollout-body")).to_be_visible()
        await expect(page.locator("#rollout-state")).to_have_text("running")
        await expect(page.locator("#rollout-meta")).to_contain_text(rollout["id"])
        steps = page.locator("#rollout-steps li")
        await expect(steps).to_have_text(["10% current", "25% pending", "50% pending", "100% pending"])
        await expect(tab.card("green", "share")).to_have_text("10%")
        candidate = page.locator("#rollout-evidence tbody tr").first
        await expect(candidate).to_contain_text("candidate (green)")
        await expect(candidate.locator("td").first).not_to_have_text("0", timeout=3000)  # evidence moves
        await expect(page.locator("#rollout-evidence")).to_contain_text("Threshold 0.50%")
        if screenshot:
            await asyncio.sleep(seconds / 3)
            DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=str(DOCS_SCREENSHOT), full_page=True)
        shot = tmp_path / "dashboard.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes().startswith(b"\x89PNG")

        buttons = {a: page.locator(f'[data-action="{a}"]') for a in ("promote", "pause", "resume", "abort")}
        await expect(buttons["resume"]).to_be_disabled()
        await confirm(tab, '[data-action="pause"]', reason="looking")
        await expect(page.locator("#rollout-state")).to_have_text("paused")
        await expect(buttons["pause"]).to_be_disabled()
        await expect(buttons["resume"]).to_be_enabled()
        await confirm(tab, '[data-action="resume"]')
        await expect(page.locator("#rollout-state")).to_have_text("running")
        await confirm(tab, '[data-action="abort"]')
        await expect(page.locator("#rollout-state")).to_have_text("aborted")
        for action in ("promote", "pause", "resume", "abort"):
            await expect(buttons[action]).to_be_disabled()
        await expect(tab.card("blue", "share")).to_have_text("100%")
        await expect(page.locator("#decision-count")).not_to_have_text("0")
        current = await (await http.get(f"{proxy.admin_url}/v1/rollouts/current")).json()
        assert current["state"] == "aborted"
        decisions = current["decisions"][-3:]
        assert [d["action"] for d in decisions] == ["pause", "resume", "aborted"]
        assert decisions[0]["reason"] == "paused by local (looking)"  # the dialog's reason went along
        assert tab.errors == []
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await traffic


async def test_a_fleet_node_shows_every_node_and_the_store(
    browser: Any, make_proxy: MakeProxy, store_server: StoreServer, tmp_path: Path
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        url = store_server.url(f"/ui-{tmp_path.name}/")
        one = await make_proxy(blue=[blue.addr], green=[green.addr], state_store=url, node_name="ui-one")
        await make_proxy(blue=[blue.addr], green=[green.addr], state_store=url, node_name="ui-two")
        tab = await open_tab(browser, one)
        page = tab.page
        await expect(page.locator("#fleet")).to_be_visible()
        await expect(page.locator("#fleet-store")).to_contain_text(f"{store_server.kind} ")
        await expect(page.locator("#fleet-store")).to_contain_text("ok · this node: ui-one")
        await expect(page.locator("#fleet-body tr")).to_have_count(2)
        await expect(page.locator('#fleet-body tr[data-node="ui-two"]')).to_contain_text("up to date")
        await expect(page.locator("#fleet-body")).to_contain_text("(leads rollouts)")
        assert tab.unexpected_errors() == []
