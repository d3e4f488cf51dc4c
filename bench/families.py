"""Model families: tiny random-weight models of each architecture lorastack claims, and the
support matrix (float / 4-bit training, servable by vLLM, train/serve parity) measured on them.

Each family is a transformers config (2 layers, hidden size 128, head size 64) saved with
SmolLM2's real tokenizer and the family's own chat template (its turn markers added as special tokens), so
prompts, end-of-turn markers and system-role handling are the family's; only the weights are
random. Speed and quality need real weights; shapes, module names, logit processing, prompt
formats and what vLLM loads do not.

    python -m bench.families [--families llama,gemma2] [--no-serve]

writes bench/results/families.json: per family, whether a classification adapter trains in
float and in 4-bit, whether answer-position logits equal the model's own forward, what vLLM
can carry LoRA on (or why not), and whether /v1/classify through real vLLM equals the
trainer's evaluation (max probability gap). bench/report.py renders it as the README's
support matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
          "{{ raise_exception('System role not supported') }}{% endif %}"
          "{% for m in messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}"
          "{% else %}{% set role = m['role'] %}{% endif %}"
          "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
GEMMA3 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
          "{% set first = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
          "{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
          "{% for m in loop_messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}"
          "{% else %}{% set role = m['role'] %}{% endif %}"
          "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim"
          " + '<end_of_turn>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}"
           "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
           "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}"
           "{% endfor %}")
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
        "{% else %}{{ eos_token }}{% endif %}")


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # a transformers config class
    config: dict[str, Any]
    template: str | None  # None: a base model without a chat template
    special: tuple[str, ...] = ()  # the template's turn markers, added as special tokens
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# head_dim 64 (SmolLM2's): vLLM's CPU attention has kernels for some head sizes only (16 fails)
_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512}

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "LlamaConfig", _SHAPE, LLAMA3,
           ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "Llama 3 template"),
    Family("llama-base", "LlamaConfig", _SHAPE, None, (),
           "a pretrained (not instruct) model: no chat template, plain prompt format"),
    Family("qwen2", "Qwen2Config", _SHAPE, CHATML, (), "ChatML template"),
    Family("qwen3", "Qwen3Config", {**_SHAPE, "head_dim": 64}, CHATML, ()),
    Family("gemma2", "Gemma2Config",
           {**_SHAPE, "head_dim": 64, "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 64, "sliding_window": 64},
           GEMMA2, ("<start_of_turn>", "<end_of_turn>"),
           "final-logit softcapping; template refuses a system role (folded into the user turn)"),
    Family("gemma3", "Gemma3TextConfig",
           {**_SHAPE, "head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 64},
           GEMMA3, ("<start_of_turn>", "<end_of_turn>"), "text-only Gemma 3"),
    Family("mistral", "MistralConfig", {**_SHAPE, "sliding_window": None}, MISTRAL,
           ("[INST]", "[/INST]"), "template has no system role (folded)"),
    Family("phi3", "Phi3Config", {**_SHAPE, "pad_token_id": None}, PHI3,
           ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
           "fused qkv_proj and gate_up_proj"),
    Family("gpt2", "GPT2Config", {"n_embd": 128, "n_layer": 2, "n_head": 2, "n_positions": 512},
           None, (), "no chat template: plain prompt format; Conv1D layers"),
    Family("cohere", "CohereConfig", {**_SHAPE, "logit_scale": 0.25}, CHATML, (),
           "logit_scale"),
    Family("granite", "GraniteConfig", {**_SHAPE, "logits_scaling": 4.0}, CHATML, (),
           "logits_scaling"),
)}


def build(family: Family | str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A tiny random-weight model of `family`, with its tokenizer and template, in `out`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = FAMILIES[family] if isinstance(family, str) else family
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if fam.special:
        tok.add_special_tokens({"additional_special_tokens": list(fam.special)})
    tok.chat_template = fam.template
    vocab = -(-len(tok) // 64) * 64
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    kwargs = {**ids, **fam.config, "vocab_size": vocab, "initializer_range": 0.5}
    if fam.name != "gpt2":
        kwargs.setdefault("tie_word_embeddings", True)
    config = getattr(transformers, fam.config_class)(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# -- the support matrix ----------------------------------------------------------------------

TEXTS = ["Worked well for my pain, no side effects.", "Made me sick for a week.",
         "It is fine, nothing special.", "Stopped it after two days, awful."]


def _train(name: str, base: Path, root: Path, quantization: str, *extra: str) -> Any:
    from lorastack.adapters.store import AdapterStore
    from lorastack.train import train
    from lorastack.train.config import load_config

    cfg = load_config("reviews-classify", [
        f"name=fam-{name}-{quantization}", f"base={base}", f"store={root / 'store'}",
        f"runs_dir={root / 'runs'}", f"quantization={quantization}", "lora.layers=null",
        "lora.r=4", "training.max_steps=3", "training.eval_every=3", "training.batch_size=4",
        "data.limit_train=24", "data.limit_eval=8", "data.max_length=128",
        "evaluate_test=false", *extra])
    train(cfg)
    return AdapterStore(root / "store").resolve(cfg.name)


def served_probabilities(base: Path, root: Path, model: str,
                         texts: list[str]) -> list[dict[str, float]]:
    """/v1/classify through `lorastack serve --base DIR` (real vLLM) for the store's adapter."""
    import asyncio
    import sys

    import httpx

    from lorastack.serve.vllm_proc import ChildProcess, free_port

    port = free_port()
    server = ChildProcess("`lorastack serve`", port, root / "serve.log", [
        sys.executable, "-m", "lorastack", "serve", "--store", str(root / "store"),
        "--base", str(base), "--port", str(port), "--work-dir", str(root / "work"),
        "--log-level", "warning", "--vllm-args=--enforce-eager"])
    try:
        asyncio.run(server.start().wait_healthy(600))
        r = httpx.post(f"{server.url}/v1/classify", json={"model": model, "input": texts},
                       timeout=300)
        if r.status_code != 200:
            raise RuntimeError(f"/v1/classify answered {r.status_code}: {r.text[:300]}")
        return [row["probabilities"] for row in r.json()["data"]]
    finally:
        server.stop(60)


