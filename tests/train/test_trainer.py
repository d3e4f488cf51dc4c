"""The trainer end to end on a tiny model built from a config (seconds, no download beyond the
tokenizer of the default model), plus resume, bad data, and the evaluation paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorastack.adapters.store import AdapterStore
from lorastack.train import TrainConfig, train
from lorastack.train.config import ConfigError, build_config
from lorastack.train.data import DataError


def _tensors(path):
    return load_file(path / "adapter_model.safetensors")


def test_classification_run_writes_adapter_run_dir_and_metrics(tiny_config, tmp_path):
    result = train(tiny_config)
    store = AdapterStore(tiny_config["store"])
    adapter = store.resolve("tiny-sentiment")
    m = adapter.manifest
    assert m.task == "classification" and list(m.labels) == ["negative", "positive"]
    assert m.chat_format.count("{input}") == 1 and m.end_of_turn == "<|im_end|>"
    assert m.base_fingerprint.startswith("sha256:") and m.data_fingerprint.startswith("sha256:")
    assert set(m.metrics.validation) >= {"accuracy", "macro_f1", "loss"}
    assert set(m.metrics.test) >= {"accuracy", "macro_f1"}
    assert m.training["lora"]["r"] == 4 and m.versions["torch"] == torch.__version__
    assert m.lora.rank == 4 and "q_proj" in m.lora.target_modules
    assert m.examples and all(e.startswith("Review ") for e in m.examples)  # validation texts
    run = result.run_dir
    for name in ("metrics.jsonl", "training.png", "summary.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "validation/macro_f1" in r] == [3, 6]
    # the overfitting watch: a train sample evaluated like validation at every evaluation
    assert [r["step"] for r in rows if "train_sample/loss" in r] == [3, 6]
    assert all(r["train_sample/n"] == 48 and r["train_sample/loss"] > 0  # all 48 (< 64)
               for r in rows if "train_sample/loss" in r)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens_per_second"] > 0
    per_class = result.metrics["test"]["per_class"]
    assert set(per_class) == {"negative", "positive"}
    assert m.metrics.test["f1_positive"] == per_class["positive"]["f1"]  # kept per label
    assert sum(map(sum, result.metrics["test"]["confusion"])) == 12


def test_learns_the_toy_task(tiny_config):
    """Enough steps on a separable toy task must beat chance clearly (the loop really trains)."""
    tiny_config["training"].update(max_steps=60, eval_every=20, save_every=60, lr=1e-2)
    result = train(tiny_config)
    assert result.metrics["validation"]["accuracy"] >= 0.75, result.metrics["validation"]
    losses = [json.loads(line).get("train/loss") for line in
              (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("checkpointing_on_resume", [None, True])
def test_resume_continues_from_the_checkpoint_exactly(tiny_config, tmp_path, crash_at,
                                                      checkpointing_on_resume):
    """A run cut at step 3 resumes from step 2 to the uninterrupted run's weights, also when
    the resume switches gradient checkpointing on (same math, same dropout masks)."""
    reference = train(dict(tiny_config, name="uninterrupted"))

    cfg = dict(tiny_config, name="interrupted")
    with pytest.raises(crash_at.error):
        train(cfg, on_step=crash_at(3))
    assert not AdapterStore(cfg["store"]).exists("interrupted")  # nothing half-done listed
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "interrupted" / "checkpoints").iterdir())
    assert ckpts == ["step-0000002"]
    steps_seen = []
    if checkpointing_on_resume is not None:
        cfg = json.loads(json.dumps(cfg))
        cfg["training"]["gradient_checkpointing"] = checkpointing_on_resume
    resumed = train(cfg, resume=True, on_step=lambda s: steps_seen.append(s.step))
    assert steps_seen == [3, 4, 5, 6]
    a, b = _tensors(reference.adapter_dir), _tensors(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    for key in ("accuracy", "macro_f1", "loss"):
        assert resumed.metrics["validation"][key] == pytest.approx(
            reference.metrics["validation"][key])


def test_resume_refuses_a_changed_config(tiny_config):
    cfg = dict(tiny_config, name="changing")
    train(cfg)
    changed = json.loads(json.dumps(cfg))
    changed["training"]["lr"] = 1e-4
    with pytest.raises(ConfigError, match=r"config changed .*\(training\.lr: 0\.005 -> 0\.0001\)"):
        train(changed, resume=True)


def test_resume_keeps_the_batch_that_batch_size_auto_chose(tiny_config, crash_at,
                                                           monkeypatch):
    """batch_size: auto is chosen once: a resume (on another machine, allocator or process
    count, which would choose otherwise) takes the checkpoint's batch instead of refitting."""
    from lorastack.train import autobatch
    from lorastack.train.loop import checkpointed_config

    cfg = json.loads(json.dumps(dict(tiny_config, name="auto-batch")))
    cfg["training"].update(batch_size="auto", memory_budget="0.5")
    with pytest.raises(crash_at.error):
        train(cfg, on_step=crash_at(3))
    saved = checkpointed_config(Path(cfg["runs_dir"]) / "auto-batch")
    assert isinstance(saved["training"]["batch_size"], int)

    def refit(*_, **__):
        raise AssertionError("batch_size: auto was fitted again on resume")

    monkeypatch.setattr(autobatch, "fit_to_memory", refit)
    steps = []
    result = train(cfg, resume=True, on_step=lambda s: steps.append(s.step))
    assert steps == [3, 4, 5, 6] and result.adapter_dir.is_dir()


