"""Screenshots of the chat page for the README, from a seeded stack.

``python -m tests.web.screenshots [--out docs/screenshots]`` seeds a fresh
database with a small team conversation (yesterday's and today's
messages, a thread, unread messages in another channel) through the store's
own API, starts the real stack on it, connects a few teammates (one away,
one busy, one typing) and signs in as Maya in Chromium. It writes
``desktop-light.png``, ``desktop-dark.png``, ``phone-light.png`` and
``phone-dark.png`` (1280x800 and 375x740 at twice the pixel density) and
``desktop-thread.png`` (the thread panel open). Needs Chromium, like the
browser tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
from playwright.async_api import Browser, ViewportSize, expect

from store_service.cursors import ReadCursor, ReadCursors
from store_service.db import create_engine
from store_service.repository import ChannelAppend, NewMessage, Repository
from tests.support.client import WsClient
from tests.support.stack import Stack, migrate, start_stack
from tests.web.browser import DESKTOP, PHONE, Client, Problems, chromium, open_page

ME = ("u-maya", "maya")
TEAM = {
    "leo": ("u-leo", "leo"),
    "priya": ("u-priya", "priya"),
    "sam": ("u-sam", "sam"),
    "jonas": ("u-jonas", "jonas"),
}
SHOTS = ("desktop-light", "desktop-dark", "phone-light", "phone-dark", "desktop-thread")


def _at(day: datetime, hour: int, minute: int) -> int:
    return int(day.replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp() * 1000)


def _message(who: tuple[str, str], text: str, ts: int, thread: str | None = None) -> NewMessage:
    return NewMessage(
        id=str(uuid.uuid4()),
        user_id=who[0],
        username=who[1],
        content=text,
        thread_id=thread,
        timestamp_ms=ts,
    )


def conversation(now: datetime) -> dict[str, list[NewMessage]]:
    """The seeded messages of each channel, oldest first."""
    yesterday = now - timedelta(days=1)
    leo, priya, sam, jonas = (TEAM[n] for n in ("leo", "priya", "sam", "jonas"))

    def ago(minutes: int) -> int:
        return int((now - timedelta(minutes=minutes)).timestamp() * 1000)

    root = _message(
        priya,
        "The compact variant looks great on the 375 px mock. Ship it behind the flag today?",
        ago(52),
    )
    design = [
        _message(
            priya,
            "Pushed the new onboarding flow to staging. Eyes on the empty states before "
            "Thursday would be lovely.",
            _at(yesterday, 16, 2),
        ),
        _message(
            leo,
            "Looking now. The illustration on step 2 feels heavy on phones.",
            _at(yesterday, 16, 5),
        ),
        _message(leo, "Could we try the compact variant there?", _at(yesterday, 16, 6)),
        _message(ME, "Agreed, I'll mock the compact one tonight.", _at(yesterday, 16, 20)),
        _message(sam, "Morning! Standup notes are in the team doc.", ago(64)),
        root,
        _message(leo, "Yes, the flag is ready.", ago(50), thread=root.id),
        _message(ME, "I'll flip it after lunch.", ago(47), thread=root.id),
        _message(sam, "Ship it.", ago(45), thread=root.id),
        _message(leo, "Release notes draft is in the shared folder, section 3 is new.", ago(41)),
        _message(jonas, "Dark mode screenshots are attached to the ticket.", ago(33)),
        _message(ME, "Thanks! I'll read the notes before the review.", ago(30)),
    ]
    general = [
        _message(jonas, "Lunch at 12:30? The new ramen place.", ago(90)),
        _message(sam, "In.", ago(88)),
        _message(priya, "Count me in, I'll book a table for five.", ago(20)),
    ]
    random_ = [
        _message(leo, "Who left the good coffee beans in the kitchen? Hero.", _at(yesterday, 11, 0))
    ]
    return {"design": design, "general": general, "random": random_}


async def seed(database_url: str, now: datetime) -> None:
    """Write the conversation into a migrated database, and Maya's read position."""
    engine = create_engine(database_url)
    try:
        repository = Repository(engine)
        for channel, messages in conversation(now).items():
            await repository.append_batch([ChannelAppend(channel, 0, messages)])
        await ReadCursors(repository).set([ReadCursor(ME[0], "random", 1)])
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def teammates(stack: Stack) -> AsyncIterator[WsClient]:
    """Leo (online), Priya (away) and Sam (busy) in #design; yields Leo's socket."""
    async with aiohttp.ClientSession() as http:
        clients: list[WsClient] = []
        try:
            for name, status in (("leo", "online"), ("priya", "away"), ("sam", "dnd")):
                user_id, username = TEAM[name]
                client = await WsClient.connect(
                    http, stack.ws_url("design"), token=stack.token(user_id, username)
                )
                await client.recv_type("initial_state")
                if status != "online":
                    await client.send({"type": "presence", "status": status})
                clients.append(client)
            yield clients[0]
        finally:
            for client in clients:
                await client.close()


