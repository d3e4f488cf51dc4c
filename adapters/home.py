"""Where lorastack keeps its files, and whether it may reach the network."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "LORASTACK_HOME"
OFFLINE_ENV = "LORASTACK_OFFLINE"


def lorastack_home() -> Path:
    """The cache root: $LORASTACK_HOME, or ~/.cache/lorastack when unset."""
    raw = os.environ.get(HOME_ENV, "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "lorastack"


def is_offline() -> bool:
    """True when LORASTACK_OFFLINE (or HF_HUB_OFFLINE) says not to touch the network."""
    for var in (OFFLINE_ENV, "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    return False
