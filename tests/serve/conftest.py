"""Serving fixtures.

Fast unit tests run the gateway against FakeVllm (tests/serve/fake_vllm.py) through an httpx
transport. The integration tests (marked slow) run the real thing: adapters trained on the real
base model, the real vLLM child, real HTTP; vLLM starts once per session.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # fake_vllm, reference, serve_helpers

from serve_helpers import FAKE_FINGERPRINT

from lorastack.adapters.models import BaseModel
from lorastack.adapters.store import AdapterStore


@pytest.fixture
def store(tmp_path):
    return AdapterStore(tmp_path / "store")


@pytest.fixture
def make(fake_base, store, tmp_path):
    """A gateway over FakeVllm (an httpx transport), as a context: (client, fake, gateway)."""
    import httpx
    from fake_vllm import FakeVllm
    from fastapi.testclient import TestClient

    from lorastack.serve.app import create_app
    from lorastack.serve.engine import Engine
    from lorastack.serve.gateway import Gateway
    from lorastack.serve.settings import ServeSettings

    @contextmanager
    def build(**settings):
        fake = FakeVllm()
        engine = Engine("http://fake-vllm", transport=httpx.ASGITransport(fake.app))
        values = {"store": store.root, "work_dir": tmp_path / "work", "poll_interval_s": 0.05,
                  "max_prompt_tokens": 64, "max_model_len": 128, "max_tokens": 32,
                  "max_batch": 4, "max_body_bytes": 4096, **settings}
        gw = Gateway(ServeSettings(**values), engines=[engine], base=fake_base)
        with TestClient(create_app(gateway=gw)) as client:
            yield client, fake, gw
    return build


@pytest.fixture(scope="session")
def fake_base(base_model) -> BaseModel:
    """The real base model's directory (for its tokenizer) under the fake adapters' fingerprint."""
    return BaseModel(base_model.name, base_model.path, FAKE_FINGERPRINT, base_model.source)