async def shoot(
    browser: Browser,
    stack: Stack,
    leo: WsClient,
    out: Path,
    name: str,
    *,
    viewport: ViewportSize,
    scheme: str,
    scale: float,
    problems: Problems,
) -> Client:
    # Signed in as the page restores a session after a reload: three channels
    # joined, #design shown (so #general keeps its unread messages).
    context, page, sockets = await open_page(
        browser,
        stack.edge_url,
        ME[1],
        problems,
        viewport=viewport,
        color_scheme=scheme,
        scale=scale,
    )
    session = {
        "credentials": {"mode": "token", "token": stack.token(*ME)},
        "channels": ["design", "general", "random"],
        "active": "design",
        "status": "online",
    }
    await page.evaluate("s => sessionStorage.setItem('waddle.session', s)", json.dumps(session))
    await page.reload()
    maya = Client(ME[1], context, page, sockets)
    await maya.expect_connected()
    # #general's badge needs Maya's read cursor, which a busy store may not
    # give within the edge's second: join again then (a reload), a few times.
    badge = maya.channel("general").locator(".badge")
    for _ in range(3):
        with contextlib.suppress(AssertionError):
            await expect(badge).to_have_text("3", timeout=5_000)
            break
        await page.reload()
        await maya.expect_connected()
    await expect(badge).to_have_text("3")
    await expect(page.locator("#members .member")).to_have_count(4)
    await expect(maya.message("Thanks! I'll read the notes before the review.")).to_be_visible()
    # Leo starts typing (again: an unchanged state may not be sent on to others).
    await leo.send({"type": "typing", "isTyping": False})
    await leo.send({"type": "typing", "isTyping": True})
    await expect(page.locator("#typing")).to_have_text("leo is typing…")
    await page.locator("#composer").fill("")
    await page.locator("#scroller").evaluate("el => { el.scrollTop = el.scrollHeight; }")
    await page.mouse.move(0, 0)
    await page.locator("#composer").blur()
    await page.screenshot(path=out / f"{name}.png")
    return maya


async def capture(out: Path, shots: Sequence[str] = SHOTS) -> list[Path]:
    """Write the screenshots into ``out``; return their paths."""
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    written: list[Path] = []
    problems = Problems()
    with tempfile.TemporaryDirectory(prefix="waddle-shots-") as tmp:
        tmp_path = Path(tmp)
        url = f"sqlite+aiosqlite:///{tmp_path / 'waddle.db'}"
        await migrate(url)
        await seed(url, datetime.now())
        async with (
            start_stack(tmp_path, database_url=url) as stack,
            teammates(stack) as leo,
            chromium() as (_pw, browser),
        ):
            for name in shots:
                phone = name.startswith("phone")
                maya = await shoot(
                    browser,
                    stack,
                    leo,
                    out,
                    name,
                    viewport=PHONE if phone else DESKTOP,
                    scheme="dark" if name.endswith("dark") else "light",
                    scale=2 if phone else 1,  # phones have dense screens
                    problems=problems,
                )
                if name == "desktop-thread":
                    root = maya.message(
                        "The compact variant looks great on the 375 px mock. "
                        "Ship it behind the flag today?"
                    )
                    await root.locator(".replies").click()
                    panel = maya.page.locator("#thread-panel")
                    await expect(panel.locator(".replies-heading")).to_have_text("3 replies")
                    await maya.page.locator("#thread-composer").fill("Flipping it now.")
                    await maya.page.mouse.move(0, 0)
                    await maya.page.screenshot(path=out / f"{name}.png")
                written.append(out / f"{name}.png")
                await maya.context.close()
            await leo.send({"type": "typing", "isTyping": False})
    if problems.found:
        raise RuntimeError("the page reported problems: " + "; ".join(problems.found))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args()
    started = time.monotonic()
    for path in asyncio.run(capture(args.out)):
        print(path)
    print(f"done in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
