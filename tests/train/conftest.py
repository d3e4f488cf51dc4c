"""Fixtures for trainer tests: a tiny Llama built from a config (random weights, the real
tokenizer and chat template) and small data files, so the plumbing runs in seconds."""

from __future__ import annotations

import json
import random

import pytest

POSITIVE = ["works great", "love it", "helped me a lot", "no side effects, very happy",
            "best medicine ever", "my pain is gone"]
NEGATIVE = ["terrible side effects", "did not work", "made me sick", "awful, stopped it",
            "worst experience", "pain got worse"]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, base_model):
    """tiny_llama(layers): a Llama of that many layers with SmolLM2's tokenizer, saved as a
    local model directory (built once per layer count)."""
    made = {}

    def make(layers: int):
        if layers not in made:
            import torch
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

            out = tmp_path_factory.mktemp(f"tiny-llama-{layers}")
            tok = AutoTokenizer.from_pretrained(base_model.path)
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, tie_word_embeddings=True,
                initializer_range=0.5,  # logits big enough to learn from quickly
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
            LlamaForCausalLM(config).save_pretrained(out)
            tok.save_pretrained(out)
            made[layers] = out
        return made[layers]

    return make


@pytest.fixture(scope="session")
def tiny_base(tiny_llama):
    """A 2-layer Llama with SmolLM2's tokenizer, saved as a local model directory."""
    return tiny_llama(2)


class _Crash(Exception):
    """A run cut short by crash_at."""


@pytest.fixture
def crash_at():
    """crash_at(step): an on_step callback that raises crash_at.error when the run reaches
    `step` (after that step's checkpoint, if one is due)."""

    def make(step: int):
        def on_step(state):
            if state.step == step:
                raise _Crash
        return on_step

    make.error = _Crash
    return make


def _review_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        phrase = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        rows.append({"review": f"Review {i}: {phrase}.", "sentiment": label,
                     "drug": rng.choice(["Aspirin", "Zoloft"]),
                     "condition": rng.choice(["Pain", "Depression"])})
    return rows


@pytest.fixture
def review_files(tmp_path):
    """train/validation/test JSONL files with columns review, sentiment, drug, condition."""
    paths = {}
    for split, n, seed in (("train", 48, 0), ("validation", 12, 1), ("test", 12, 2)):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _review_rows(n, seed)))
        paths[split] = path
    return paths


@pytest.fixture
def tiny_config(tiny_base, review_files, tmp_path):
    """Settings for a seconds-long classification run on the tiny model."""
    return {
        "name": "tiny-sentiment",
        "base": str(tiny_base),
        "store": str(tmp_path / "store"),
        "runs_dir": str(tmp_path / "runs"),
        "task": {"type": "classification", "prompt": "{text}\nSentiment:",
                 "system": "Classify the review.", "label_field": "label"},
        "data": {"source": str(review_files["train"]),
                 "validation": str(review_files["validation"]),
                 "test": str(review_files["test"]),
                 "columns": {"text": "review", "label": "sentiment"}, "max_length": 128},
        "lora": {"r": 4, "alpha": 8},
        "training": {"lr": 5e-3, "batch_size": 8, "max_steps": 6, "eval_every": 3,
                     "save_every": 2, "warmup_ratio": 0.0},
    }
