"""Helpers of the browser tests: Debian's Chromium driven by Playwright.

Each test starts the real stack (``tests.support.stack``) and opens the chat
page served by the edge in one browser context per user. Every page is
watched: a console error or warning, a Content-Security-Policy violation or
an uncaught exception is a problem, and a test ends by asserting there were
none. A test that kills a service under the pages names the few browser
network messages that such a kill causes and allows only those.

Needs Debian's Chromium (``apt-get install -y chromium``) and the Python
package ``playwright`` (it drives the system Chromium; no browser download).
Without Chromium the tests are skipped, unless ``CI=true``: then they fail.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Error,
    Locator,
    Page,
    Playwright,
    ViewportSize,
    WebSocket,
    async_playwright,
    expect,
)

STRICT_CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self'; "
    "script-src 'self'; img-src 'self' data:"
)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
STEP_MS = 15_000
expect.set_options(timeout=STEP_MS)

DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 375, "height": 740}

# Reports a CSP violation in the console, whatever Chromium itself prints.
_WATCH_CSP = """
document.addEventListener('securitypolicyviolation', (e) => {
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || 'inline'}`);
});
"""

# What the browser itself logs when a WebSocket cannot connect (a killed edge).
SOCKET_FAILED = re.compile(r"^WebSocket connection to 'ws://127\.0\.0\.1:\d+/websocket' failed")


def directives(policy: str) -> dict[str, set[str]]:
    """``"a x y; b z"`` -> ``{"a": {"x", "y"}, "b": {"z"}}``."""
    parsed: dict[str, set[str]] = {}
    for part in policy.split(";"):
        if part.strip():
            name, *values = part.split()
            parsed[name.lower()] = set(values)
    return parsed


def assert_strict_policy(header: str | None) -> None:
    """The page is served under (at least) the strict policy it is written for."""
    assert header, "the edge serves / without a Content-Security-Policy"
    served = directives(header)
    for name, values in directives(STRICT_CSP).items():
        assert served.get(name) == values, f"CSP {name}: {served.get(name)} != {values}"


def chromium_executable() -> str:
    """Path of the system Chromium; skip (or fail under CI=true) without it."""
    for candidate in (
        os.environ.get("WADDLE_CHROMIUM", ""),
        "/usr/bin/chromium",
        shutil.which("chromium") or "",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if os.environ.get("CI") == "true":
        pytest.fail("Chromium is required under CI=true: apt-get install -y chromium")
    pytest.skip("Chromium is not installed (apt-get install -y chromium)")


@dataclass
class Problems:
    """Console errors and warnings, CSP violations and uncaught exceptions of every page."""

    found: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def watch(self, page: Page, who: str) -> None:
        def on_console(message: ConsoleMessage) -> None:
            if message.type not in ("error", "warning"):
                return
            if any(p.search(message.text) for p in self.allowed):
                return
            self.found.append(f"{who}: console {message.type}: {message.text}")

        def on_page_error(error: Error) -> None:
            self.found.append(f"{who}: uncaught {error}")

        page.on("console", on_console)
        page.on("pageerror", on_page_error)

    def allow(self, *patterns: re.Pattern[str]) -> None:
        """Messages the browser prints for a fault the test causes on purpose."""
        self.allowed.extend(patterns)


@dataclass
class Client:
    """One user: a browser context with the chat page open and signed in."""

    name: str
    context: BrowserContext
    page: Page
    sockets: list[WebSocket]

    # -- locators ---------------------------------------------------------------

    @property
    def messages(self) -> Locator:
        """Confirmed and pending messages of the channel shown."""
        return self.page.locator("#scroller .msg")

    def message(self, text: str) -> Locator:
        """The message of the channel shown whose text is exactly ``text``."""
        return self.messages.filter(
            has=self.page.locator(".content", has_text=re.compile(f"^{re.escape(text)}$"))
        )

    def channel(self, channel_id: str) -> Locator:
        return self.page.locator(f'#channel-list .channel-item[data-channel="{channel_id}"]')

    def member(self, name: str) -> Locator:
        return self.page.locator("#members .member").filter(
            has=self.page.locator(".member-name", has_text=re.compile(f"^{re.escape(name)}"))
        )

    # -- actions -------------------------------------------------------------------

    async def send(self, text: str) -> None:
        await self.page.locator("#composer").fill(text)
        await self.page.locator("#composer").press("Enter")

    async def join(self, channel_id: str) -> None:
        await self.page.locator("#join-channel-input").fill(channel_id)
        await self.page.locator("#join-channel-input").press("Enter")
        await expect(self.page.locator("#channel-title")).to_have_text(f"#{channel_id}")
        await expect(self.channel(channel_id)).to_have_attribute("data-state", "live")

    async def open_channel(self, channel_id: str) -> None:
        await self.channel(channel_id).locator(".channel-link").click()
        await expect(self.page.locator("#channel-title")).to_have_text(f"#{channel_id}")

    async def expect_connected(self) -> None:
        await expect(self.page.locator("#conn-state")).to_have_class(re.compile(r"\bstate-open\b"))


@asynccontextmanager
async def chromium() -> AsyncIterator[tuple[Playwright, Browser]]:
    """The system Chromium, closed on exit."""
    executable = chromium_executable()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield pw, browser
        finally:
            await browser.close()


async def open_page(
    browser: Browser,
    url: str,
    who: str,
    problems: Problems,
    *,
    viewport: ViewportSize | None = None,
    color_scheme: Any = "light",
    scale: float = 1,
) -> tuple[BrowserContext, Page, list[WebSocket]]:
    """A fresh context with the page loaded (not signed in); its sockets are recorded."""
    context = await browser.new_context(
        viewport=viewport or DESKTOP, color_scheme=color_scheme, device_scale_factor=scale
    )
    context.set_default_timeout(STEP_MS)
    await context.add_init_script(_WATCH_CSP)
    page = await context.new_page()
    problems.watch(page, who)
    sockets: list[WebSocket] = []

    def on_socket(socket: WebSocket) -> None:
        sockets.append(socket)

    page.on("websocket", on_socket)
    response = await page.goto(f"{url}/")
    assert response is not None and response.ok, f"GET / answered {response}"
    assert_strict_policy(await response.header_value("content-security-policy"))
    return context, page, sockets


async def sign_in(
    browser: Browser,
    url: str,
    name: str,
    problems: Problems,
    *,
    channel: str = "general",
    token: str | None = None,
    viewport: ViewportSize | None = None,
    color_scheme: Any = "light",
    scale: float = 1,
) -> Client:
    """Open the page as a new user and sign in: by name (development mode) or with ``token``."""
    context, page, sockets = await open_page(
        browser, url, name, problems, viewport=viewport, color_scheme=color_scheme, scale=scale
    )
    if token is None:
        await page.locator("#name").fill(name)
    else:
        await page.get_by_label("With a token").check()
        await page.locator("#token").fill(token)
    await page.locator("#channel").fill(channel)
    await page.locator("#sign-in").click()
    client = Client(name, context, page, sockets)
    await client.expect_connected()
    await expect(client.channel(channel)).to_have_attribute("data-state", "live")
    return client


async def texts(locator: Locator) -> list[str]:
    """The trimmed text of every element ``locator`` matches, in document order."""
    return [t.strip() for t in await locator.all_text_contents()]


def only(items: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """``items`` that are in ``wanted``, in their order (to check an order of a few)."""
    return [i for i in items if i in wanted]
