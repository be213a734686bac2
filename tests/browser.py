"""Headless Chromium (Debian's) through Playwright, and a viewer served on 127.0.0.1, for tests.

`sync_api()` skips the calling test when /usr/bin/chromium or the playwright package is missing
(install/setup-browser.sh installs both; Playwright never downloads a browser here).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("MMSHIM_CHROMIUM", "/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[1] / "docs"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}


def sync_api() -> Any:
    api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (install/setup-browser.sh)"
    )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            f"{CHROMIUM} is missing (install/setup-browser.sh installs Debian's chromium)",
            allow_module_level=True,
        )
    return api


@contextmanager
def chromium() -> Iterator[Any]:
    with sync_api().sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """The Flask app on a threaded werkzeug server at 127.0.0.1:<free port>; yields its URL."""
    from werkzeug.serving import make_server

    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        thread.join(10)


def new_page(browser: Any) -> Any:
    """A page whose console errors and page errors are collected in `page.problems`."""
    ctx = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    pg = ctx.new_page()
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    pg.problems = problems
    return pg


def wait_until(pg: Any, cond: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll a Python condition (wait_for_function would eval a string, which the page's CSP forbids)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        pg.wait_for_timeout(100)


def no_errors(pg: Any, allow_404: bool = False) -> None:
    bad = [p for p in pg.problems if not (allow_404 and "404" in p)]
    assert not bad, bad
