"""TrainConfig: every setting of a training run, with its meaning and sensible range beside it.

A config is a YAML file (see train/configs/), overridable with `--set section.key=value`.
Everything here is checked when the config is built, before any model is loaded: a wrong value
names the field and what is allowed. What depends on the base model (lora.layers in range,
lora.target_modules that exist and vLLM serves) is checked by train/base_check.py as soon as
the base is resolved, from its config alone, still before its weights load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lorastack.adapters.manifest import (
    AdapterName,
    ServingLimits,
    unservable_lora,
)
from lorastack.adapters.validation import explain_errors
from lorastack.train.search import SearchConfig

CONFIGS_DIR = Path(__file__).parent / "configs"
# What each task's validation evaluation reports (train/evaluate.py), the first its default:
# the metrics training.early_stopping_metric may select on.
SELECTION_METRICS = {"classification": ("macro_f1", "accuracy", "loss"),
                     "generation": ("exact_match", "token_f1", "loss")}


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the allowed values."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_assignment=True)


class DataConfig(_Section):
    source: str = "drug-reviews"
    """Catalog dataset name (`lorastack data list`) or a CSV/TSV/JSONL/JSON/Parquet file."""
    validation: str | None = None
    """A file of validation records; when unset, carved from train (see validation_fraction)."""
    test: str | None = None
    """A file of test records; for a catalog dataset its official test split is used."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Field name used by the task -> column name in the file, e.g. {text: review_body}."""
    validation_fraction: float = Field(0.15, ge=0.0, lt=0.9)
    """Share of train carved out as validation (stratified by label), 0.1-0.2 is typical."""
    split_seed: int = 0
    """Seed of that carving. Separate from training.seed, so that runs (and search trials or
    ensemble members) with different training seeds are compared on the same validation set."""
    max_length: int = Field(384, ge=16, le=32768)
    """Tokens per example, prompt + answer. Longer examples have their text field cut."""
    text_field: str = "text"
    """The field shortened when an example is over max_length."""
    limit_train: int | None = Field(None, ge=1)
    """Use only the first N training records (quick runs, tests)."""
    limit_eval: int | None = Field(None, ge=1)
    """Use only the first N validation and test records (quick runs, tests)."""
    augment: Literal["none", "word_dropout"] = "none"
    """Classification only: randomly drop words of the text field in training examples."""
    augment_prob: float = Field(0.1, ge=0.0, le=0.5)
    """Share of words dropped when augment is word_dropout."""