def test_generation_run_scores_exact_match(tiny_config, review_files):
    cfg = json.loads(json.dumps(tiny_config))
    cfg["name"] = "tiny-condition"
    cfg["task"] = {"type": "generation", "prompt": "{review}\nCondition?",
                   "target_field": "condition", "max_new_tokens": 4}
    cfg["data"]["columns"] = {}
    result = train(cfg)
    val = result.metrics["validation"]
    assert set(val) >= {"exact_match", "token_f1", "loss", "n"}
    matched = val["exact_match"] * val["n"]  # a share of the validation answers
    assert matched == pytest.approx(round(matched)) and val["token_f1"] >= val["exact_match"]
    manifest = AdapterStore(cfg["store"]).resolve("tiny-condition").manifest
    assert manifest.task == "generation" and manifest.labels == ()


def test_chat_records_train_on_the_last_assistant_turn(tiny_config, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Say {w}"},
                          {"role": "assistant", "content": w}]}
            for w in ["yes", "no", "maybe", "sure"] * 6]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = json.loads(json.dumps(tiny_config))
    cfg.update(name="tiny-chat", evaluate_test=False)
    cfg["task"] = {"type": "generation", "messages_field": "messages", "max_new_tokens": 3}
    cfg["data"] = {"source": str(path), "validation_fraction": 0.25, "max_length": 64}
    result = train(cfg)
    assert "exact_match" in result.metrics["validation"]


def test_unknown_label_in_data_names_the_row(tiny_config, tmp_path):
    cfg = json.loads(json.dumps(tiny_config))
    cfg["task"]["labels"] = ["positive", "neutral"]
    with pytest.raises(DataError, match=r"train row 1: label 'negative' is not in the label set"):
        train(cfg)


def test_template_field_missing_is_refused_before_training(tiny_config):
    cfg = json.loads(json.dumps(tiny_config))
    cfg["task"]["prompt"] = "{body}"
    with pytest.raises(DataError, match=r"field\(s\) \['body'\].*Fix task.prompt"):
        train(cfg)


def test_examples_without_answer_tokens_are_refused_with_rows(tiny_config):
    cfg = json.loads(json.dumps(tiny_config))
    cfg["task"]["system"] = "word " * 40  # the prompt alone is over max_length
    cfg["data"]["max_length"] = 32
    cfg["data"]["text_field"] = "nonexistent"
    with pytest.raises(DataError, match=r"have no answer token left.*rows 0, 1, 2"):
        train(cfg)


def test_examples_mask_the_prompt_and_end_with_end_of_turn(tiny_base, review_files):
    from lorastack.train.data import load_records
    from lorastack.train.examples import IGNORE, PromptFormat, encode_records
    from lorastack.train.model import load_tokenizer

    cfg = build_config({"task": {"prompt": "{text}", "labels": ["negative", "positive"]},
                        "data": {"max_length": 64}})
    tok = load_tokenizer(tiny_base)
    fmt = PromptFormat(tok, cfg, ["negative", "positive"])
    records = load_records(review_files["train"], columns={"text": "review",
                                                           "label": "sentiment"})
    long = dict(records[0], text="very long text " * 50)
    enc = encode_records(fmt, [records[0], long], "train")
    for ex in enc.examples:
        assert ex.labels[:ex.prompt_len] == [IGNORE] * ex.prompt_len
        assert ex.labels[-1] == fmt.end_id and ex.input_ids[-1] == fmt.end_id
        assert len(ex.input_ids) <= 64
    assert enc.truncated == 1
    assert tok.decode(enc.examples[0].labels[enc.examples[0].prompt_len:]) == \
        "positive<|im_end|>"


