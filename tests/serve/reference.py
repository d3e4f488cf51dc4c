"""The trainer's own label probabilities for an adapter from the store (torch + peft), to check
that /v1/classify delivers what the trainer's evaluation reports."""

from __future__ import annotations

from pathlib import Path


def trainer_probabilities(adapter_dir: Path, texts: list[str]) -> list[dict[str, float]]:
    from peft import PeftModel

    from lorastack.adapters.files import read_adapter
    from lorastack.adapters.models import resolve_base
    from lorastack.train import evaluate as ev
    from lorastack.train.config import TrainConfig
    from lorastack.train.examples import IGNORE, Example, PromptFormat
    from lorastack.train.model import load_base, load_tokenizer, pick_device

    adapter = read_adapter(adapter_dir)
    manifest = adapter.manifest
    cfg = TrainConfig.model_validate(manifest.training)
    base = resolve_base(manifest.base_model, fetch=False)
    tokenizer = load_tokenizer(base.path)
    fmt = PromptFormat(tokenizer, cfg, list(manifest.labels))
    fmt.chat_format = manifest.chat_format
    examples = []
    for i, text in enumerate(texts):
        ids = fmt.encode(fmt.prompt_text({"text": text}))
        examples.append(Example(ids, [IGNORE] * len(ids), i, label=0, prompt_len=len(ids)))
    model = load_base(cfg.model_copy(update={"quantization": "none"}), base.path, pick_device())
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    _, probs = ev.evaluate_classification(model, fmt, examples)
    return probs
