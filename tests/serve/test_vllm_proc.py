"""The vLLM child's start-up failure path: a clear error carrying vLLM's own last log lines;
the child-process supervision under it."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from lorastack.serve.settings import ServeSettings
from lorastack.serve.vllm_proc import (
    ChildProcess,
    StartError,
    VllmProcess,
    free_port,
)


def test_command_keeps_vllm_private_and_lora_enabled(tmp_path):
    proc = VllmProcess(ServeSettings(capacity=6, max_loras=3), tmp_path, "base",
                       tmp_path / "vllm.log")
    cmd = proc.args
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--enable-lora" in cmd
    assert cmd[cmd.index("--max-cpu-loras") + 1] == "6"
    assert cmd[cmd.index("--max-loras") + 1] == "3"
    assert proc.url == f"http://127.0.0.1:{proc.port}"
    # --vllm-host (a private cluster network): bound to every address, still checked locally
    wide = VllmProcess(ServeSettings(vllm_host="0.0.0.0"), tmp_path, "base", tmp_path / "v.log")
    assert wide.args[wide.args.index("--host") + 1] == "0.0.0.0"
    assert wide.url == f"http://127.0.0.1:{wide.port}"
    node = VllmProcess(ServeSettings(vllm_host="10.0.0.7"), tmp_path, "base", tmp_path / "v.log")
    assert node.url == f"http://10.0.0.7:{node.port}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failed_start_reports_the_last_log_lines(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = VllmProcess(ServeSettings(), missing, "base", tmp_path / "vllm.log")
    proc.start()
    try:
        with pytest.raises(StartError) as err:
            asyncio.run(proc.wait_healthy(240))
    finally:
        proc.stop()
    message = str(err.value)
    assert "exited with code" in message and "Last lines of" in message
    assert "no-such-model" in message  # vLLM's own words about what is wrong


# -- ChildProcess: the supervision the gateway, the benchmarks and the tests share -------------

def _child(tmp_path, code: str, *args: str, hint: str = "") -> ChildProcess:
    """`python -c code PORT *args` as a child on a free port."""
    port = free_port()
    return ChildProcess("the child", port, tmp_path / "child.log",
                        [sys.executable, "-c", code, str(port), *args], slow_hint=hint)


def test_a_child_is_healthy_then_stopped_with_its_group(tmp_path):
    (tmp_path / "health").write_text("ok")
    serve = ("import http.server, os, sys; os.chdir(sys.argv[2]); http.server.test("
             "http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind='127.0.0.1')")
    child = _child(tmp_path, serve, str(tmp_path)).start()
    try:
        assert asyncio.run(child.wait_healthy(60)) < 60 and child.exit_code() is None
        pid = child.pid
    finally:
        child.stop()
    assert child.pid is None and child.exit_code() == -1
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of its session is left
    assert "=== lorastack: starting the child:" in (tmp_path / "child.log").read_text()


def test_a_child_that_dies_or_hangs_says_so_with_its_log(tmp_path):
    dead = _child(tmp_path, "import sys; print('no such model here'); sys.exit(3)").start()
    with pytest.raises(StartError) as died:
        asyncio.run(dead.wait_healthy(60))
    assert "the child exited with code 3 while starting" in str(died.value)
    assert "Last lines of" in str(died.value) and "  | no such model here" in str(died.value)
    hung = _child(tmp_path, "import time; time.sleep(60)", hint=" (wait longer)").start()
    with pytest.raises(StartError, match=r"not become healthy within 1 s \(wait longer\)"):
        asyncio.run(hung.wait_healthy(1))
    assert hung.proc is None  # stopped when it timed out


def test_context_fits_a_base_with_fewer_positions(tmp_path):
    """vLLM refuses --max-model-len above the model's positions; a small base gets its own."""
    import json

    from lorastack.serve.settings import fit_context

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    fitted, note = fit_context(ServeSettings(), tmp_path)
    assert (fitted.max_model_len, fitted.max_prompt_tokens) == (512, 384)
    assert "above the base model's 512 positions" in note
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 4096}))  # GPT-2's key
    same, note = fit_context(ServeSettings(), tmp_path)
    assert (same.max_model_len, same.max_prompt_tokens, note) == (1024, 768, "")