def test_single_token_fast_path_matches_the_general_scorer(tiny_base, review_files):
    from transformers import AutoModelForCausalLM

    from lorastack.train.data import load_records
    from lorastack.train.evaluate import label_logprob_sums
    from lorastack.train.examples import PromptFormat, encode_records
    from lorastack.train.model import load_tokenizer

    cfg = build_config({"task": {"prompt": "{text}", "labels": ["negative", "positive"]}})
    fmt = PromptFormat(load_tokenizer(tiny_base), cfg, ["negative", "positive"])
    assert all(len(c) == 1 for c in fmt.continuations.values())
    records = load_records(review_files["test"], columns={"text": "review",
                                                          "label": "sentiment"})
    examples = encode_records(fmt, records, "test").examples
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    fast = label_logprob_sums(model, fmt, examples)
    slow = _general_scores(model, fmt, examples)
    for a, b in zip(fast, slow):
        assert a == pytest.approx(b, abs=1e-4)
    assert all(math.isfinite(x) and x < 0 for row in fast for x in row)


def _general_scores(model, fmt, examples):
    """One row per (example, label), prompt + continuation: how labels were scored before the
    prompt's KV cache was reused, kept as the reference."""
    from lorastack.train.batching import collate
    from lorastack.train.examples import IGNORE, Example
    from lorastack.train.model import answer_logits

    out = []
    for ex in examples:
        prompt = ex.input_ids[:ex.prompt_len]
        scores = []
        for label in fmt.labels:
            cont = fmt.continuations[label]
            row = Example(prompt + cont, [IGNORE] * len(prompt) + cont, ex.row)
            batch = collate([row], fmt.pad_id)
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE
            pos = torch.zeros_like(batch["labels"], dtype=torch.bool)
            pos[:, :-1] = mask
            with torch.no_grad():
                logits = answer_logits(model, batch["input_ids"], batch["attention_mask"], pos)
            lp = torch.log_softmax(logits, -1).gather(-1, targets[mask][:, None]).sum()
            scores.append(float(lp))
        out.append(scores)
    return out


def test_train_accepts_a_config_object(tiny_config):
    cfg = TrainConfig.model_validate(dict(tiny_config, name="from-object"))
    cfg.training.max_steps = 2
    assert train(cfg).summary["steps"] == 2


def test_4bit_gradients_are_the_same_after_a_validation_pass(tiny_base):
    """bitsandbytes repacks a CPU 4-bit weight for an inference kernel on its first no-grad
    eval forward, and that kernel cuts the gradient path through the frozen weights; the
    trainer's 4-bit model never takes it (train/model.py::keep_4bit_trainable), so a validation
    pass mid-training leaves the gradients as they were."""
    from lorastack.train.model import answer_loss, attach_lora, load_base

    cfg = build_config({"base": str(tiny_base), "quantization": "4bit",
                        "lora": {"r": 4, "dropout": 0.0, "for_serving": False}})
    torch.manual_seed(0)
    model = attach_lora(cfg, load_base(cfg, tiny_base, torch.device("cpu")))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero, so that gradients reach the lower layers' lora_A
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(5, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :8] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "weights": torch.ones(2)}

    def layer0_grads():
        model.train()
        model.zero_grad()
        answer_loss(model, batch)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()
                if p.grad is not None and "layers.0." in n and "lora_A" in n}

    before = layer0_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # what a validation pass does
    after = layer0_grads()
    assert before and before.keys() == after.keys()
    for name in before:
        assert float(before[name].abs().max()) > 0
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-6)


def test_augmentation_is_drawn_afresh_every_epoch(tiny_config, monkeypatch):
    from lorastack.train import examples

    real, drawn = examples.encode_records, {}

    def spy(fmt, records, split, *, augment_seed=None):
        out = real(fmt, records, split, augment_seed=augment_seed)
        if split == "train":
            drawn[augment_seed] = [ex.input_ids for ex in out.examples]
        return out

    monkeypatch.setattr(examples, "encode_records", spy)
    tiny_config["data"].update(augment="word_dropout", augment_prob=0.3)
    tiny_config["training"].update(max_steps=None, epochs=3, eval_every=100, save_every=100)
    train(tiny_config)
    assert sorted(drawn) == [0, 1, 2]  # epoch e draws with seed + e
    assert drawn[0] != drawn[1] != drawn[2]  # three different copies, not one