def measure(name: str, tokenizer_dir: Path, root: Path, serve: bool = True) -> dict[str, Any]:
    """One family's row: what trains, what vLLM serves, and train/serve parity."""
    from lorastack.adapters.engine_lora import engine_lora
    from lorastack.train.config import ConfigError
    from lorastack.train.model import check_answer_logits, load_tokenizer

    fam = FAMILIES[name]
    base = build(fam, tokenizer_dir, root / "base")
    row: dict[str, Any] = {"family": name, "config": fam.config_class, "note": fam.note}
    engine = engine_lora(base)
    row["architecture"] = engine.architecture if engine else ""
    row["vllm_lora"] = bool(engine and engine.supports_lora)
    row["vllm_modules"] = sorted(engine.modules) if engine and engine.supports_lora else []
    row["vllm_reason"] = engine.reason if engine else "vLLM not installed"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    row["logits_gap"] = check_answer_logits(model, load_tokenizer(base))
    del model
    adapters = {}
    for quant in ("none", "4bit"):
        try:
            adapters[quant] = _train(name, base, root, quant)
            row[f"train_{quant}"] = "ok"
        except ConfigError as exc:  # a refusal before training (not servable by vLLM)
            row[f"train_{quant}"] = f"refused: {exc}"
            try:  # and without the serving check: does it train for transformers/peft?
                unserved = _train(name, base, root, quant, "lora.for_serving=false")
                row.setdefault("prompt_format", unserved.manifest.prompt_format)
                row[f"train_{quant}"] += " | trains with lora.for_serving: false"
            except Exception as again:  # noqa: BLE001 - recorded in the matrix
                row[f"train_{quant}"] += f" | for_serving false: {type(again).__name__}"
        except Exception as exc:  # noqa: BLE001 - recorded in the matrix, not hidden
            row[f"train_{quant}"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    adapter = adapters.get("none")
    if adapter is not None:
        row["prompt_format"] = adapter.manifest.prompt_format
    row.setdefault("prompt_format", "")
    row["served_gap"] = None
    if adapter is not None and serve and row["vllm_lora"]:
        from lorastack.train.assess import adapter_probabilities

        expected = adapter_probabilities(adapter.path, TEXTS)
        try:
            served = served_probabilities(base, root, adapter.manifest.name, TEXTS)
            row["served_gap"] = max(abs(s[k] - e[k]) for s, e in zip(served, expected)
                                    for k in e)
        except Exception as exc:  # noqa: BLE001 - recorded in the matrix, not hidden
            row["served_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


PARITY = 2e-3  # max |P(served) - P(trainer)| for a tick (float32 both sides)


def _cells(row: dict[str, Any]) -> list[str]:
    def trained(value: str) -> str:
        if value == "ok":
            return "yes"
        if value.startswith("refused"):
            return "refused for serving" + (" (trains unserved)" if "trains with" in value
                                            else "")
        return "no"

    if not row["vllm_lora"]:
        served = f"refused: {row['vllm_reason']}"
    elif row.get("served_error"):
        served = f"error: {row['served_error'][:80]}"
    else:
        served = "yes" if row["served_gap"] is not None else "not run"
    gap = row["served_gap"]
    parity = "not run" if gap is None else \
        f"{'yes' if gap <= PARITY else 'NO'} ({gap:.1e})"
    return [row["family"], row["architecture"] or row["config"], row["prompt_format"] or "-",
            trained(row["train_none"]), trained(row["train_4bit"]), served, parity,
            f"{row['logits_gap']:.1e}", row["note"]]


def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    from bench import common
    from lorastack.adapters.models import resolve_base

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", help="comma-separated subset of " + ", ".join(FAMILIES))
    p.add_argument("--no-serve", action="store_true", help="skip the vLLM parity runs")
    p.add_argument("--out", help="results directory (default bench/results)")
    args = p.parse_args(argv)
    names = args.families.split(",") if args.families else list(FAMILIES)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    tokenizer_dir = resolve_base().path
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorastack-families-") as tmp:
        for name in names:
            common.log(f"{name} ...")
            rows.append(measure(name, tokenizer_dir, Path(tmp) / name, not args.no_serve))
            common.log(f"{name}: {_cells(rows[-1])}")
    ticks = [r for r in rows if r["vllm_lora"] and r["served_gap"] is not None
             and r["served_gap"] <= PARITY and r["train_none"] == "ok"]
    refused = [r for r in rows if not r["vllm_lora"] and r["train_none"].startswith("refused")]
    covered = len(ticks) + len(refused)
    payload = {
        "title": "Model families: support matrix",
        "summary": (f"{len(ticks)} of {len(rows)} families train, serve through vLLM and match "
                    f"the trainer within {PARITY:g} in probability; refused before training with "
                    f"vLLM's reason: {len(refused)}. Tiny random-weight models (2 layers, "
                    f"hidden 128) with each family's chat template on SmolLM2's tokenizer: "
                    f"shapes, logit processing, prompt formats and LoRA loading, not quality."),
        "tables": [common.table(
            "Support matrix (bench/families.py; a row per family, measured here)",
            ["family", "architecture", "prompt", "float LoRA", "4-bit QLoRA",
             "served by vLLM", "train/serve parity", "logits vs forward", "note"],
            [_cells(r) for r in rows])],
        "goals": [common.goal("every family is a tick or a tested, explained refusal",
                              covered / len(rows), 1.0, shown=f"{covered} of {len(rows)}")],
        "rows": rows,
    }
    common.write_result("families", payload, args.out,
                        setting="full" if len(names) == len(FAMILIES) else "subset")


if __name__ == "__main__":
    main()
