"""Model families on the training side: for each tiny random-weight family model (bench/
families.py), the answer-position logits equal the model's own forward (softcapping, logit
scales included), the prompt format is the family's (chat template, system folding, plain
for a base without a template), LoRA finds the family's linear layers, and a classification
adapter trains and records its format in the manifest."""

from __future__ import annotations

import pytest

from bench import families

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, base_model):
    root = tmp_path_factory.mktemp("families")
    return {name: families.build(name, base_model.path, root / name) for name in families.FAMILIES}


def _load(path):
    from transformers import AutoModelForCausalLM

    from lorastack.train.model import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path)


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_answer_logits_are_the_models_own(family_dirs, name):
    """With padding and an answer mask, answer_logits equals model(...).logits there: the
    head's output processing of each family (Gemma's softcap, Cohere's logit_scale, Granite's
    logits_scaling) is applied, and LoRA finds linear layers to adapt."""
    import torch

    from lorastack.train.config import build_config
    from lorastack.train.model import answer_logits, attach_lora, check_answer_logits

    model, tok = _load(family_dirs[name])
    cfg = build_config({"base": str(family_dirs[name]), "lora": {"r": 4}})
    peft_model = attach_lora(cfg, model)
    assert check_answer_logits(peft_model, tok) < 1e-4
    ids = torch.randint(5, 1000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, [2, 8]] = True
    positions[1, 5] = True
    peft_model.eval()
    with torch.no_grad():
        ours = answer_logits(peft_model, ids, mask, positions)
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits[positions]
    assert ours.shape == (3, theirs.shape[-1])
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)
    config = model.config
    if getattr(config, "final_logit_softcapping", None):  # the cap is really in force
        assert float(ours.abs().max()) <= config.final_logit_softcapping
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert adapted, f"{name}: LoRA adapted nothing"


def test_gpt2_linear_layers_are_its_conv1d_blocks(family_dirs):
    from lorastack.train.model import linear_module_names

    model, _ = _load(family_dirs["gpt2"])
    assert linear_module_names(model) == ["c_attn", "c_fc", "c_proj"]


@pytest.mark.parametrize("name,expect_format,system_turn", [
    ("llama", "chat", True), ("gemma2", "chat", False), ("mistral", "chat", False),
    ("gemma3", "chat", True), ("phi3", "chat", True), ("gpt2", "plain", False)])
def test_prompt_formats(family_dirs, name, expect_format, system_turn):
    """Chat when the tokenizer has a template, plain otherwise; a system text reaches the
    prompt either as its own turn or folded into the user turn, never lost or crashing."""
    from lorastack.train.examples import chat_format, system_messages

    _, tok = _load(family_dirs[name])
    text, end, used = chat_format(tok, "Be brief.", "auto")
    assert used == expect_format
    assert text.count("{input}") == 1 and "Be brief." in text
    assert len(tok(end, add_special_tokens=False)["input_ids"]) == 1
    messages = system_messages(tok, "Be brief.", [{"role": "user", "content": "hi"}])
    if expect_format == "chat":
        assert (messages[0]["role"] == "system") is system_turn
    if expect_format == "plain":
        assert end == tok.eos_token and text.endswith("{input}")


def test_forced_formats(family_dirs):
    from lorastack.train.data import DataError
    from lorastack.train.examples import chat_format

    _, tok = _load(family_dirs["llama"])
    text, end, used = chat_format(tok, None, "plain")
    assert (used, end) == ("plain", tok.eos_token) and "<|start_header_id|>" not in text
    _, no_template = _load(family_dirs["gpt2"])
    with pytest.raises(DataError, match="task.format: plain"):
        chat_format(no_template, None, "chat")


def test_servability_asks_vllms_model_class(family_dirs):
    """What trains is what vLLM loads: modules are checked against vLLM's class for the
    architecture (adapters/engine_lora.py), before any weights load, with the reason."""
    from lorastack.train.base_check import check_against_base
    from lorastack.train.config import ConfigError, build_config

    def check(name, **lora):
        cfg = build_config({"base": str(family_dirs[name]), "lora": lora})
        return cfg, check_against_base(cfg, family_dirs[name])

    with pytest.raises(ConfigError, match=r"\['lm_head'\] are not servable by vLLM's "
                       r"Qwen2ForCausalLM .*lora.for_serving: false"):
        check("qwen2", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="GPT2LMHeadModel does not implement LoRA"):
        check("gpt2")
    cfg, notes = check("phi3", target_modules=["qkv_proj", "gate_up_proj"])  # fused, as vLLM
    assert notes == [] and cfg.lora.target_modules == ["qkv_proj", "gate_up_proj"]
    cfg, notes = check("gemma2")  # all-linear: every block linear layer is servable
    assert notes == [] and cfg.lora.target_modules == "all-linear"
    cfg, notes = check("gpt2", for_serving=False)  # trains, for transformers/peft only
    assert notes == []
