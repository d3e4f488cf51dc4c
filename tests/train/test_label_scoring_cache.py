"""Label scoring on the prompt's KV cache equals scoring prompt + continuation as one row per
(example, label), the way it used to be done, on a tiny random Llama with a random LoRA."""

from __future__ import annotations

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


def _setup(tiny_base, labels, n):
    """A PromptFormat for `labels` and `n` examples whose prompts vary in length (3-60 words)."""
    from lorastack.train.examples import PromptFormat, encode_records
    from lorastack.train.model import load_tokenizer

    cfg = build_config({"task": {"prompt": "{text}", "labels": labels}})
    fmt = PromptFormat(load_tokenizer(tiny_base), cfg, labels)
    words = ["the", "pills", "helped", "a", "little", "but", "my", "sleep", "got", "worse"]
    records = [{"text": " ".join(words[(i + k) % len(words)] for k in range(3 + (i * 7) % 58)),
                "label": labels[i % len(labels)]} for i in range(n)]
    return fmt, encode_records(fmt, records, "test").examples


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
        for i, value in zip(idx, per_row.tolist()):
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
