"""The vLLM child's start-up failure path: a clear error carrying vLLM's own last log lines."""

from __future__ import annotations

import asyncio

import pytest

from lorastack.serve.settings import ServeSettings
from lorastack.serve.vllm_proc import VllmProcess, VllmStartError


def test_command_keeps_vllm_private_and_lora_enabled(tmp_path):
    proc = VllmProcess(ServeSettings(capacity=6, max_loras=3), tmp_path, "base",
                       tmp_path / "vllm.log")
    cmd = proc.command()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--enable-lora" in cmd
    assert cmd[cmd.index("--max-cpu-loras") + 1] == "6"
    assert cmd[cmd.index("--max-loras") + 1] == "3"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failed_start_reports_the_last_log_lines(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = VllmProcess(ServeSettings(), missing, "base", tmp_path / "vllm.log")
    proc.start()
    try:
        with pytest.raises(VllmStartError) as err:
            asyncio.run(proc.wait_healthy(240))
    finally:
        proc.stop()
    message = str(err.value)
    assert "exited with code" in message and "Last lines of" in message
    assert "no-such-model" in message  # vLLM's own words about what is wrong
