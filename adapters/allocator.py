"""The memory allocator lorastack's processes run under: tcmalloc where it is installed.

glibc's malloc keeps much of what a training step frees (the holes between live tensors) and
keeps a different amount each run. Measured here (SmolLM2, 8 x 224 tokens, 4 steps, fresh
processes): float32 peaked at 7775 and 8279 MiB under glibc, 4891 and 4891 under tcmalloc;
4-bit with checkpointing at 4223 and 4317 MiB, against 1610 and 1613; the steps took as long
or less. PyTorch's CPU launcher (torch.backends.xeon.run_cpu --enable-tcmalloc)
preloads it the same way. `make setup` installs gperftools' tcmalloc_minimal (Debian's
libtcmalloc-minimal4).

An allocator is chosen before a process starts, through LD_PRELOAD, so:
- the `lorastack` command runs itself again, once, with tcmalloc preloaded (`reexec`);
- the training processes of `--nproc` get it through their environment (`environment`);
- the vLLM engine does not (`without`), although vLLM's CPU worker asks for it: measured here
  (2-core AMD EPYC, the gateway with 2 adapters, concurrency 4, two runs each), the engine's
  memory was the same (2371-2380 MiB in all), 32 generation requests on adapters took longer
  (14.3-17.0 s against 12.7-13.5 s, warm), and the base model's and /v1/classify's loads were
  within 10% either way;
- LORASTACK_ALLOCATOR=system keeps glibc's malloc (to compare, or where tcmalloc misbehaves).
A process that imports lorastack as a library keeps the allocator it started with; `active`
says which one that is, and the memory plan counts the allocator's slack accordingly.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path

ENV = "LORASTACK_ALLOCATOR"
NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
        "/usr/local/lib", "/usr/local/lib64")
# tcmalloc prints a line for every allocation above 1 GiB by default (an 8B model's embedding
# is 2 GiB): only above 1 TiB here.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_tcmalloc() -> Path | None:
    """tcmalloc's shared library: in this Python's prefix (a conda or virtual environment),
    then the system's library folders; None when it is not installed or not Linux."""
    if not sys.platform.startswith("linux"):
        return None
    prefixes = [os.environ.get("CONDA_PREFIX"), sys.prefix]
    dirs = [Path(p) / "lib" for p in prefixes if p] + [Path(d) for d in DIRS]
    for folder in dirs:
        for name in NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether lorastack should preload tcmalloc (unless LORASTACK_ALLOCATOR=system)."""
    choice = (os.environ if env is None else env).get(ENV, "tcmalloc").strip().lower()
    if choice not in ("tcmalloc", "system"):
        raise ValueError(f"{ENV}={choice!r}: use tcmalloc (the default) or system")
    return choice == "tcmalloc"


@functools.cache  # fixed when the process starts; the memory plan asks for every batch tried
def active() -> str:
    """The allocator this process runs under: "tcmalloc" or "system" (glibc's malloc)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            return "tcmalloc" if any("libtcmalloc" in line for line in fh) else "system"
    except OSError:
        return "system"


def environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with tcmalloc first in LD_PRELOAD, for a process that
    lorastack starts; unchanged when it is not wanted, not installed, or already there."""
    out = dict(os.environ if env is None else env)
    lib = find_tcmalloc() if wanted(out) else None
    preload = out.get("LD_PRELOAD", "")
    if lib is None or "libtcmalloc" in preload:
        return out
    out["LD_PRELOAD"] = f"{lib}:{preload}" if preload else str(lib)
    for key, value in QUIET.items():
        out.setdefault(key, value)
    return out


def without(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with tcmalloc taken out of LD_PRELOAD (the rest kept): for a process that runs
    better under glibc's malloc."""
    out = dict(env)
    kept = [p for p in out.get("LD_PRELOAD", "").split(":") if p and "libtcmalloc" not in p]
    if kept:
        out["LD_PRELOAD"] = ":".join(kept)
    else:
        out.pop("LD_PRELOAD", None)
    return out


def for_child(choice: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a child that must run under `choice`, "tcmalloc"
    or "system", whatever this process runs under (benchmarks comparing the two)."""
    base = dict(os.environ if env is None else env)
    return environment({**base, ENV: "tcmalloc"}) if choice == "tcmalloc" else without(base)


def release_free_memory() -> None:
    """Give the kernel back what the allocator holds but no longer uses, so that the resident
    size shows what is in use (tcmalloc: ReleaseFreeMemory; glibc: malloc_trim)."""
    import ctypes

    try:
        if active() == "tcmalloc":  # preloaded: its symbols are in the global namespace
            ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reexec() -> None:
    """Replace this process by itself with tcmalloc preloaded, when it is wanted, installed
    and not yet there (the `lorastack` command calls this first). Runs at most once: a second
    start finds the library in LD_PRELOAD and goes on, even if the loader refused it."""
    if active() == "tcmalloc" or "libtcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    env = environment()
    if "libtcmalloc" not in env.get("LD_PRELOAD", ""):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
