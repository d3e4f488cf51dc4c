"""Processes the tests start as a user would (tests/ is on sys.path: `from processes import
lorastack_serve`)."""

from __future__ import annotations

import asyncio
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def lorastack_serve(root: Path, store: Path, *args: str, timeout_s: float = 600):
    """`lorastack serve` as a user starts it, on a free port of 127.0.0.1, supervised as the
    gateway supervises its vLLM (ChildProcess); yields its URL once /health answers 200. Its log
    is root/serve.log; a start that fails shows the log's end."""
    from lorastack.serve.vllm_proc import ChildProcess, StartError, free_port

    port = free_port()
    server = ChildProcess("`lorastack serve`", port, root / "serve.log", [
        sys.executable, "-m", "lorastack", "serve", "--store", str(store), "--port", str(port),
        "--work-dir", str(root / "work"), "--log-level", "warning", *args],
        env={"LORASTACK_POLL_INTERVAL_S": "0.25"})
    try:
        asyncio.run(server.start().wait_healthy(timeout_s))
    except StartError as exc:
        pytest.fail(str(exc))
    try:
        yield server.url
    finally:
        server.stop(60)
