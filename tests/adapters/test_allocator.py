"""The allocator lorastack's processes run under (adapters/allocator.py): tcmalloc, installed by
`make setup`, preloaded by the `lorastack` command itself and by what it starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorastack.adapters import allocator

PROBE = ("from lorastack.adapters import allocator; allocator.reexec(); "
         "import os; print(allocator.active(), os.environ.get('LD_PRELOAD', ''))")


def _probe(**env: str) -> tuple[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", allocator.ENV)}
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env},
                          capture_output=True, text=True, timeout=60, check=True)
    name, _, preload = proc.stdout.strip().partition(" ")
    return name, preload


def test_setup_installed_tcmalloc():
    lib = allocator.find_tcmalloc()
    assert lib is not None, "make setup installs libtcmalloc-minimal4 (scripts/setup.sh)"
    assert lib.name.startswith("libtcmalloc") and lib.is_file()


def test_a_started_process_runs_itself_again_under_tcmalloc_once():
    name, preload = _probe()
    assert name == "tcmalloc"
    assert preload.split(":") == [str(allocator.find_tcmalloc())]  # once, not twice


def test_system_keeps_glibc_malloc():
    assert _probe(LORASTACK_ALLOCATOR="system") == ("system", "")


def test_a_preload_the_loader_refuses_does_not_loop(tmp_path):
    # a file named like tcmalloc that is not a library: the loader ignores it and says so;
    # the process must go on under glibc instead of starting itself again and again
    fake = tmp_path / "libtcmalloc_minimal.so.4"
    fake.write_bytes(b"not an ELF file")
    name, preload = _probe(LD_PRELOAD=str(fake))
    assert (name, preload) == ("system", str(fake))


def test_environment_puts_tcmalloc_first_and_keeps_the_rest():
    lib = str(allocator.find_tcmalloc())
    env = allocator.environment({"LD_PRELOAD": "/opt/x/libfoo.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{lib}:/opt/x/libfoo.so" and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert allocator.environment({})["LD_PRELOAD"] == lib
    already = {"LD_PRELOAD": "/somewhere/libtcmalloc.so.4"}
    assert allocator.environment(already) == already
    assert allocator.environment({"LORASTACK_ALLOCATOR": "system"}) == {
        "LORASTACK_ALLOCATOR": "system"}


def test_an_unknown_choice_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"LORASTACK_ALLOCATOR='jemalloc': use tcmalloc"):
        allocator.environment({"LORASTACK_ALLOCATOR": "jemalloc"})
    lorastack = Path(sys.executable).with_name("lorastack")
    proc = subprocess.run([str(lorastack), "version"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "LORASTACK_ALLOCATOR": "jemalloc"},
                          check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: LORASTACK_ALLOCATOR='jemalloc': use tcmalloc (the "
                                   "default) or system")


def test_without_takes_only_tcmalloc_out():
    lib = str(allocator.find_tcmalloc())
    assert allocator.without({"LD_PRELOAD": f"{lib}:/opt/x/libfoo.so", "A": "1"}) == {
        "LD_PRELOAD": "/opt/x/libfoo.so", "A": "1"}
    assert allocator.without({"LD_PRELOAD": lib, "A": "1"}) == {"A": "1"}
    assert allocator.without({"A": "1"}) == {"A": "1"}


RELEASE = """
import json
from lorastack.adapters import allocator
def rss():
    with open('/proc/self/status') as fh:
        return next(int(l.split()[1]) // 1024 for l in fh if l.startswith('VmRSS:'))
before = rss()
blocks = [b"x" * (64 * 1024) for _ in range(4000)]  # 250 MiB, written, below mmap thresholds
held = rss()
del blocks
freed = rss()
allocator.release_free_memory()
print(json.dumps({"active": allocator.active(), "before": before, "held": held,
                  "freed": freed, "released": rss()}))
"""


@pytest.mark.parametrize("choice", ["tcmalloc", "system"])
def test_for_child_runs_a_child_under_either_allocator_and_release_returns_freed_memory(choice):
    """What the memory benchmarks rely on: a worker started with for_child runs under the
    allocator asked for, whatever this process runs under, and release_free_memory gives the
    kernel back what was freed (tcmalloc keeps it otherwise), so that RSS shows what is used."""
    import json

    env = allocator.for_child(choice, {**os.environ, "LD_PRELOAD": str(
        allocator.find_tcmalloc())})  # as if this process ran under tcmalloc
    proc = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    r = json.loads(proc.stdout)
    assert r["active"] == choice
    assert r["held"] - r["before"] > 200, r  # the blocks were resident
    assert r["released"] - r["before"] < 50, r  # and are given back
