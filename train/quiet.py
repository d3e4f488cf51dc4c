"""bitsandbytes' import-time CPU warning, dropped where it is noise and explained where not.

Importing bitsandbytes on a CPU with AVX512-BF16 (transformers and peft import it) logs
"Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels" unless
the optional `kernels` package can fetch a fused kernel from the Hugging Face Hub. That kernel
only speeds up 4-bit layers at inference (bitsandbytes' own CPU code runs them otherwise);
training never uses it, and a float or 8-bit run has no 4-bit layers at all. So the record
is dropped at its logger (installed when lorastack.train is imported, before anything imports
bitsandbytes), and a 4-bit run on CPU says once, in lorastack's words, what it means (see
cpu_4bit_note).
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_MESSAGE = "Failed to load CPU gemm_4bit_forward"
_state = {"dropped": False, "noted": False}


class _DropKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_MESSAGE):
            _state["dropped"] = True
            return False
        return True


def install() -> None:
    """Drop bitsandbytes' kernel warning from now on (idempotent; logging only, no import)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelWarning) for f in logger.filters):
        logger.addFilter(_DropKernelWarning())


def cpu_4bit_note() -> str | None:
    """What the dropped warning means for a 4-bit run on CPU; once per process, and only where
    bitsandbytes did warn (None otherwise, and on every later call)."""
    if not _state["dropped"] or _state["noted"]:
        return None
    _state["noted"] = True
    return ("4-bit on CPU: bitsandbytes found no fused CPU 4-bit kernel (an optional download "
            "through the `kernels` package) and uses its built-in one. Training steps never use "
            "that kernel; only 4-bit inference, the validation passes here, would be faster "
            "with it. The final metrics and the server use the float base.")
