"""What lorastack adds inside vLLM's own processes, through vLLM's plugin entry point.

Registered as the `vllm.general_plugins` entry point `lorastack` (pyproject.toml), so vLLM calls
`register()` in every process it starts (API server, engine core, workers), in the gateway's
child and in any `vllm serve` where lorastack is installed.

What it does: on the CPU platform, it points vLLM at `GroupedPunicaWrapperCPU`, whose LoRA ops
run one matmul per adapter in the batch instead of gathering a weight matrix per token, and
leave tokens without an adapter untouched (vLLM 0.32's CPU ops give them the last slot's LoRA);
and it makes seeded sampling survive chunked prefill on the CPU (seeded.py: vLLM 0.32's engine
dies there). On any platform, with LORASTACK_RESOLVER_STORE set, it registers a LoRA resolver
that serves adapters from a lorastack store by name (resolver.py); the `vllm.endpoint_plugins`
entry (endpoint.py) puts the resolver's reasons into vLLM's 404s.
It acts only on versions it was verified against and stands aside elsewhere, saying so.
`LORASTACK_VLLM_PATCHES=0` turns it off.
"""

from __future__ import annotations

import logging
import os

VERIFIED_VLLM = ("0.32.0",)  # versions whose punica_cpu / torch_ops this was checked against
CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
GROUPED_WRAPPER = "lorastack.serve.vllm_plugin.punica.GroupedPunicaWrapperCPU"


def register() -> None:
    """vLLM's entry point: install the grouped CPU LoRA ops where they apply, and the store
    resolver when LORASTACK_RESOLVER_STORE asks for it (resolver.py)."""
    status = install()
    level = logging.INFO if status.startswith("active") else logging.WARNING
    _logger().log(level, "lorastack vLLM plugin: %s", status)
    from lorastack.serve.vllm_plugin import resolver

    _logger().info("lorastack vLLM plugin: %s", resolver.register())


def install() -> str:
    """Apply the patch if it applies; return what was done, in words (idempotent)."""
    if os.environ.get("LORASTACK_VLLM_PATCHES", "1").strip().lower() in ("0", "false", "no",
                                                                         "off"):
        return "off (LORASTACK_VLLM_PATCHES=0): vLLM's own CPU LoRA ops are used"
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return f"standing aside: platform {current_platform.device_name!r} is not the CPU"
    if vllm.__version__ not in VERIFIED_VLLM:
        return (f"standing aside: vLLM {vllm.__version__} is not a version it was verified "
                f"against ({', '.join(VERIFIED_VLLM)})")
    from lorastack.serve.vllm_plugin import seeded

    seeded_status = seeded.install()
    platform = type(current_platform)
    current = platform.get_punica_wrapper()
    if current == GROUPED_WRAPPER:
        return f"active (already installed): grouped CPU LoRA ops; {seeded_status}"
    if current != CPU_WRAPPER:
        return (f"standing aside: the platform's punica wrapper is {current}, not "
                f"{CPU_WRAPPER}; {seeded_status}")
    platform.get_punica_wrapper = classmethod(
        lambda cls: GROUPED_WRAPPER)
    return (f"active: grouped CPU LoRA ops (one matmul per adapter; no-LoRA rows untouched); "
            f"{seeded_status}")


def _logger() -> logging.Logger:
    # under the `vllm` logger, so that the line lands in vLLM's log with its format
    return logging.getLogger("vllm.plugins.lorastack")
