"""The page's fixtures: ONE real gateway for the whole session (`lorastack serve` as a subprocess,
real vLLM, the real default base model, a classification adapter trained here in seconds), the
page itself (built by build_page, launched on a free port) and Debian's chromium via Playwright.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from demo_helpers import OUTPUT, copy_adapter

KEY, ADMIN = "demo-key", "demo-admin"
LABELS = ["positive", "negative", "neutral"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def train_classifier(root: Path, name: str) -> None:
    """A tiny sentiment adapter on the real base model (2 steps: it only has to be real)."""
    from lorastack.train import train

    train({"name": name, "base": "smollm2-135m", "store": str(root / "staging"),
           "runs_dir": str(root / "runs"), "quantization": "none",
           "task": {"type": "classification", "prompt": "{text}",
                    "system": "Classify the sentiment.", "labels": LABELS},
           "data": {"source": "drug-reviews", "limit_train": 16, "limit_eval": 8,
                    "max_length": 160},
           "lora": {"r": 8, "alpha": 16, "layers": [27, 28, 29]},
           "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "save_every": 2}})


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, base_model):
    from lorastack.adapters.store import AdapterStore
    from lorastack.serve.vllm_proc import free_port

    root = tmp_path_factory.mktemp("demo-gateway")
    started = time.monotonic()
    train_classifier(root, "sentiment")
    staging, store = AdapterStore(root / "staging"), AdapterStore(root / "served")
    copy_adapter(staging, "sentiment", store, "sentiment")
    copy_adapter(staging, "sentiment", store, "sentiment-2")
    print(f"\nadapter trained in {time.monotonic() - started:.0f} s")
    port = free_port()
    log = (root / "serve.log").open("w")
    env = {**os.environ, "LORASTACK_POLL_INTERVAL_S": "0.25"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorastack", "serve", "--store", str(store.root), "--port",
         str(port), "--api-key", KEY, "--admin-key", ADMIN, "--work-dir", str(root / "work"),
         "--max-batch", "8", "--max-tokens", "64", "--capacity", "4", "--max-loras", "2",
         "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`lorastack serve` exited with {proc.returncode}:\n"
                            f"{(root / 'serve.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the gateway was not healthy after 600 s:\n"
                            f"{(root / 'serve.log').read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        print(f"gateway healthy {time.monotonic() - started:.0f} s after the start")
        yield SimpleNamespace(url=url, key=KEY, admin=ADMIN, labels=LABELS, store=store,
                              staging=staging, log=root / "serve.log")
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # its own session: the gateway and its vLLM child
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


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
