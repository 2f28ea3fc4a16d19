"""What the browser tests do the way a user does: type in the box, read the replies."""

from __future__ import annotations

from playwright.sync_api import expect

#: The users in the browser tests' databases (username: password).
USERS = {"alice": "alice-pass-8731", "bob": "bob-pass-2209", "carol": "carol-pass-5150"}


def send(page, text: str) -> None:
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    # While a reply is still being finished (its text shown, its outcome not yet stored) the
    # page does not send, as a person would see: wait until it can.
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()
    box.press("Enter")


def turns(page):
    return page.locator("#messages article")


def reply(page, index: int = -1):
    """The assistant's part of a turn (its text, status line, actions)."""
    turn = turns(page).last if index == -1 else turns(page).nth(index)
    return turn.locator(".msg-assistant")


def reply_text(page, index: int = -1):
    turn = turns(page).last if index == -1 else turns(page).nth(index)
    return turn.locator(".reply")


def chats(page):
    return page.get_by_role("navigation", name="Chats")


def words(prefix: str, count: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(1, count + 1))
