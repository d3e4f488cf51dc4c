"""Model families through real vLLM, by the code that measures the README's support matrix
(bench/families.py::measure): a classification adapter trained on a tiny family model, float
and 4-bit, is served by `lorastack serve --base DIR` and /v1/classify equals the trainer's
evaluation: here a base without a chat template (plain prompt format); GPT-2, which vLLM cannot
serve LoRA on, is refused before training with vLLM's reason and trains with
lora.for_serving: false. Every other family (Gemma 2's softcapping, Phi-3's fused modules, ...)
is served the same way by `python -m bench.families`, which writes the README's matrix: each
vLLM start costs about 70 s of the suite, so the suite serves one."""

from __future__ import annotations

import pytest

from bench import families

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["llama-base"])
def test_family_is_served_as_trained(name, base_model, tmp_path):
    row = families.measure(name, base_model.path, tmp_path)
    print(f"\n{name}: {families._cells(row)}")
    assert row["train_none"] == "ok" and row["train_4bit"] == "ok", row
    assert row["prompt_format"] == ("plain" if name == "llama-base" else "chat")
    assert row["vllm_lora"] and not row.get("served_error"), row
    assert row["served_gap"] is not None and row["served_gap"] <= families.PARITY, row
    assert row["logits_gap"] < 1e-4


def test_gpt2_is_refused_with_vllms_reason(base_model, tmp_path):
    row = families.measure("gpt2", base_model.path, tmp_path, serve=True)
    assert not row["vllm_lora"] and "GPT2LMHeadModel does not implement LoRA" in \
        row["vllm_reason"]
    assert row["train_none"].startswith("refused: lora.for_serving:"), row
    assert row["train_none"].endswith("trains with lora.for_serving: false"), row
    assert row["served_gap"] is None and row["prompt_format"] == "plain"
