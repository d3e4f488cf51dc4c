"""A served quickstart store: the two shipped configs (reviews-classify, reviews-condition)
trained for 2 steps on a few reviews (the names, tasks, labels and prompts of the quickstart's
adapters; not their quality), served by `lorastack serve` without keys, as `make quickstart`
serves them. One gateway for this folder: the README's examples and the schema fuzzer."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from processes import lorastack_serve

QUICKSTART = ("reviews-classify", "reviews-condition")
TINY = ["quantization=none", "data.limit_train=16", "data.limit_eval=8",
        "training.max_steps=2", "training.eval_every=2", "training.save_every=2",
        "lora.layers=[27, 28, 29]"]


@pytest.fixture(scope="package")
def quickstart(tmp_path_factory, base_model):
    from lorastack.adapters.store import AdapterStore
    from lorastack.train import load_config, train

    root = tmp_path_factory.mktemp("quickstart")
    store = AdapterStore(root / "store")
    started = time.monotonic()
    for name in QUICKSTART:
        train(load_config(name, [*TINY, f"store={store.root}", f"runs_dir={root / 'runs'}"]))
    print(f"\nquickstart adapters trained in {time.monotonic() - started:.0f} s")
    with lorastack_serve(root, store.root, "--max-tokens", "48") as url:
        print(f"gateway healthy {time.monotonic() - started:.0f} s after the start")
        yield SimpleNamespace(url=url, store=store, root=root)
