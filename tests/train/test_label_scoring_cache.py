"""Label scoring on the prompt's KV cache equals scoring prompt + continuation as one row per
(example, label), the way it used to be done, on a tiny random Llama with a random LoRA."""

from __future__ import annotations

import re
import time

import pytest
import torch

from lorastack.train.config import build_config
from lorastack.train.evaluate import label_logprob_sums

SINGLE = ["negative", "positive", "neutral"]
MULTI = ["neutral", "mixed feelings", "somewhat positive", "not sure at all"]  # 1-4 tokens
SHARED_FIRST = ["very negative", "very positive", "very bad", "neutral"]
PREFIX = ["good", "good enough", "very good"]  # "good" is a prefix: end-of-turn is scored too


@pytest.fixture(scope="module")
def lora_model(tiny_base):
    """The tiny Llama with a LoRA whose B matrices are random (fresh ones are zero: no effect)."""
    from transformers import AutoModelForCausalLM

    from lorastack.train.model import attach_lora

    cfg = build_config({"lora": {"r": 4, "alpha": 8}})
    torch.manual_seed(1)
    model = attach_lora(cfg, AutoModelForCausalLM.from_pretrained(tiny_base,
                                                                  dtype=torch.float32))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def _setup(tiny_base, labels, n, label_words=None, prompt="{text}"):
    """A PromptFormat for `labels` and `n` examples whose prompts vary in length (3-60 words)."""
    from lorastack.train.examples import PromptFormat, encode_records
    from lorastack.train.model import load_tokenizer

    cfg = build_config({"task": {"prompt": prompt, "labels": labels,
                                 "label_words": label_words or {}}})
    fmt = PromptFormat(load_tokenizer(tiny_base), cfg, labels)
    return fmt, encode_records(fmt, _records(labels, n), "test").examples


def _records(labels, n):
    words = ["the", "pills", "helped", "a", "little", "but", "my", "sleep", "got", "worse"]
    return [{"text": " ".join(words[(i + k) % len(words)] for k in range(3 + (i * 7) % 58)),
             "label": labels[i % len(labels)]} for i in range(n)]


