"""bitsandbytes' CPU kernel warning: never printed by the training path, explained once for a
4-bit run on CPU."""

from __future__ import annotations

import logging
import subprocess
import sys

from lorastack.train import quiet

WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def test_the_training_path_imports_without_the_warning():
    # What a training run imports, bitsandbytes included (transformers and peft pull it in).
    code = ("import lorastack.train.run, lorastack.train.model\n"
            "from transformers import AutoModelForCausalLM, BitsAndBytesConfig\n"
            "import peft, bitsandbytes\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "gemm_4bit_forward" not in done.stderr + done.stdout


def test_the_warning_is_dropped_at_its_logger_whatever_the_cpu(caplog, monkeypatch):
    monkeypatch.setattr(quiet, "_state", {"dropped": False, "noted": False})
    quiet.install()
    quiet.install()  # idempotent
    logger = logging.getLogger(quiet.BNB_CPU_LOGGER)
    assert sum(isinstance(f, quiet._DropKernelWarning) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning(WARNING + ": %s. Please make sure you already `pip install kernels`",
                       "No module named 'kernels'")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
    assert quiet._state["dropped"]


def test_a_4bit_cpu_load_explains_it_once(tiny_base, tiny_config, monkeypatch, capsys):
    import torch

    from lorastack.train.config import build_config
    from lorastack.train.model import load_base

    monkeypatch.setattr(quiet, "_state", {"dropped": True, "noted": False})
    cfg = build_config({**tiny_config, "quantization": "4bit"})
    for _ in range(2):
        load_base(cfg, tiny_base, torch.device("cpu"))
    load_base(cfg.model_copy(update={"quantization": "none"}), tiny_base, torch.device("cpu"))
    out = capsys.readouterr()
    assert out.out.count("4-bit on CPU: bitsandbytes found no fused CPU 4-bit kernel") == 1
    assert "Training steps never use that kernel" in out.out
    assert WARNING not in out.out + out.err