class TaskConfig(_Section):
    type: Literal["classification", "generation"] = "classification"
    """classification: answer one of a label set; generation: answer free text."""
    prompt: str = "{text}"
    """User message, a format string over the record's fields, e.g. 'Review: {text}'."""
    system: str | None = None
    """System message; None keeps the base model's default one. A chat template without a
    system role gets it folded into the first user turn; the plain format puts it first."""
    format: Literal["auto", "chat", "plain"] = "auto"
    """Prompt format: chat (the tokenizer's chat template), plain (prompt, answer, EOS: for
    base models without a template), or auto (chat when the tokenizer has a template). The
    manifest records the one used, so the server renders exactly what was trained."""
    label_field: str = "label"
    """classification: the record field holding the label."""
    labels: list[str] | None = None
    """classification: the label set, in order; read from the training data when unset."""
    label_words: dict[str, str] = Field(default_factory=dict)
    """classification: text the model answers for a label, when it differs from the label."""
    balance: Literal["none", "weights", "sampling"] = "weights"
    """classification imbalance: inverse-frequency loss weights, balanced sampling, or none."""
    calibrate: bool = True
    """classification: fit a temperature on validation after training (temperature scaling,
    train/calibration.py), stored in the manifest and applied wherever probabilities are made;
    accuracy and F1 do not change, the probabilities become trustworthy."""
    label_bias: Literal["none", "macro_f1"] = "none"
    """classification: "macro_f1" fits one offset per label on validation, added to its score
    before the temperature (a shift of the labels' prior, train/calibration.py), to maximise
    validation macro-F1: a rare class the model under-predicts is found more often, at some
    accuracy. Stored in the manifest and applied wherever probabilities are made."""
    class_weight_power: float = Field(1.0, ge=0.0, le=2.0)
    """With balance=weights: weight = (1/frequency)^power; 1 balances the classes fully,
    0.5 is a softer middle that costs the majority class less accuracy, 0 is no weighting."""
    target_field: str = "answer"
    """generation: the record field holding the answer (records without one are dropped)."""
    messages_field: str | None = None
    """generation: a field of chat messages [{role, content}, ...]; the last must be the
    assistant's answer. Overrides prompt/target_field when set."""
    max_new_tokens: int = Field(32, ge=1, le=4096)
    """generation: tokens generated per validation example during evaluation."""


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=512)
    """Rank of the update matrices; 8-32 is typical. Serving caps it (see serving_rank)."""
    alpha: float = Field(32.0, gt=0)
    """Scale numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input; 0-0.1."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt; all-linear is every linear layer but the output head."""
    layers: list[int] | None = None
    """Indices of the transformer layers to adapt; None adapts all, the rest stay frozen."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA). vLLM cannot serve it: needs for_serving: false."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r), better for high ranks."""
    init: Literal["default", "pissa"] = "default"
    """default: A random, B zero (the update starts at 0). pissa: A and B start from the
    weights' top-r singular vectors and the base keeps the residual (peft's PiSSA); the store
    gets it converted back to a plain LoRA on the untouched base, of rank 2r. Float bases only
    (quantization: none). LoftQ is not offered: its adapter only fits a base rewritten by it."""
    for_serving: bool = True
    """Refuse settings the serving layer cannot load (rank, modules, DoRA)."""
    serving_rank: int = Field(ServingLimits.max_rank, ge=1)
    """The server's max LoRA rank (vLLM --max-lora-rank) that r must not exceed."""

    @field_validator("layers")
    @classmethod
    def _layer_indices(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (not layers or min(layers) < 0):
            raise ValueError("list layer indices from 0 (the bottom layer), or null for all "
                             "layers")
        return layers


class TrainingConfig(_Section):
    lr: float = Field(2e-4, gt=0, le=1.0)
    """Peak learning rate; 1e-4-5e-4 for LoRA."""
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = Field(0.05, ge=0.0, le=0.5)
    """Share of the steps spent warming up linearly from 0."""
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    """AdamW weight decay on the LoRA weights."""
    loraplus_lr_ratio: float | None = Field(None, ge=1.0, le=256.0)
    """LoRA+: the B matrices learn at lr x this ratio (the paper suggests 16), through peft's
    create_loraplus_optimizer; None: one learning rate for A and B."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping norm; None disables it."""
    batch_size: int | Literal["auto"] = 8
    """Examples per forward pass. auto: the largest the memory plan (`lorastack plan`) fits in
    memory_budget. A number that does not fit the budget is split into smaller forward passes
    with more grad_accum, so the effective batch stays the same."""
    grad_accum: int = Field(1, ge=1, le=1024)
    """Forward passes per optimizer step (effective batch = batch_size * grad_accum)."""
    memory_budget: str | None = None
    """Memory the run may use, checked by the memory plan before the model loads: "12GB",
    "800MiB", or a share of the device such as 0.8. None: 90% of the device when batch_size
    is auto, otherwise no check. Where it must, the run switches on gradient checkpointing,
    then a quantized base, and says so."""
    epochs: float = Field(1.0, gt=0, le=1000)
    """Passes over the training data (fractional allowed); max_steps wins when set."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    eval_every: int = Field(50, ge=1)
    """Evaluate on validation every N optimizer steps (and at the end)."""
    save_every: int = Field(50, ge=1)
    """Write a resumable checkpoint every N optimizer steps."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many step checkpoints to keep on disk (the best one is kept separately)."""
    early_stopping_metric: str | None = None
    """Validation metric to select and early-stop on, e.g. macro_f1, accuracy, loss,
    exact_match. None: the task's default (macro_f1 / exact_match)."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without improvement; None never stops early."""
    watch_train_sample: int = Field(64, ge=0)
    """Overfitting watch: this many training examples (a fixed sample) are evaluated at every
    evaluation exactly as validation is (same loss definition, same task metric), logged as
    train_sample/*, drawn beside validation in training.png, and a warning is printed when
    their gap widens while validation stops improving. 0 turns it off."""
    group_by_length: bool = True
    """Batch examples of similar length together (measured: far less padding)."""
    cache_frozen_layers: bool = False
    """When LoRA adapts only the top layers: run the frozen layers below them once over the
    training examples and start every step from their kept output (train/frozen.py; memory:
    one float per training token and hidden unit, a row of `lorastack plan` on CPU)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in backward to save memory; None: on for 4bit, off otherwise."""
    seed: int = 0
    """Seed for data order, LoRA init and dropout."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for torch; None uses torch's default (all cores)."""
    fsdp: bool = False
    """With several processes (--nproc): shard the frozen base's weights over them (FSDP2,
    each decoder layer a unit), so that each holds 1/N of them between forward passes; the
    LoRA weights stay whole on every process. Trains what data parallelism trains. 4/8-bit
    bases need CUDA (bitsandbytes' weights are not sharded on CPU)."""

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        if value == "auto":
            return value
        whole = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and value.strip().isdigit())
        if whole and 1 <= int(value) <= 4096:
            return int(value)
        raise ValueError(f"{value!r} is not a batch size: give a whole number from 1 to 4096, "
                         "or auto (the largest that fits training.memory_budget)")

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _memory_budget(cls, value):
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # YAML and --set read a share such as 0.8 as a number
        if isinstance(value, str):
            parse_memory(value)  # raises with the forms it takes
        return value


