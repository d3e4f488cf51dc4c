"""The page's fixtures: the session's real gateway (`quickstart` in tests/conftest.py: `lorastack
serve` as a subprocess, real vLLM, the real default base model, adapters trained there in
seconds), the page itself (built by build_page, launched on a free port) and Debian's chromium
via Playwright.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from demo_helpers import OUTPUT

KEY, ADMIN = "demo-key", "demo-admin"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="session")
def gateway(quickstart):
    """The session's real gateway (tests/conftest.py: `quickstart`), keyless as the quickstart
    serves it; the keys below are sent and ignored (the keyed paths: tests/test_client.py)."""
    return SimpleNamespace(url=quickstart.url, key=KEY, admin=ADMIN, labels=quickstart.labels,
                           store=quickstart.store, staging=quickstart.staging,
                           log=quickstart.log)


@pytest.fixture(scope="session")
def client(gateway):
    """lorastack.client with both keys, as a program would use it."""
    from lorastack.client import Client

    with Client(gateway.url, api_key=gateway.key, admin_key=gateway.admin) as c:
        yield c


@pytest.fixture(scope="session")
def page_client(gateway):
    """The page's client: lorastack.client with the page's hints (`lorastack demo`'s)."""
    from lorastack.demo.app import page_client

    c = page_client(gateway.url, api_key=gateway.key, admin_key=gateway.admin)
    yield c
    c.close()


@pytest.fixture(scope="session")
def page_url(page_client):
    """The page, as `lorastack demo` starts it, on a free port of 127.0.0.1."""
    from lorastack.demo.app import build_page
    from lorastack.serve.vllm_proc import free_port

    port = free_port()
    page = build_page(page_client)
    page.queue(default_concurrency_limit=4).launch(server_name="127.0.0.1", server_port=port,
                                                   prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    page.close()


@pytest.fixture(scope="module")
def browser():
    """Module-scoped: Playwright's sync API keeps an event loop running in the main thread while
    it is open, which breaks asyncio.run() in any test collected after this module."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run `make setup` (it installs it)"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, page_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    p = context.new_page()
    p.set_default_timeout(120_000)
    p.goto(page_url)
    p.wait_for_selector("#cls_btn")
    yield p
    context.close()
