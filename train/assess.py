"""Evaluate an adapter from the store, or the base model zero-shot, on a data split.

Both use the trainer's evaluation (label scoring for classification, greedy decoding for
generation) on the float base model, which is what the server runs.
"""

from __future__ import annotations

from pathlib import Path

from lorastack.adapters.files import check_base
from lorastack.adapters.models import resolve_base
from lorastack.adapters.store import AdapterStore
from lorastack.train.config import TrainConfig, build_config, load_config
from lorastack.train.data import DataError, is_catalog_name, load_records
from lorastack.train.run import config_splits


def evaluate_adapter(name: str, *, data: str | None = None, split: str = "test",
                     store: str | Path | None = None, columns: dict | None = None,
                     limit: int | None = None) -> dict:
    """Metrics of adapter `name` on `split` of `data` (default: the data it was trained on)."""
    adapter = AdapterStore(store).resolve(name)
    manifest = adapter.manifest
    cfg = _config_from_manifest(manifest)
    base = resolve_base(manifest.base_model)
    check_base(manifest, base.fingerprint, adapter.path / "manifest.json")
    return _evaluate(cfg, base.path, list(manifest.labels), data, split, columns, limit,
                     adapter_dir=adapter.path, chat_format=manifest.chat_format)


def evaluate_zero_shot(config: str | Path | TrainConfig, *, data: str | None = None,
                       split: str = "test", columns: dict | None = None,
                       limit: int | None = None) -> dict:
    """Metrics of the config's base model without any adapter, with the same prompt/scoring."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    base = resolve_base(cfg.base)
    labels = cfg.task.labels
    if cfg.task.type == "classification" and not labels:
        from lorastack.train.examples import infer_labels

        labels = infer_labels(load_records(cfg.data.source, "train" if is_catalog_name(
            cfg.data.source) else None, cfg.data.columns), cfg.task.label_field)
    return _evaluate(cfg, base.path, labels or [], data, split, columns, limit)


def _evaluate(cfg: TrainConfig, base_path: Path, labels: list[str], data, split, columns, limit,
              adapter_dir: Path | None = None, chat_format: str | None = None) -> dict:
    from lorastack.train import evaluate as ev
    from lorastack.train.examples import PromptFormat, encode_records
    from lorastack.train.model import load_base, load_tokenizer, pick_device

    columns = columns or cfg.data.columns or None
    if data is None:  # the splits the adapter was trained and evaluated with
        if split not in ("train", "validation", "test"):
            raise DataError(f"split must be train, validation or test, got {split!r}")
        records = getattr(config_splits(cfg, columns), split)
    else:
        records = load_records(data, split if is_catalog_name(data) else None, columns)
    records = records[:limit] if limit else records
    tokenizer = load_tokenizer(base_path)
    fmt = PromptFormat(tokenizer, cfg, labels)
    if chat_format and chat_format != "{input}":
        fmt.chat_format = chat_format  # the adapter's own record of its prompt wins
    examples = encode_records(fmt, records, split).examples
    model = load_base(cfg.model_copy(update={"quantization": "none"}), base_path, pick_device())
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    if cfg.task.type == "classification":
        metrics, _ = ev.evaluate_classification(model, fmt, examples, progress=True)
    else:
        metrics, _ = ev.evaluate_generation(model, fmt, examples, cfg.task.max_new_tokens,
                                            progress=True)
    return metrics


def _config_from_manifest(manifest) -> TrainConfig:
    if manifest.training:
        return TrainConfig.model_validate(manifest.training)
    # an imported adapter: what the manifest says is all there is
    task = {"type": manifest.task, "prompt": manifest.prompt_template}
    if manifest.labels:
        task.update(labels=list(manifest.labels), label_words=dict(manifest.label_words))
    return build_config({"name": manifest.name, "base": manifest.base_model, "task": task,
                         "lora": {"for_serving": False}}, where=f"adapter {manifest.name}")
