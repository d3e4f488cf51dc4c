"""The machine and library record that training runs and the benchmarks share."""

from __future__ import annotations

import os
import platform

from lorastack.adapters import allocator
from lorastack.adapters.provenance import (
    TRAINING_LIBRARIES,
    describe_machine,
    library_versions,
    machine,
)


def test_machine_says_what_it_runs_on():
    m = machine()
    assert m["cores"] == os.cpu_count() and m["cpu"] and m["python"] == platform.python_version()
    assert m["memory_gib"] is None or m["memory_gib"] > 0
    assert set(m["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma"}
    assert describe_machine(m) == (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB"
                                   + (f", {m['gpu']}" if m["gpu"] else ", no GPU")
                                   + (", tcmalloc" if m["allocator"] == "tcmalloc"
                                      else ", glibc malloc"))
    assert m["allocator"] == allocator.active()


def test_a_recorded_machine_is_described_as_it_was():
    recorded = {"cpu": "Some CPU", "cores": 64, "memory_gib": 512.0, "gpu": "H100"}
    assert describe_machine(recorded) == "Some CPU, 64 cores, 512.0 GiB, H100"
    assert describe_machine({**recorded, "allocator": "tcmalloc"}).endswith("H100, tcmalloc")


def test_versions_of_what_is_installed_only():
    from importlib.metadata import version

    found = library_versions(("pydantic", "python", "no-such-distribution-lorastack"))
    assert found == {"pydantic": version("pydantic"), "python": platform.python_version()}
    assert list(library_versions())[-1] == "python"  # the manifest's record ends with Python
    assert set(library_versions()) <= set(TRAINING_LIBRARIES)
