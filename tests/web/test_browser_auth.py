"""Logging in and out of the chat page, and users' chats kept apart (headless Chromium)."""

from __future__ import annotations

import re

import pytest

from tests.web.live import require_chromium

require_chromium()

from playwright.sync_api import expect  # noqa: E402

from tests.web.helpers import USERS, chats, reply_text, send  # noqa: E402
from tests.web.live import start_service  # noqa: E402


def log_in(page, username: str, password: str) -> None:
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in", exact=True).click()


@pytest.fixture(scope="module")
def private_service(tmp_path_factory, web_fake, database_template):
    """The service with anonymous use off: every API call needs a logged-in user."""
    running = start_service(
        tmp_path_factory.mktemp("web-private"),
        web_fake.url,
        database=database_template,
        CHAT_ALLOW_ANONYMOUS="false",
    )
    yield running
    running.stop()


def test_log_in_and_out_while_anonymous_use_is_allowed(new_page, service):
    page = new_page()
    page.goto("/")
    page.locator("body.ready").wait_for()
    page.get_by_role("link", name="Log in", exact=True).click()

    expect(page.get_by_role("heading", name="Log in to Chat")).to_be_visible()
    expect(page.get_by_role("link", name="Continue without an account")).to_be_visible()
    log_in(page, "carol", "wrong password")
    expect(page.get_by_role("alert")).to_contain_text("Please enter a correct username")
    log_in(page, "carol", USERS["carol"])

    page.locator("body.ready").wait_for()
    account = chats(page)
    expect(account).to_contain_text("carol")
    account.get_by_role("button", name="Log out", exact=True).click()
    expect(page.get_by_role("heading", name="Log in to Chat")).to_be_visible()
    page.get_by_role("link", name="Continue without an account").click()
    page.locator("body.ready").wait_for()
    expect(chats(page).get_by_role("link", name="Log in", exact=True)).to_be_visible()
    expect(chats(page)).not_to_contain_text("carol")


def test_login_is_required_and_users_never_see_each_others_chats(new_page, private_service):
    page = new_page(base_url=private_service.url)
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login/\?next=/$"))
    log_in(page, "alice", USERS["alice"])
    page.locator("body.ready").wait_for()
    assert page.url == f"{private_service.url}/"

    send(page, "Alice's secret plan [[reply:Noted, Alice.]]")
    expect(reply_text(page)).to_have_text("Noted, Alice.")
    alices_chat = page.url
    chats(page).get_by_role("button", name="Log out", exact=True).click()
    expect(page).to_have_url(re.compile(r"/login/"))

    log_in(page, "bob", USERS["bob"])
    page.locator("body.ready").wait_for()
    expect(chats(page)).to_contain_text("bob")
    expect(chats(page)).to_contain_text("No chats yet.")
    expect(page.get_by_text("Alice's secret plan")).to_have_count(0)

    page.goto(alices_chat)  # a direct link to someone else's chat
    page.locator("body.ready").wait_for()
    expect(page.get_by_role("alert")).to_contain_text("does not exist, or is not yours")
    expect(page.get_by_text("Noted, Alice.")).to_have_count(0)

    send(page, "Bob's own question [[reply:Hello, Bob.]]")
    expect(reply_text(page)).to_have_text("Hello, Bob.")
    expect(chats(page).get_by_role("link")).to_have_count(1)


def test_a_session_that_ends_leads_back_to_the_login_page(new_page, private_service):
    page = new_page(base_url=private_service.url)
    page.goto("/")
    log_in(page, "alice", USERS["alice"])
    page.locator("body.ready").wait_for()
    page.context.clear_cookies()  # the session expires while the page is open
    send(page, "Still logged in?")
    expect(page).to_have_url(re.compile(r"/login/\?next="))