@torch.no_grad()
def _per_row_sums(model, fmt, examples, batch_size=16):
    """Reference: the former scorer, one right-padded row per (example, label)."""
    from lorastack.train.batching import collate
    from lorastack.train.examples import IGNORE, Example
    from lorastack.train.model import answer_logits

    model.eval()
    conts = [fmt.continuations[label] for label in fmt.labels]
    rows = [Example(ex.input_ids[:ex.prompt_len] + c, [IGNORE] * ex.prompt_len + c, ex.row)
            for ex in examples for c in conts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    out = [0.0] * len(rows)
    step = batch_size * len(conts)
    for start in range(0, len(order), step):
        idx = order[start:start + step]
        batch = collate([rows[i] for i in idx], fmt.pad_id)
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        positions = torch.zeros_like(batch["labels"], dtype=torch.bool)
        positions[:, :-1] = mask
        logits = answer_logits(model, batch["input_ids"], batch["attention_mask"], positions)
        token_lp = torch.log_softmax(logits, -1).gather(-1, targets[mask][:, None])[:, 0]
        per_row = torch.zeros(len(idx)).index_add_(0, mask.nonzero()[:, 0], token_lp)
        for i, value in zip(idx, per_row.tolist(), strict=True):
            out[i] = value
    n = len(conts)
    return [out[i * n:(i + 1) * n] for i in range(len(examples))]


@pytest.mark.parametrize("labels", [SINGLE, MULTI, SHARED_FIRST, PREFIX],
                         ids=["single-token", "multi-token", "shared-first-token", "prefix"])
def test_cached_scores_equal_per_row_scores(tiny_base, lora_model, labels):
    fmt, examples = _setup(tiny_base, labels, 11)
    lengths = [len(c) for c in fmt.continuations.values()]
    assert (max(lengths) == 1) == (labels is SINGLE)
    assert fmt.score_end == (labels is PREFIX)
    got = label_logprob_sums(lora_model, fmt, examples, batch_size=4)  # mixed lengths per batch
    want = _per_row_sums(lora_model, fmt, examples)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    with lora_model.disable_adapter():  # the LoRA is in effect (its scores differ)
        base = label_logprob_sums(lora_model, fmt, examples[:2])
    assert base[0] != pytest.approx(got[0], abs=1e-3)


@pytest.mark.parametrize("labels,words", [(SINGLE, {"neutral": "so-so"}), (MULTI, None),
                                          (PREFIX, {"very good": "great"})],
                         ids=["single-token", "multi-token", "prefix"])
def test_the_gateway_sends_the_token_ids_the_trainer_scores(tiny_base, labels, words):
    """serve/scoring.py's rows, from the manifest train/run.py writes, hold the trainer's ids;
    the label continuations are tokenized once per adapter version."""
    from types import SimpleNamespace

    from lorastack.adapters.manifest import AdapterManifest, LoraSettings
    from lorastack.serve.scoring import PromptTooLong, Tokenizer, build_rows

    fmt, examples = _setup(tiny_base, labels, 6, words, prompt="Review: {text}")
    assert fmt.score_end == (labels is PREFIX)
    fields = {"name": "m", "task": "classification", "base_model": "tiny",
              "base_fingerprint": "sha256:" + "ab" * 32,
              "lora": LoraSettings(rank=4, alpha=8, target_modules=("q_proj",)),
              "prompt_template": fmt.task.prompt, "chat_format": fmt.chat_format,
              "end_of_turn": fmt.end_of_turn, "score_end_of_turn": fmt.score_end,
              "labels": tuple(labels), "label_words": dict(fmt.task.label_words)}
    manifest = AdapterManifest(**fields)
    served = SimpleNamespace(manifest=manifest, continuations=None)
    tok = Tokenizer(tiny_base)
    rows = build_rows(tok, served, _records(labels, 6), 10_000)
    assert rows.labels == fmt.labels and rows.conts == fmt.continuations
    assert list(rows.conts) == fmt.labels
    assert rows.prompts == [ex.input_ids[:ex.prompt_len] for ex in examples]
    short = build_rows(tok, served, [{"text": "x"}], 10_000)
    assert short.conts is rows.conts  # cached on the version
    limit = len(short.prompts[0]) + max(map(len, rows.conts.values()))  # "x" just fits
    want = (f"input 1 is {len(rows.prompts[5]) + limit - len(short.prompts[0])} tokens once "
            f"put in adapter 'm''s prompt (with the longest label); the limit is {limit}. "
            f"Shorten the text.")
    with pytest.raises(PromptTooLong, match=f"^{re.escape(want)}$"):
        build_rows(tok, served, [{"text": "x"}, _records(labels, 6)[5]], limit)
    # `lorastack eval` of a stored adapter scores as its manifest says, whatever it says
    flipped = AdapterManifest(**fields | {"score_end_of_turn": not fmt.score_end})
    fmt.follow(flipped)
    fresh = SimpleNamespace(manifest=flipped, continuations=None)
    assert fmt.continuations == build_rows(tok, fresh, [], 10_000).conts != rows.conts


def test_timing_per_row_vs_cached(tiny_base, lora_model):
    """Printed, not asserted (run with -s): 64 examples, 4 multi-token labels; best of 3 on one
    thread, since two threads on a busy 2-core machine made single runs vary tenfold."""
    fmt, examples = _setup(tiny_base, MULTI, 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        label_logprob_sums(lora_model, fmt, examples[:8])  # warm-up
        old, new = (min(_seconds(fn, lora_model, fmt, examples) for _ in range(3))
                    for fn in (_per_row_sums, label_logprob_sums))
    finally:
        torch.set_num_threads(threads)
    print(f"\nlabel scoring, 64 examples x 4 labels: per-row {old:.3f}s, cached {new:.3f}s, "
          f"speedup {old / new:.2f}x")


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start
