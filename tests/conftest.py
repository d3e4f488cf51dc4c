"""Shared fixtures. The real default base model is pulled once into the user's lorastack cache
(LORASTACK_HOME or ~/.cache/lorastack) and reused by every test and every later run.

`quickstart`: ONE real gateway for the session, as `make quickstart` serves it (`lorastack
serve` without keys, real vLLM), over the quickstart's two adapters: the shipped configs
reviews-classify and reviews-condition, trained for 2 steps on a few reviews here (their names,
tasks, labels and prompts; not their quality), plus `sentiment` and `sentiment-2` (copies of
the classifier) for the page's tests. The README's examples, the schema fuzzer, the Python
client and the page all run against it (one vLLM start instead of one per folder)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from processes import lorastack_serve

QUICKSTART = ("reviews-classify", "reviews-condition")
TINY = ["quantization=none", "data.limit_train=16", "data.limit_eval=8",
        "training.max_steps=2", "training.eval_every=2", "training.save_every=2",
        "lora.layers=[27, 28, 29]"]
LABELS = ["positive", "negative", "neutral"]  # reviews-classify's


@pytest.fixture(scope="session")
def base_model():
    """The real default base model (SmolLM2-135M-Instruct), fetched and converted once."""
    from lorastack.adapters.models import DEFAULT_BASE, pull_base

    return pull_base(DEFAULT_BASE)


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """An empty LORASTACK_HOME, for tests that must not see the user's cache."""
    home = tmp_path / "lorastack-home"
    monkeypatch.setenv("LORASTACK_HOME", str(home))
    monkeypatch.delenv("LORASTACK_OFFLINE", raising=False)
    return home



@pytest.fixture(scope="session")
def quickstart(tmp_path_factory, base_model):
    from lorastack.adapters.store import AdapterStore
    from lorastack.train import load_config, train

    root = tmp_path_factory.mktemp("quickstart")
    staging, store = AdapterStore(root / "staging"), AdapterStore(root / "store")
    started = time.monotonic()
    for name in QUICKSTART:
        train(load_config(name, [*TINY, f"store={staging.root}", f"runs_dir={root / 'runs'}"]))
        staging.copy(name, name, into=store)
    staging.copy("reviews-classify", "sentiment")
    for name in ("sentiment", "sentiment-2"):
        staging.copy("sentiment", name, into=store)
    print(f"\nquickstart adapters trained in {time.monotonic() - started:.0f} s")
    # limits low enough for the tests to reach them (the page's batches, max_tokens)
    with lorastack_serve(root, store.root, "--max-batch", "8", "--max-tokens", "64",
                         "--capacity", "4", "--max-loras", "2") as url:
        print(f"gateway healthy {time.monotonic() - started:.0f} s after the start")
        yield SimpleNamespace(url=url, store=store, staging=staging, root=root, labels=LABELS,
                              log=root / "serve.log")
