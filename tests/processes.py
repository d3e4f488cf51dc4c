"""Processes the tests start as a user would (tests/ is on sys.path: `from processes import
lorastack_serve`)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


@contextmanager
def lorastack_serve(root: Path, store: Path, *args: str, timeout_s: float = 600):
    """`lorastack serve` as a user starts it (a subprocess; its vLLM child in the same session),
    on a free port of 127.0.0.1; yields its URL once /health answers 200. Its log is
    root/serve.log; a start that fails shows the log's end."""
    from lorastack.serve.vllm_proc import free_port

    port = free_port()
    log_path = root / "serve.log"
    env = {**os.environ, "LORASTACK_POLL_INTERVAL_S": "0.25"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorastack", "serve", "--store", str(store), "--port",
             str(port), "--work-dir", str(root / "work"), "--log-level", "warning", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"`lorastack serve` exited with {proc.returncode}:\n"
                                f"{log_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the gateway was not healthy after {timeout_s:.0f} s:\n"
                                f"{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGINT)  # its own session: the gateway and its vLLM
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def copy_adapter(src, name: str, dst, new_name: str):
    """The same weights under another name, written to store `dst` as a new adapter."""
    adapter = src.resolve(name)
    return dst.write(new_name, adapter.path, dataclasses.replace(adapter.manifest,
                                                                 name=new_name))
