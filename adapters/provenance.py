"""Where a result came from: the machine and the library versions, as training runs (summary.json
and the adapter's manifest) and the benchmarks (bench/results/*.json) record them."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterable
from typing import Any

from lorastack.adapters import allocator

# What an adapter's manifest records: the libraries that made its weights, and Python.
TRAINING_LIBRARIES = ("lorastack", "torch", "transformers", "peft", "bitsandbytes",
                      "safetensors", "python")


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, GPU (if any): what a reader needs to compare numbers."""
    cpu: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for key, _, value in (line.partition(":") for line in fh):
            cpu.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(cpu.get("flags", "").split())
    info: dict[str, Any] = {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma")
                      if f in flags],
        "memory_gib": None, "platform": platform.platform(),
        "python": platform.python_version(), "gpu": None,
        "allocator": allocator.active(),  # memory and speed figures depend on it
    }
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                   / 2**30, 1)
    with contextlib.suppress(ImportError):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_machine(m: dict[str, Any] | None = None) -> str:
    """`machine()` (or a recorded one) in one line: CPU, cores, memory, GPU, and the allocator
    when it was recorded (records before 2026-12-07 lack it)."""
    m = m if m is not None else machine()
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    malloc = {"tcmalloc": ", tcmalloc", "system": ", glibc malloc"}.get(
        str(m.get("allocator")), "")
    return f"{m['cpu']}, {m['cores']} cores, {m.get('memory_gib')} GiB{gpu}{malloc}"


def library_versions(names: Iterable[str] = TRAINING_LIBRARIES) -> dict[str, str]:
    """The version of each of `names` that is installed ("python": Python's)."""
    from importlib import metadata

    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = (platform.python_version() if name == "python"
                           else metadata.version(name))
    return found
