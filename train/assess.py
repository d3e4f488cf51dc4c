"""Evaluate an adapter from the store, or the base model zero-shot, on a data split.

Both use the trainer's evaluation (label scoring for classification, greedy decoding for
generation) on the float base model, which is what the server runs. An adapter is evaluated
with its manifest's own prompt (chat format, template, label words), as the server renders it.
An imported adapter (`lorastack adapters import`) has no training config, so there is no
data it is known to have seen: it needs `data`.
"""

from __future__ import annotations

from pathlib import Path

from lorastack.adapters.files import check_base
from lorastack.adapters.models import resolve_base
from lorastack.adapters.store import AdapterStore
from lorastack.train.config import TrainConfig, build_config, load_config
from lorastack.train.data import DataError, is_catalog_name, load_records, load_split
from lorastack.train.run import config_splits

TRAINED_SPLITS = ("train", "validation", "test")


def evaluate_adapter(name: str, *, data: str | None = None, split: str | None = None,
                     store: str | Path | None = None, columns: dict | None = None,
                     limit: int | None = None) -> dict:
    """Metrics of adapter `name` on `split` of `data` (default: the data it was trained on).

    `split` defaults to test; a data file without splits is used whole (see data.load_split).
    The result says what it was measured on under "evaluated_on".
    """
    adapter = AdapterStore(store).resolve(name)
    manifest = adapter.manifest
    cfg, trained = config_from_manifest(manifest)
    if data is None and not trained:
        raise DataError(
            f"adapter {name!r} was imported, not trained here: lorastack does not know its data. "
            f"Pass --data (a catalog dataset, a file or a directory of split files) whose "
            f"records have the fields its prompt uses ({_fields(cfg)}), mapping other column "
            f"names with --column FIELD=COLUMN")
    base = resolve_base(manifest.base_model)
    check_base(manifest, base.fingerprint, adapter.path / "manifest.json")
    return _evaluate(cfg, base.path, list(manifest.labels), data, split, columns, limit,
                     adapter_dir=adapter.path, manifest=manifest)


def evaluate_zero_shot(config: str | Path | TrainConfig, *, data: str | None = None,
                       split: str | None = None, columns: dict | None = None,
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
              adapter_dir: Path | None = None, manifest=None) -> dict:
    from lorastack.train import evaluate as ev
    from lorastack.train.examples import encode_records

    columns = columns or cfg.data.columns or None
    if data is None:  # the splits the adapter was trained and evaluated with
        split = split or "test"
        if split not in TRAINED_SPLITS:
            raise DataError(f"--split must be one of {', '.join(TRAINED_SPLITS)} for the data "
                            f"in the config, got {split!r}; or pass --data")
        records = getattr(config_splits(cfg, columns), split)
        where = f"{cfg.data.source} {split}"
        if not records:
            raise DataError(f"the {split} split of {cfg.data.source} is empty (the config has "
                            f"no data.{split}): pass --split validation, or --data a file")
    else:
        records, where = load_split(data, split, columns)
    records = records[:limit] if limit else records
    model, fmt = _load_model(cfg, base_path, labels, adapter_dir, manifest)
    examples = encode_records(fmt, records, split or "data").examples
    if not examples:  # generation: records without an answer are dropped
        raise DataError(f"no examples to evaluate in {where}: no record has an answer in "
                        f"{cfg.task.target_field!r}; map it with --column "
                        f"{cfg.task.target_field}=COLUMN")
    if cfg.task.type == "classification":  # at the adapter's temperature, and as scored
        from lorastack.train.calibration import metrics_at

        sums = ev.label_logprob_sums(model, fmt, examples, progress=True)
        metrics = metrics_at(fmt, examples, sums,
                             manifest.temperature if manifest is not None else 1.0,
                             manifest.label_bias if manifest is not None else None)[0]
    else:
        metrics, _ = ev.evaluate_generation(model, fmt, examples, cfg.task.max_new_tokens,
                                            progress=True)
    metrics["evaluated_on"] = where + (f", first {limit}" if limit else "")
    return metrics