def test_pissa_is_stored_as_a_plain_lora_of_twice_the_rank_on_the_untouched_base(tiny_config):
    """lora.init=pissa trains on the residual base; the store gets peft's conversion, which the
    float base as served (no PiSSA, no residual) must score exactly as the trainer did."""
    from peft import LoraConfig

    from lorastack.train.assess import evaluate_adapter

    tiny_config["lora"].update(init="pissa")
    result = train(tiny_config)
    adapter = AdapterStore(tiny_config["store"]).resolve("tiny-sentiment")
    stored = LoraConfig.from_pretrained(adapter.path)
    assert (stored.r, stored.lora_alpha, stored.init_lora_weights) == (8, 16, True)
    assert adapter.manifest.lora.rank == 8 and adapter.manifest.training["lora"]["init"] == "pissa"
    a = next(v for k, v in _tensors(adapter.path).items() if "lora_A" in k)
    assert a.shape[0] == 8
    served = evaluate_adapter("tiny-sentiment", split="validation", store=tiny_config["store"])
    for key in ("loss", "accuracy", "macro_f1"):
        assert served[key] == pytest.approx(result.metrics["validation"][key], abs=1e-4), key


def test_pissa_and_its_served_rank_are_checked_in_the_config(tiny_config):
    with pytest.raises(ValueError, match="lora.init=pissa needs quantization: none"):
        build_config(dict(tiny_config, quantization="4bit", lora={"r": 4, "init": "pissa"}))
    with pytest.raises(ValueError, match=r"lora.r=16 \(served as rank 32: lora.init=pissa "
                                         r"doubles it\) is above the server's max rank 16"):
        build_config(dict(tiny_config, lora={"r": 16, "init": "pissa"}))
    assert build_config(dict(tiny_config, lora={"r": 16, "init": "pissa",
                                                "serving_rank": 32})).lora.init == "pissa"


def test_loraplus_gives_b_its_own_learning_rate_and_resumes_exactly(tiny_config, monkeypatch,
                                                                   crash_at):
    import peft.optimizers

    made = []
    real = peft.optimizers.create_loraplus_optimizer

    def spy(model, *args, **kwargs):
        optimizer = real(model, *args, **kwargs)
        kind = {id(p): n.split(".")[-3] for n, p in model.named_parameters()}  # lora_A.default.
        made.append([(g["lr"], g["weight_decay"], {kind[id(p)] for p in g["params"]})
                     for g in optimizer.param_groups if g["params"]])
        return optimizer

    monkeypatch.setattr(peft.optimizers, "create_loraplus_optimizer", spy)
    tiny_config["training"].update(loraplus_lr_ratio=16.0, weight_decay=0.01)
    reference = train(dict(tiny_config, name="plus"))
    assert made[0] == [(5e-3, 0.01, {"lora_A"}), (pytest.approx(0.08), 0.01, {"lora_B"})]

    with pytest.raises(crash_at.error):
        train(dict(tiny_config, name="plus-cut"), on_step=crash_at(3))
    resumed = train(dict(tiny_config, name="plus-cut"), resume=True)
    a, b = _tensors(reference.adapter_dir), _tensors(resumed.adapter_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_a_loss_that_becomes_nan_stops_the_run_naming_the_fix(tiny_config, monkeypatch):
    """A diverged run stops at the step it diverged, saying what to change, instead of
    training on and exporting weights selected against a NaN."""
    from lorastack.train import loop

    real, calls = loop.answer_loss, []

    def diverging(model, batch):  # the third forward pass (step 3) overflows
        loss, n = real(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 3 else loss), n

    monkeypatch.setattr(loop, "answer_loss", diverging)
    cfg = dict(tiny_config, name="diverging")
    with pytest.raises(ConfigError, match=r"the training loss became nan at step 3: "
                                          r"train again with a lower training\.lr"):
        train(cfg)
    assert not AdapterStore(cfg["store"]).exists("diverging")


def test_replace_false_is_refused_before_the_run_not_after(tiny_config, tmp_path):
    """replace: false with the name taken in the store: refused at once, the earlier run's
    directory untouched, instead of after training (or after a whole search)."""
    first = train(dict(tiny_config, name="kept"))
    before = sorted(p.name for p in first.run_dir.iterdir())
    with pytest.raises(ConfigError, match=r"replace: false, and the store .* already holds an "
                                          r"adapter named 'kept'.*lorastack adapters rm kept"):
        train(dict(tiny_config, name="kept", replace=False))
    assert sorted(p.name for p in first.run_dir.iterdir()) == before
