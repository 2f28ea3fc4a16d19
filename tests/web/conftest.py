"""Fixtures of the browser tests: one fake OpenAI server, one service under uvicorn and one
headless Chromium for the session; a fresh browser context (cookies, storage) per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_openai import FakeOpenAI
from tests.web.helpers import USERS
from tests.web.live import Service, launch_browser, prepare_database, start_service


@pytest.fixture(autouse=True)
def _drain_generations() -> None:
    """The browser tests start no generation in this process (the service runs in its own):
    this replaces the suite's async fixture of the same name, so that these synchronous tests
    (Playwright's sync API) never enter an asyncio event loop."""


@pytest.fixture(scope="session")
def web_fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def fake(web_fake: FakeOpenAI) -> Iterator[FakeOpenAI]:
    web_fake.reset()
    yield web_fake
    web_fake.reset()


@pytest.fixture(scope="session")
def database_template(tmp_path_factory) -> Path:
    """Migrated once, with USERS; each service runs on a copy."""
    return prepare_database(tmp_path_factory.mktemp("web-db") / "template.sqlite3", users=USERS)


@pytest.fixture(scope="session")
def service(tmp_path_factory, web_fake: FakeOpenAI, database_template: Path) -> Iterator[Service]:
    """The service as `make run` serves it (anonymous use allowed, the default)."""
    running = start_service(
        tmp_path_factory.mktemp("web-service"), web_fake.url, database=database_template
    )
    yield running
    running.stop()


@pytest.fixture(scope="session")
def playwright_instance():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=10_000)

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="session")
def browser(playwright_instance):
    browser = launch_browser(playwright_instance)
    yield browser
    browser.close()


class PageProblems:
    """What the page reported to its console: errors, CSP violations, uncaught exceptions."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.exceptions: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.exceptions.append(str(error)))

    def _console(self, message) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    @property
    def csp_violations(self) -> list[str]:
        return [e for e in self.errors if "Content Security Policy" in e]


@pytest.fixture
def new_page(browser, service: Service):
    """Opens pages in fresh contexts: new_page(**context_options) -> page. Every page is
    checked at the end for uncaught exceptions and CSP violations."""
    contexts = []
    problems: list[PageProblems] = []

    def open_page(**options):
        options.setdefault("base_url", service.url)
        options.setdefault("viewport", {"width": 1200, "height": 800})
        context = browser.new_context(**options)
        context.set_default_timeout(10_000)
        contexts.append(context)
        page = context.new_page()
        page.problems = PageProblems(page)
        problems.append(page.problems)
        return page

    yield open_page
    for context in contexts:
        context.close()
    for seen in problems:
        assert seen.exceptions == [], seen.exceptions
        assert seen.csp_violations == [], seen.csp_violations


@pytest.fixture
def page(new_page):
    page = new_page()
    page.goto("/")
    page.locator("body.ready").wait_for()
    return page
