"""Browser tests: the real marketflow process (tests/e2e fixtures) seen through headless chromium.

Without Debian's chromium (which `make test` installs when it can) every test here is skipped
with one line saying what to install.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.browser.harness import chromium_problem, launch
from tests.e2e.conftest import dbname, marketflow, prefix  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    problem = chromium_problem()
    if problem:
        pytest.skip(problem)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


class PageLog:
    """What a page did: console messages, uncaught errors and every request's URL."""

    def __init__(self, page: Any) -> None:
        self.console: list[tuple[str, str, str]] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda m: self.console.append((m.type, m.text, m.location["url"])))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: self.requests.append(r.url))

    def console_errors(self) -> list[tuple[str, str, str]]:
        """Console errors and warnings (a failed request among them)."""
        return [
            (kind, text, url) for kind, text, url in self.console if kind in ("error", "warning")
        ]

    def foreign_requests(self, origin: str) -> list[str]:
        """Requests to anywhere but `origin` (data: URLs are not requests to another origin)."""
        ws = origin.replace("http://", "ws://", 1)
        return [
            url
            for url in self.requests
            if not (url.startswith((origin + "/", ws + "/")) or url.startswith("data:"))
        ]


Opener = Callable[..., tuple[Any, PageLog]]


@pytest.fixture
def open_page(browser: Any) -> Iterator[Opener]:
    """open_page(width=1280, height=900) -> (page, log): a fresh browser context each time."""
    contexts: list[Any] = []

    def open_(width: int = 1280, height: int = 900) -> tuple[Any, PageLog]:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        return page, PageLog(page)

    yield open_
    for context in contexts:
        context.close()
