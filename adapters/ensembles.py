"""Ensembles in the store: several classification adapters served under one name.

    <root>/<name>.ensemble.json     members (adapter name, weight, content hash), labels,
                                    temperature, metrics

An ensemble's label probabilities are the weighted mean of its members' (each member at its own
calibrated temperature), then sharpened or softened by the ensemble's own temperature:
p = softmax(log(sum_m w_m p_m) / T). Weights and T are fitted on validation
(train/ensemble.py); `lorastack ensemble` and `lorastack tune --ensemble K` write the file.

A member is pinned by its content hash: a member retrained or recalibrated after the fit makes
the ensemble unservable (the gateway says which member changed) until it is fitted again, so an
ensemble never serves weights that were not fitted together. A file, not a directory, so that
adapter listings never see it; names share one namespace with adapters.

Light (stdlib and pydantic), like manifest.py.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from lorastack.adapters import labels as label_scoring
from lorastack.adapters.fsutil import atomic_write_json, utc_now
from lorastack.adapters.manifest import (
    AdapterError,
    AdapterName,
    AdapterNotFoundError,
    Fingerprint,
    ManifestError,
    Metrics,
    Number,
    _Part,
    check_name,
)

SUFFIX = ".ensemble.json"


class Member(_Part):
    _where = ("members",)
    adapter: AdapterName
    """A classification adapter of the same store."""
    weight: Annotated[Number, Field(ge=0, le=1)]
    """Its share of the mixture; the weights sum to 1."""
    content_hash: Fingerprint
    """The member's content hash (files.Adapter.content_hash) when the ensemble was fitted."""


class EnsembleManifest(_Part):
    """<name>.ensemble.json."""

    kind: Literal["ensemble"] = "ensemble"
    name: AdapterName
    members: Annotated[tuple[Member, ...], Field(min_length=2)]
    labels: Annotated[tuple[str, ...], Field(min_length=2)]
    base_model: Annotated[str, Field(min_length=1)]
    base_fingerprint: str
    temperature: Annotated[Number, Field(gt=0)] = 1.0
    """Applied to the log of the members' mixture (1: the mixture as it is)."""
    metrics: Metrics = Field(default_factory=Metrics)
    fitted_on: str = ""
    """Where the weights and temperature were fitted (e.g. "drug-reviews validation")."""
    created_at: str = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _weights(self) -> EnsembleManifest:
        names = [m.adapter for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"members: an adapter is listed twice ({', '.join(names)})")
        total = sum(m.weight for m in self.members)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"members: the weights must sum to 1, they sum to {total:.6f}")
        if self.name in names:
            raise ValueError(f"name: an ensemble cannot be one of its own members ({self.name})")
        return self

    @property
    def weights(self) -> dict[str, float]:
        return {m.adapter: m.weight for m in self.members}


def mixture(members: Mapping[str, Mapping[str, float]], weights: Mapping[str, float],
            temperature: float = 1.0) -> dict[str, float]:
    """The ensemble's label probabilities from its members' (name -> label -> probability)."""
    labels = list(next(iter(members.values())))
    mixed = {lab: sum(weights[name] * probs[lab] for name, probs in members.items())
             for lab in labels}
    return label_scoring.probabilities(log_probabilities(mixed), temperature)


def log_probabilities(probs: Mapping[str, float]) -> dict[str, float]:
    """label -> log-probability (floored at 1e-300): scores that labels.probabilities turns
    back into `probs` at temperature 1."""
    return {lab: math.log(max(p, 1e-300)) for lab, p in probs.items()}


def mixture_rows(member_rows: Mapping[str, Sequence[Mapping[str, float]]],
                 weights: Mapping[str, float], temperature: float = 1.0) -> list[dict[str, float]]:
    """`mixture` for each row of several members' answers to the same inputs."""
    names = list(member_rows)
    n = len(member_rows[names[0]])
    return [mixture({name: member_rows[name][i] for name in names}, weights, temperature)
            for i in range(n)]


# -- in the store --------------------------------------------------------------------------------

def path_of(root: Path, name: str) -> Path:
    return Path(root) / f"{check_name(name)}{SUFFIX}"


def names(root: Path) -> list[str]:
    """Names of the ensemble files in the store `root` (not checked), sorted."""
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(e[:-len(SUFFIX)] for e in entries
                  if e.endswith(SUFFIX) and not e.startswith("."))


def read(root: Path, name: str) -> EnsembleManifest:
    path = path_of(root, name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterNotFoundError(f"no ensemble of this name in the store (ensembles: "
                                   f"{', '.join(names(root)) or 'none'})", name, path,
                                   "`lorastack ensemble NAME --members A B ...` makes one") \
            from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"not readable JSON ({exc})", name, path,
                            "fit it again with `lorastack ensemble`") from None
    if not isinstance(data, dict):
        raise ManifestError("not a JSON object", name, path, "fit it again")
    try:
        ensemble = EnsembleManifest(**data)
    except ManifestError as exc:
        raise exc.located(name, path, "fit it again with `lorastack ensemble`") from None
    if ensemble.name != name:
        raise ManifestError(f"its name field is {ensemble.name!r}, not its file's", name, path,
                            "rename the file or fit it again")
    return ensemble


def stamp(root: Path, name: str) -> tuple[int, int, int] | None:
    """(inode, mtime_ns, size) of the ensemble's file: it changes on every write. The name is
    not checked: `read` refuses a name no ensemble may have (a file copied in by hand)."""
    try:
        st = os.stat(Path(root) / f"{name}{SUFFIX}")
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def write(root: Path, ensemble: EnsembleManifest, *, replace: bool = False) -> Path:
    """Write the ensemble atomically. Its name must not be an adapter's, and, unless
    `replace`, not an existing ensemble's."""
    root = Path(root)
    name = ensemble.name
    path = path_of(root, name)
    if (root / name).exists():
        raise AdapterError("an adapter of this name is in the store; ensembles and adapters "
                           "share one namespace", name, root / name,
                           "choose another name for the ensemble")
    if path.exists() and not replace:
        raise AdapterError("an ensemble of this name exists", name, path,
                           "pass --replace to fit it again under the same name")
    atomic_write_json(path, ensemble.model_dump(mode="json"))
    return path


def remove(root: Path, name: str) -> None:
    path = path_of(root, name)
    try:
        path.unlink()
    except FileNotFoundError:
        raise AdapterNotFoundError(f"no ensemble of this name (ensembles: "
                                   f"{', '.join(names(root)) or 'none'})", name, path) from None