def calibrate_adapter(name: str, *, store: str | Path | None = None,
                      runs_dir: str | Path = "runs") -> dict:
    """Fit adapter `name`'s temperature on its validation split (and its label bias first,
    when its config's task.label_bias asks for one; else its stored bias is kept) and write
    them to its manifest (with validation and test ECE before and after); a reliability
    diagram goes to <runs_dir>/<name>/reliability.png. For adapters trained before
    calibration existed, or trained with task.calibrate: false."""
    import shutil
    import tempfile

    from lorastack.adapters.manifest import Metrics
    from lorastack.train.calibration import calibrated_metrics
    from lorastack.train.examples import encode_records
    from lorastack.train.run import manifest_numbers

    adapters = AdapterStore(store)
    adapter = adapters.resolve(name)
    manifest = adapter.manifest
    if manifest.task != "classification":
        raise DataError(f"adapter {name!r} is a {manifest.task} adapter: only classification "
                        "adapters have label probabilities to calibrate")
    cfg, trained = config_from_manifest(manifest)
    if not trained:
        raise DataError(f"adapter {name!r} was imported: lorastack does not know its validation "
                        "data, so it cannot fit its temperature")
    base = resolve_base(manifest.base_model)
    check_base(manifest, base.fingerprint, adapter.path / "manifest.json")
    model, fmt = _load_model(cfg, base.path, list(manifest.labels), adapter.path, manifest)
    from lorastack.train.run import trained_splits

    splits = trained_splits(cfg)  # the validation its run fitted on
    val = encode_records(fmt, splits.validation, "validation").examples
    test = encode_records(fmt, splits.test, "test").examples if cfg.evaluate_test else []
    plot = Path(runs_dir) / name / "reliability.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    metrics, temperature, bias = calibrated_metrics(
        model, fmt, val, test, fit_bias=cfg.task.label_bias == "macro_f1",
        bias=manifest.label_bias, plot=plot, title=name)

    def numbers(split: str) -> dict[str, float]:
        new = manifest_numbers(metrics.get(split, {}))
        return {**getattr(manifest.metrics, split), **new}

    updated = manifest.replace(temperature=temperature, label_bias=bias, metrics=Metrics(
        validation=numbers("validation"), test=numbers("test") if test else
        dict(manifest.metrics.test)))
    with tempfile.TemporaryDirectory(prefix="lorastack-calibrate-") as tmp:
        files = Path(tmp) / name
        shutil.copytree(adapter.path, files)
        adapters.write(name, files, updated, replace=True)
    return {"temperature": temperature, "label_bias": bias, "plot": str(plot), **metrics}


def _load_model(cfg: TrainConfig, base_path: Path, labels: list[str],
                adapter_dir: Path | None, manifest):
    """The float base (as served) with the adapter, and the prompt format it was trained
    with (the manifest's own record of its prompt wins, as in serving)."""
    from lorastack.train.examples import PromptFormat
    from lorastack.train.model import load_base, load_tokenizer, pick_device

    tokenizer = load_tokenizer(base_path)
    fmt = PromptFormat(tokenizer, cfg, labels)
    if manifest is not None:
        fmt.follow(manifest)
    model = load_base(cfg.model_copy(update={"quantization": "none"}), base_path, pick_device())
    if adapter_dir is not None:
        from peft import PeftModel

        from lorastack.adapters.manifest import AdapterError

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        except (RuntimeError, ValueError) as exc:  # shapes or modules of another base model
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [repr(exc)]
            first = next((ln for ln in lines if "size mismatch" in ln), lines[0])
            raise AdapterError(f"its weights do not fit the base model {cfg.base} ({first})",
                               manifest.name, adapter_dir / "adapter_model.safetensors",
                               "import it with --base set to the model it was trained on") \
                from None
    return model, fmt


def config_from_manifest(manifest) -> tuple[TrainConfig, bool]:
    """The config to evaluate an adapter with, and whether it is the one it was trained with.

    A trained adapter's manifest holds its whole TrainConfig. An imported one holds only where
    it came from: the task, prompt and labels of the manifest are then all there is.
    """
    where = f"adapter {manifest.name}'s manifest (training)"
    if {"task", "data"} <= set(manifest.training):
        raw = manifest.training
        if "split_seed" not in raw["data"]:  # trained before data.split_seed: carved by seed
            raw = {**raw, "data": {**raw["data"],
                                   "split_seed": raw.get("training", {}).get("seed", 0)}}
        return build_config(raw, where=where), True
    task = {"type": manifest.task, "prompt": manifest.prompt_template}
    if manifest.labels:
        task.update(labels=list(manifest.labels), label_words=dict(manifest.label_words))
    return build_config({"base": manifest.base_model, "task": task,
                         "lora": {"for_serving": False}}, where=where), False


def _fields(cfg: TrainConfig) -> str:
    import string

    names = {f for _, f, _, _ in string.Formatter().parse(cfg.task.prompt) if f}
    names.add(cfg.task.label_field if cfg.task.type == "classification"
              else cfg.task.target_field)
    return ", ".join(sorted(names))


def adapter_probabilities(adapter_dir: str | Path, texts: list[str]) -> list[dict[str, float]]:
    """The trainer's label probabilities for `texts` with the classification adapter in
    `adapter_dir` (its manifest's prompt, label scoring and temperature, the float base): what
    /v1/classify must answer for them. The text fills the prompt template's first field."""
    from lorastack.adapters import labels as label_scoring
    from lorastack.adapters.files import read_adapter
    from lorastack.train import evaluate as ev
    from lorastack.train.examples import IGNORE, Example

    adapter = read_adapter(Path(adapter_dir))
    manifest = adapter.manifest
    cfg, _ = config_from_manifest(manifest)
    base = resolve_base(manifest.base_model, fetch=False)
    model, fmt = _load_model(cfg, base.path, list(manifest.labels), adapter.path, manifest)
    field = (label_scoring.template_fields(manifest.prompt_template) or ["text"])[0]
    examples = []
    for i, text in enumerate(texts):
        ids = fmt.prompt_ids({field: text})
        examples.append(Example(ids, [IGNORE] * len(ids), i, label=0, prompt_len=len(ids)))
    return ev.evaluate_classification(model, fmt, examples, temperature=manifest.temperature,
                                      bias=manifest.label_bias)[1]
