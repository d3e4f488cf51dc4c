"""training.cache_frozen_layers (train/frozen.py): the layers below the first adapted one run
once, and training from their kept output trains what training every layer trains."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorastack.train import train


@pytest.fixture
def four_layers(tiny_llama):
    return tiny_llama(4)


@pytest.fixture
def top_two(tiny_config, four_layers):
    cfg = dict(tiny_config, base=str(four_layers))
    cfg["lora"] = {"r": 4, "alpha": 8, "layers": [2, 3], "dropout": 0.1}
    cfg["training"] = {**cfg["training"], "max_steps": 4, "eval_every": 2}
    return cfg


def _tensors(result):
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def test_training_from_the_kept_states_trains_what_every_layer_trains(top_two, capsys):
    every = train(dict(top_two, name="every-layer"))
    assert "frozen layers" not in capsys.readouterr().out
    top_two["training"]["cache_frozen_layers"] = True
    cached = train(dict(top_two, name="kept-states"))
    out = capsys.readouterr().out
    assert "frozen layers 0-1 ran once over the 48 training examples" in out
    assert "each step runs layers 2-3" in out
    # `lorastack plan` counts the tokens the trainer kept a state for
    from lorastack.train import frozen
    from lorastack.train.config import build_config
    from lorastack.train.plan import training_tokens

    (kept,) = {id(v): v for k, v in frozen._built.items() if k[1] == 2}.values()
    assert training_tokens(build_config(top_two)) == sum(s.shape[0] for s in kept) > 48
    a, b = _tensors(every), _tensors(cached)
    assert a.keys() == b.keys() and any("layers.2." in k for k in a)
    for key in a:  # the same 4 steps, LoRA dropout included
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    for key in ("loss", "accuracy", "macro_f1"):
        assert cached.metrics["validation"][key] == pytest.approx(
            every.metrics["validation"][key], abs=1e-5), key
    # a second run on the same base and examples in this process (a search's next trial)
    # starts from the states the first one built
    again = train(dict(top_two, name="kept-again"))
    assert "frozen layers 0-1 reused from an earlier run in this process" in \
        capsys.readouterr().out
    for key, value in _tensors(again).items():
        torch.testing.assert_close(value, b[key], rtol=1e-4, atol=1e-6)


def test_a_step_from_the_kept_states_skips_the_frozen_layers(top_two, four_layers):
    from lorastack.train import frozen
    from lorastack.train.batching import collate
    from lorastack.train.config import build_config
    from lorastack.train.examples import PromptFormat, encode_records
    from lorastack.train.model import answer_loss, attach_lora, load_base, load_tokenizer
    from lorastack.train.run import trained_splits

    cfg = build_config(top_two)
    tokenizer = load_tokenizer(four_layers)
    fmt = PromptFormat(tokenizer, cfg, ["positive", "negative"])
    examples = encode_records(fmt, trained_splits(cfg).train, "train").examples
    model = attach_lora(cfg, load_base(cfg, four_layers, torch.device("cpu")))
    assert frozen.why_not(cfg, model, dist_active=False) is None
    prefix, said = frozen.build(model, examples, fmt.pad_id)
    assert prefix is not None and prefix.first == 2, said
    layers = frozen.decoder_layers(model)
    originals = list(layers)
    calls = []
    for layer in originals[:2]:
        layer.register_forward_hook(lambda *a: calls.append(1))
    idx = [5, 0, 9]
    batch = collate([examples[i] for i in idx], fmt.pad_id)
    model.eval()
    with torch.no_grad():
        full, _ = answer_loss(model, batch)
        assert len(calls) == 2
        with prefix.replaying(idx, batch["input_ids"].shape[1]):
            replayed, _ = answer_loss(model, batch)
    assert len(calls) == 2  # layers 0 and 1 did not run again
    assert list(layers) == originals  # and are back in place
    torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-6)
    assert prefix.nbytes == sum(len(ex.input_ids) for ex in examples) * 64 * 4


@pytest.mark.parametrize("change, reason", [
    ({"lora": {"r": 4, "alpha": 8}}, "the lowest layer is adapted"),
    ({"data": {"augment": "word_dropout"}}, "the data are augmented afresh every epoch"),
])
def test_runs_that_cannot_keep_states_say_why_and_train_every_layer(top_two, capsys, change,
                                                                     reason):
    for section, values in change.items():
        top_two[section] = {**top_two[section], **values} if section == "data" else values
    top_two["training"]["cache_frozen_layers"] = True
    result = train(top_two)
    assert f"training.cache_frozen_layers: every step runs every layer: {reason}" in \
        capsys.readouterr().out
    assert result.metrics["validation"]["loss"] > 0


def test_a_failed_proof_trains_every_layer(top_two, capsys, monkeypatch):
    from lorastack.train import frozen

    monkeypatch.setattr(frozen, "TOLERANCE", -1.0)  # no gap is small enough
    top_two["training"]["cache_frozen_layers"] = True
    train(top_two)
    assert "starting from their kept output changed the loss" in capsys.readouterr().out


def test_a_searchs_trials_reuse_the_states_of_the_first(top_two, capsys):
    from lorastack.train import frozen
    from lorastack.train.config import build_config
    from lorastack.train.tune import tune

    frozen._built.clear()  # what earlier tests in this process built
    top_two["training"].update(cache_frozen_layers=True, max_steps=2, eval_every=2)
    top_two["search"] = {"space": {"training.lr": {"low": 1e-3, "high": 1e-2, "log": True},
                                   "lora.top_layers": {"choices": [2]}}, "startup_trials": 1}
    result = tune(build_config(top_two), trials=3)
    out = capsys.readouterr().out
    assert out.count("frozen layers 0-1 ran once") == 1
    assert out.count("frozen layers 0-1 reused from an earlier run in this process") >= 2
    assert result.best_value is not None


def test_a_run_cut_short_resumes_to_the_same_weights(top_two, crash_at):
    top_two["training"].update(cache_frozen_layers=True, save_every=1)
    reference = train(dict(top_two, name="whole"))

    with pytest.raises(crash_at.error):
        train(dict(top_two, name="cut"), on_step=crash_at(3))
    resumed = train(dict(top_two, name="cut"), resume=True)
    a, b = _tensors(reference), _tensors(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("change", [{"training": {"gradient_checkpointing": True}},
                                    {"quantization": "4bit"}])
def test_checkpointed_and_4bit_runs_train_the_same_from_the_kept_states(top_two, change):
    """Gradient checkpointing (on by default for 4-bit) recomputes each adapted layer in
    backward; the kept state entering the first one must still carry its gradient there."""
    for key, value in change.items():
        top_two[key] = {**top_two[key], **value} if isinstance(value, dict) else value
    every = train(dict(top_two, name="every-layer"))
    top_two["training"] = {**top_two["training"], "cache_frozen_layers": True}
    cached = train(dict(top_two, name="kept-states"))
    a, b = _tensors(every), _tensors(cached)
    assert any("layers.2." in k and "lora_B" in k and a[k].abs().sum() > 0 for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
