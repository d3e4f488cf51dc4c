"""The README runs as written: its curl and Python examples against a served quickstart store
(tests/quickstart/conftest.py), its `lorastack` commands against the CLI's own --help.

Blocks are run in the README's order. A block preceded by `<!-- needs: NAME -->` needs an adapter
the quickstart does not train (the README says how to train it); the test stores one of that
name (a copy of the quickstart classifier) first. What is not run here and why: the install
commands (`git clone`, `make ...`: CI runs them), and Python that trains (minutes each: checked
by compiling it and running its imports)."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"(?:<!-- needs: (?P<needs>[\w:-]+) -->\s*\n)?^```(?P<lang>\w*)\n"
                   r"(?P<code>.*?)^```", re.DOTALL | re.MULTILINE)
SERVER = re.compile(r"(?:http://)?(?:localhost|127\.0\.0\.1):8000")


@dataclasses.dataclass
class Block:
    lang: str
    code: str
    line: int
    needs: str | None

    def commands(self) -> list[str]:
        """The shell commands, continuation lines joined, comments dropped."""
        joined = self.code.replace("\\\n", " ")
        out = []
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(re.sub(r"\s+#\s.*$", "", line))
        return out


def blocks() -> list[Block]:
    text = README.read_text()
    return [Block(m["lang"], m["code"], text.count("\n", 0, m.start("code")) + 1, m["needs"])
            for m in FENCE.finditer(text)]


def talks_to_server(block: Block) -> bool:
    return bool(SERVER.search(block.code))


def test_the_readme_has_examples_of_every_kind():
    found = blocks()
    curls = [c for b in found if b.lang == "bash" for c in b.commands() if c.startswith("curl")]
    served_python = [b for b in found if b.lang == "python" and talks_to_server(b)]
    assert len(curls) >= 8 and len(served_python) >= 2, (len(curls), len(served_python))
    # every adapter the README calls is the quickstart's, or one it says how to train
    names = set(re.findall(r'"(reviews-[\w-]+)"', README.read_text()))
    needed = {b.needs.removeprefix("ensemble:") for b in found if b.needs}
    assert names <= {"reviews-classify", "reviews-condition"} | needed, names


def test_curl_and_python_examples_run_against_the_quickstart(quickstart, tmp_path):
    served = [b for b in blocks() if talks_to_server(b)]
    assert served
    curlrc = tmp_path / "curl"
    curlrc.mkdir()
    # each curl fails on an HTTP error (exit 22) and shows it, as the README's curls do not
    (curlrc / ".curlrc").write_text("--fail-with-body\n--silent\n--show-error\n--max-time 120\n")
    env = {**os.environ, "CURL_HOME": str(curlrc), "ADMIN": "any key on loopback",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    host = quickstart.url.removeprefix("http://")
    ran = 0
    for block in served:
        if block.needs and block.needs.startswith("ensemble:"):
            _store_ensemble(quickstart, block.needs.removeprefix("ensemble:"))
        elif block.needs and block.needs not in quickstart.store.names():
            quickstart.store.copy("reviews-classify", block.needs)
            _wait_served(quickstart.url, block.needs)
        if block.lang == "bash":
            for command in block.commands():
                if not command.startswith("curl"):
                    continue
                command = SERVER.sub(lambda m: m[0].replace(m[0].split("//")[-1], host),
                                     command)
                done = subprocess.run(["bash", "-c", command], check=False, env=env,
                                      capture_output=True, text=True, timeout=180)
                assert done.returncode == 0, (f"README line {block.line}: {command}\n"
                                              f"{done.stdout[-1500:]}{done.stderr[-1500:]}")
                assert done.stdout.strip(), f"README line {block.line}: no answer: {command}"
                ran += 1
        elif block.lang == "python":
            code = SERVER.sub(lambda m: m[0].replace(m[0].split("//")[-1], host), block.code)
            done = subprocess.run([sys.executable, "-c", code], check=False, env=env,
                                  capture_output=True, text=True, timeout=300, cwd=tmp_path)
            assert done.returncode == 0, (f"README python block at line {block.line}:\n"
                                          f"{done.stdout[-1500:]}{done.stderr[-3000:]}")
            assert done.stdout.strip(), f"README line {block.line} printed nothing"
            ran += 1
    assert ran >= 10


def test_other_python_blocks_compile_and_their_imports_resolve():
    others = [b for b in blocks() if b.lang == "python" and not talks_to_server(b)]
    assert others
    for block in others:
        compile(block.code, f"README.md:{block.line}", "exec", flags=0x400)  # raises if broken
        imports = [line for line in block.code.splitlines()
                   if re.match(r"(from \S+ )?import ", line)]
        assert imports, f"README line {block.line}: nothing to check"
        done = subprocess.run([sys.executable, "-c", "\n".join(imports)], check=False,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"README line {block.line}: {done.stderr[-2000:]}"


def test_lorastack_commands_exist_with_the_flags_shown():
    """Every `lorastack ...` line: its verbs exist and every --flag it uses is in their --help."""
    checked = 0
    for block in blocks():
        if block.lang != "bash":
            continue
        for command in block.commands():
            words = shlex.split(command)
            if not words or words[0] != "lorastack":
                continue
            verbs = [w for w in words[1:3] if re.fullmatch(r"[a-z]+", w)]
            if verbs[1:] and verbs[0] not in ("adapters", "models", "data"):
                verbs = verbs[:1]
            done = subprocess.run([sys.executable, "-m", "lorastack", *verbs, "--help"],
                                  check=False, capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "COLUMNS": "200"})
            assert done.returncode == 0, f"README line {block.line}: {command}: {done.stderr}"
            for flag in re.findall(r"(?<!\S)(--[a-z][\w-]*)", command):
                assert flag in done.stdout, f"README line {block.line}: {flag} not in " \
                                            f"`lorastack {' '.join(verbs)} --help`"
            checked += 1
    assert checked >= 10


def _store_ensemble(quickstart, name: str) -> None:
    """`<!-- needs: ensemble:NAME -->`: an ensemble NAME of the quickstart classifier and its
    copy reviews-classify-2 (what `lorastack tune --ensemble` or `lorastack ensemble` would
    fit; here with plain weights, as fitting takes minutes)."""
    from lorastack.adapters import ensembles

    store = quickstart.store
    if "reviews-classify-2" not in store.names():
        store.copy("reviews-classify", "reviews-classify-2")
    if name in ensembles.names(store.root):
        return
    first = store.resolve("reviews-classify").manifest
    ensembles.write(store.root, ensembles.EnsembleManifest(
        name=name, labels=first.labels, base_model=first.base_model,
        base_fingerprint=first.base_fingerprint, members=tuple(
            ensembles.Member(adapter=n, weight=0.5, content_hash=store.resolve(n).content_hash())
            for n in ("reviews-classify", "reviews-classify-2"))))
    _wait_served(quickstart.url, name)


def _wait_served(url: str, name: str, timeout: float = 30) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
        if name in ids:
            return
        time.sleep(0.25)
    pytest.fail(f"{name} was not served {timeout:.0f} s after it was stored")


def test_every_serve_setting_is_named_in_the_readme():
    """The README's list of `lorastack serve`'s environment variables names every setting."""
    from lorastack.serve.settings import ServeSettings

    text = README.read_text()
    named = [f"LORASTACK_{field.upper()}" for field in ServeSettings.model_fields]
    assert len(named) > 20
    assert [v for v in named if f"`{v}`" not in text] == []
