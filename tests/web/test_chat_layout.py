"""Layout, themes and accessibility of the chat page.

At a 375 px phone width nothing scrolls sideways, the channel list and the
member list are drawers that the keyboard opens and closes (Escape gives
the focus back), and a thread takes the whole width. Every control has an
accessible name; new messages from others are announced in a live region.
The light and dark themes follow the system or the picker, and the choice
(and the session) survive a reload. Needs Chromium (see
``tests/web/browser.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from tests.support.stack import start_stack
from tests.web.browser import PHONE, Problems, chromium, open_page, sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LIGHT_PANEL = "rgb(255, 255, 255)"
DARK_PANEL = "rgb(23, 27, 36)"

# Visible form controls and buttons without an accessible name (a label,
# aria-label(ledby), or text of their own).
UNNAMED = """
() => Array.from(document.querySelectorAll('button, input, select, textarea, a[href]'))
  .filter((el) => el.checkVisibility())
  .filter((el) => {
    const labelled = el.getAttribute('aria-labelledby');
    const name = (el.getAttribute('aria-label') || '').trim()
      || (labelled ? labelled.split(' ').map((id) => document.getElementById(id)?.textContent ?? '').join(' ').trim() : '')
      || (el.labels ? Array.from(el.labels, (l) => l.textContent).join(' ').trim() : '')
      || (['BUTTON', 'A'].includes(el.tagName) ? el.textContent.trim() : '');
    return !name;
  })
  .map((el) => el.outerHTML.slice(0, 120))
"""

# Whether anything is wider than the viewport (sideways scrolling).
OVERFLOW = """
() => {
  const width = document.documentElement.clientWidth;
  const wide = [document.documentElement.scrollWidth > width ? 'document' : null];
  for (const el of document.querySelectorAll('body *')) {
    if (!el.checkVisibility()) continue;
    const box = el.getBoundingClientRect();
    if (box.right > width + 1 && getComputedStyle(el).position !== 'fixed') wide.push(el.id || el.className);
  }
  return wide.filter(Boolean);
}
"""


async def panel_colour(page: Page) -> str:
    return str(
        await page.locator("#conversation").evaluate("el => getComputedStyle(el).backgroundColor")
    )


async def test_phone_width_drawers_and_keyboard(tmp_path: Path) -> None:
    problems = Problems()
    async with start_stack(tmp_path, dev_mode=True) as stack, chromium() as (_pw, browser):
        _context, page, _sockets = await open_page(
            browser, stack.edge_url, "sign-in", problems, viewport=PHONE
        )
        assert await page.evaluate(OVERFLOW) == []
        assert await page.evaluate(UNNAMED) == []
        await page.context.close()

        alice = await sign_in(browser, stack.edge_url, "alice", problems, viewport=PHONE)
        bob = await sign_in(browser, stack.edge_url, "bob", problems)
        page = alice.page
        await bob.send("a rather long message " * 8)
        await expect(alice.messages).to_have_count(1)
        assert await page.evaluate(OVERFLOW) == []
        assert await page.evaluate(UNNAMED) == []

        # The channel list is a drawer: the keyboard opens it and Escape closes it.
        sidebar = page.locator("#sidebar")
        menu = page.locator("#open-sidebar")
        await expect(sidebar).to_be_hidden()
        await menu.focus()
        await menu.press("Enter")
        await expect(sidebar).to_be_visible()
        await expect(menu).to_have_attribute("aria-expanded", "true")
        await expect(alice.channel("general").locator(".channel-link")).to_be_focused()
        assert await page.evaluate(UNNAMED) == []
        await page.keyboard.press("Escape")
        await expect(sidebar).to_be_hidden()
        await expect(menu).to_be_focused()

        # Joining from the drawer closes it and shows the channel.
        await menu.click()
        await alice.join("random")
        await expect(sidebar).to_be_hidden()
        await expect(page.locator("#composer")).to_be_focused()

        # An unread count shows on the menu button while the list is closed.
        await bob.send("over here")
        await expect(page.locator("#menu-badge")).to_have_text("1")

        # The member list is a drawer too.
        members = page.locator("#members-panel")
        await expect(members).to_be_hidden()
        await page.locator("#toggle-members").click()
        await expect(members).to_be_visible()
        await expect(page.locator("#close-members")).to_be_focused()
        await page.keyboard.press("Escape")
        await expect(members).to_be_hidden()
        await expect(page.locator("#toggle-members")).to_be_focused()

        # A thread takes the whole width; closing it gives the focus back.
        await menu.click()
        await alice.channel("general").locator(".channel-link").click()
        message = alice.messages.first
        await message.get_by_role("button", name="Reply to bob in a thread").click()
        thread = page.locator("#thread-panel")
        await expect(thread).to_be_visible()
        box = await thread.bounding_box()
        assert box is not None and box["x"] == 0 and box["width"] == PHONE["width"]
        assert await page.evaluate(UNNAMED) == []
        await page.locator("#close-thread").click()
        await expect(thread).to_be_hidden()
        await expect(message).to_be_focused()
    assert problems.found == []


async def test_themes_announcements_and_reload(tmp_path: Path) -> None:
    problems = Problems()
    async with start_stack(tmp_path, dev_mode=True) as stack, chromium() as (_pw, browser):
        alice = await sign_in(browser, stack.edge_url, "alice", problems)
        night = await sign_in(browser, stack.edge_url, "nina", problems, color_scheme="dark")
        page = alice.page
        assert await page.evaluate(UNNAMED) == []

        # The system's scheme by default; the picker overrides it.
        assert await panel_colour(page) == LIGHT_PANEL
        assert await panel_colour(night.page) == DARK_PANEL
        await page.locator("#theme").select_option("dark")
        assert await panel_colour(page) == DARK_PANEL
        await night.page.locator("#theme").select_option("light")
        assert await panel_colour(night.page) == LIGHT_PANEL

        # Others' new messages are announced politely; your own are not.
        announcer = page.locator("#announcer")
        await expect(announcer).to_have_attribute("aria-live", "polite")
        await night.send("good evening")
        await expect(announcer).to_have_text("nina: good evening")
        await alice.send("hi nina")
        await expect(night.page.locator("#announcer")).to_have_text("alice: hi nina")
        await expect(announcer).to_have_text("nina: good evening")

        # The skip link leads to the message box.
        await page.locator(".skip-link").focus()
        await page.keyboard.press("Enter")
        await expect(page.locator("#composer")).to_be_focused()

        # A reload keeps the theme, the session and the conversation.
        await page.reload()
        await alice.expect_connected()
        assert await panel_colour(page) == DARK_PANEL
        await expect(page.locator("#theme")).to_have_value("dark")
        await expect(page.locator("#me-name")).to_have_text("alice")
        await expect(alice.message("hi nina")).to_have_attribute("data-state", "acked")
        await expect(alice.message("good evening").locator(".author")).to_have_text("nina")
        await expect(night.page.locator("#members .member")).to_have_count(2)
    assert problems.found == []
