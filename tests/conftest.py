"""Shared fixtures. The real default base model is pulled once into the user's lorastack cache
(LORASTACK_HOME or ~/.cache/lorastack) and reused by every test and every later run."""

from __future__ import annotations

import pytest


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
