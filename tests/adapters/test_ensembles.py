"""Stored ensembles: the file's checks, the store's namespace, the mixture and its fit."""

from __future__ import annotations

import math

import pytest

from lorastack.adapters import ensembles
from lorastack.adapters.ensembles import EnsembleManifest, Member
from lorastack.adapters.manifest import AdapterError, AdapterNotFoundError, ManifestError
from lorastack.train.data import DataError
from lorastack.train.ensemble import fit_weights

HASH = "sha256:" + "ab" * 32


def make(name="ens", weights=(0.75, 0.25), members=("a", "b"), **kw) -> EnsembleManifest:
    return EnsembleManifest(
        name=name, labels=("positive", "negative"), base_model="smollm2-135m",
        base_fingerprint="sha256:" + "0" * 64,
        members=tuple(Member(adapter=m, weight=w, content_hash=HASH)
                      for m, w in zip(members, weights, strict=True)), **kw)


def test_write_read_round_trip_and_listing(tmp_path):
    ens = make(temperature=0.8)
    path = ensembles.write(tmp_path, ens)
    assert path.name == "ens.ensemble.json"
    assert ensembles.names(tmp_path) == ["ens"]
    again = ensembles.read(tmp_path, "ens")
    assert again == ens and again.weights == {"a": 0.75, "b": 0.25}
    with pytest.raises(AdapterError, match="--replace"):
        ensembles.write(tmp_path, ens)
    ensembles.write(tmp_path, make(weights=(0.5, 0.5)), replace=True)
    assert ensembles.read(tmp_path, "ens").weights == {"a": 0.5, "b": 0.5}
    ensembles.remove(tmp_path, "ens")
    assert ensembles.names(tmp_path) == []
    with pytest.raises(AdapterNotFoundError, match="lorastack ensemble"):
        ensembles.read(tmp_path, "ens")


def test_an_adapters_name_is_refused(tmp_path):
    (tmp_path / "ens").mkdir()
    with pytest.raises(AdapterError, match="share one namespace"):
        ensembles.write(tmp_path, make())


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"weights": (0.6, 0.6)}, "sum to 1"),
    ({"members": ("a", "a")}, "listed twice"),
    ({"name": "a"}, "its own members"),
    ({"weights": (1.0,), "members": ("a",)}, "members"),
    ({"weights": (1.2, -0.2)}, "members"),
    ({"temperature": 0.0}, "temperature"),
    ({"name": "../x"}, "name"),
])
def test_bad_fields_name_what_is_wrong(kwargs, words):
    with pytest.raises(AdapterError, match=words):  # ManifestError, InvalidNameError
        make(**kwargs)


def test_a_broken_file_is_an_error_that_says_so(tmp_path):
    (tmp_path / "ens.ensemble.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not readable JSON"):
        ensembles.read(tmp_path, "ens")
    (tmp_path / "ens.ensemble.json").write_text(make(name="other").model_dump_json())
    with pytest.raises(ManifestError, match="not its file's"):
        ensembles.read(tmp_path, "ens")


def test_mixture_is_the_weighted_mean_then_the_temperature():
    members = {"a": {"x": 0.9, "y": 0.1}, "b": {"x": 0.3, "y": 0.7}}
    mixed = ensembles.mixture(members, {"a": 0.75, "b": 0.25})
    assert mixed == pytest.approx({"x": 0.75, "y": 0.25})
    sharp = ensembles.mixture(members, {"a": 0.75, "b": 0.25}, temperature=0.5)
    assert sharp["x"] == pytest.approx(0.75 ** 2 / (0.75 ** 2 + 0.25 ** 2))
    assert math.fsum(sharp.values()) == pytest.approx(1.0)


def test_fit_weights_favours_the_member_that_is_right():
    truth = [0, 1, 0, 1, 0, 1]
    good = [[0.9, 0.1] if t == 0 else [0.1, 0.9] for t in truth]
    noise = [[0.5, 0.5] for _ in truth]
    wrong = [[0.2, 0.8] if t == 0 else [0.8, 0.2] for t in truth]
    w = fit_weights([good, noise, wrong], truth)
    assert sum(w) == pytest.approx(1.0, abs=1e-9)
    assert w[0] > 0.9 and w[2] < 0.05
    same = fit_weights([good, good], truth)  # nothing to choose between: the plain mean
    assert same == pytest.approx([0.5, 0.5], abs=1e-3)


def test_fit_weights_for_macro_f1_buys_the_rare_class_and_says_what_it_costs():
    """NLL weights follow the sharp member, which never names the rare class; macro-F1 weights
    give the mixture the rare class (at the smallest weight that does, the NLL tie-break)."""
    import numpy as np

    truth = [0] * 8 + [1] * 8 + [2] * 2
    sure = [
        [0.9, 0.05, 0.05] if t == 0 else [0.05, 0.9, 0.05] if t == 1 else [0.45, 0.45, 0.1]
        for t in truth]
    rare = [[0.5, 0.3, 0.2] if t == 0 else [0.3, 0.5, 0.2] if t == 1 else [0.3, 0.3, 0.4]
            for t in truth]
    probs = np.asarray([sure, rare])

    def predicted(w):
        return list(np.argmax(np.tensordot(np.asarray(w), probs, axes=1), axis=1))

    def nll(w):
        mix = np.tensordot(np.asarray(w), probs, axes=1)
        return float(-np.log(mix[np.arange(len(truth)), truth]).mean())

    by_nll = fit_weights([sure, rare], truth)
    by_f1 = fit_weights([sure, rare], truth, "macro_f1")
    assert by_nll[0] > 0.5 and 2 not in predicted(by_nll)  # the rare class is never named
    assert predicted(by_f1) == truth  # every example right: macro-F1 1
    assert by_f1 == pytest.approx([0.2, 0.8], abs=1e-9)  # the least NLL among those
    assert nll(by_f1) > nll(by_nll)  # what it costs
    assert sum(by_f1) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(DataError, match="unknown ensemble objective 'f1': use one of nll, "
                       "macro_f1"):
        fit_weights([sure, rare], truth, "f1")