def served_rank(lora: LoraConfig) -> int:
    """The rank the store and the server see: PiSSA's converted adapter has twice the rank."""
    return 2 * lora.r if lora.init == "pissa" else lora.r


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> tuple[str, float]:
    """"12GB" -> ("bytes", 12e9); "0.8" -> ("share", 0.8) of the device's memory."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m and not unit and 0 < float(m.group(1)) <= 1:
        return "share", float(m.group(1))
    if m and unit in _UNITS and float(m.group(1)) > 0:
        return "bytes", float(m.group(1)) * _UNITS[unit]
    raise ValueError(f"{text!r} is not a memory size: give a size such as 12GB, 24GiB or "
                     f"800MB, or a share of the device's memory between 0 and 1, such as 0.8")


class TrainConfig(_Section):
    name: AdapterName = "adapter"
    """Adapter name in the store (letters, digits, . _ -; at most 64; see check_name)."""
    base: str = "smollm2-135m"
    """Base model: catalog alias, hub id or local directory."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """Base weights: float (none), 8-bit, or 4-bit NF4 with double quantization (QLoRA)."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    store: str | None = None
    """Adapter store directory; None uses $LORASTACK_HOME/adapters."""
    runs_dir: str = "runs"
    """Where run directories (logs, checkpoints, plots) go: <runs_dir>/<name>."""
    replace: bool = True
    """Replace an adapter of the same name in the store."""
    evaluate_test: bool = True
    """Evaluate the final adapter on the test split and record it in the manifest."""
    search: SearchConfig | None = None
    """The hyperparameter space `lorastack tune` searches (train/search.py); training alone
    ignores it."""

    @model_validator(mode="after")
    def _servable(self) -> TrainConfig:
        lora = self.lora
        if not lora.for_serving:
            return self
        # the rule the server applies; the target modules depend on the base (base_check.py)
        served = served_rank(lora)
        bad = unservable_lora(served, [], lora.use_dora, ServingLimits(max_rank=lora.serving_rank))
        problems = []
        if "rank" in bad:
            problems.append(f"lora.r={lora.r}" + (f" (served as rank {served}: lora.init=pissa "
                                                   "doubles it)" if served != lora.r else "")
                            + f" is above the server's max rank {lora.serving_rank} "
                            f"(lora.serving_rank)")
        if "use_dora" in bad:
            problems.append("lora.use_dora=true: vLLM cannot serve DoRA adapters")
        if problems:
            raise ValueError("; ".join(problems) + ". Fix them, or set lora.for_serving=false "
                             "for an adapter not meant for serving.")
        return self

    @model_validator(mode="after")
    def _pissa_on_a_float_base(self) -> TrainConfig:
        if self.lora.init == "pissa" and (self.quantization != "none" or self.lora.use_dora):
            raise ValueError(
                "lora.init=pissa needs quantization: none and lora.use_dora: false (PiSSA "
                "rewrites the base weights as their residual; on a quantized base the served "
                "float base would not be the one trained on): set quantization: none, or "
                "lora.init: default")
        return self

    @model_validator(mode="after")
    def _task_fields(self) -> TrainConfig:
        from lorastack.adapters.manifest import ManifestError, check_task

        task = self.task
        if task.type == "classification" and task.labels is not None:
            unknown = set(task.label_words) - set(task.labels)
            if unknown:
                raise ValueError(f"task.label_words has labels not in task.labels: {unknown}")
        if not task.messages_field:  # the manifest's rules, now rather than after training
            try:
                check_task(task.type, task.prompt, task.labels, task.label_words)
            except ManifestError as exc:
                raise ValueError(f"task: {exc.problem}" + (f" ({exc.fix})" if exc.fix else "")
                                 ) from None
        if self.data.augment != "none" and self.task.type != "classification":
            raise ValueError("data.augment is for classification tasks only")
        return self

    @model_validator(mode="after")
    def _metric_exists(self) -> TrainConfig:
        allowed = SELECTION_METRICS[self.task.type]
        for where, metric in (("training.early_stopping_metric",
                               self.training.early_stopping_metric),
                              ("search.metric", self.search.metric if self.search else None)):
            if metric is not None and metric not in allowed:
                raise ValueError(f"{where}={metric!r} is not a validation metric of a "
                                 f"{self.task.type} task: use one of {', '.join(allowed)}, or "
                                 f"null for {allowed[0]}")
        return self

    @property
    def selection_metric(self) -> str:
        return self.training.early_stopping_metric or SELECTION_METRICS[self.task.type][0]


LOWER_IS_BETTER = frozenset({"loss"})  # metrics where less is better (the rest: more)


def load_config(source: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Build a TrainConfig from a YAML path or a shipped config name, plus `key=value` overrides.

    Values in overrides are parsed as YAML (`training.lr=1e-4`, `lora.layers=[0,1]`).
    """
    path = resolve_config_path(source)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    for item in overrides or []:
        _apply_override(raw, item)
    return build_config(raw, where=str(path))


def build_config(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: " + _explain(exc)) from None


def resolve_config_path(source: str | Path) -> Path:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    shipped = CONFIGS_DIR / f"{source}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"no config {source!r}: give a YAML file or one of the shipped configs "
                      f"({', '.join(shipped_configs())})")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. training.lr=1e-4")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc


def _explain(exc: ValidationError) -> str:
    return explain_errors(exc.errors(), TrainConfig,
                          unknown="unknown setting (check the spelling; see train/config.py)")
