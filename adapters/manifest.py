"""The adapter manifest (manifest.json), the errors of the adapter contract, and what vLLM serves.

An adapter directory holds PEFT's two files unchanged plus `manifest.json`, which says what the
adapter is for (task, prompt template, labels), what it was trained on (base model fingerprint,
data fingerprint, training config) and how well it did (metrics). `AdapterManifest` is that file
as a typed, validated dataclass; `FORMAT_VERSION` is bumped when a field changes meaning or a
required field is added (readers ignore unknown extra fields, so adding an optional one does not).

Stdlib only: this module is imported by the CLI, the trainer and the server, and must stay fast.
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
TASKS = ("classification", "generation")
NAME_MAX_LEN = 64
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


# -- errors ------------------------------------------------------------------------------------

class AdapterError(ValueError):
    """An adapter could not be written, read or served; the message names it, the file and the fix.

    `problem`, `adapter`, `file` and `fix` are kept as attributes so that callers (the server's
    HTTP errors, the CLI) can present them separately.
    """

    def __init__(self, problem: str, adapter: str | None = None, file: str | Path | None = None,
                 fix: str | None = None) -> None:
        self.problem, self.adapter, self.fix = problem, adapter, fix
        self.file = str(file) if file is not None else None
        where = f"adapter {adapter!r}" if adapter else "adapter"
        if self.file:
            where += f" ({self.file})"
        super().__init__(f"{where}: {problem}" + (f". Fix: {fix}" if fix else ""))

    def __reduce__(self):  # keep the fields when the error crosses a process boundary
        return (type(self), (self.problem, self.adapter, self.file, self.fix))

    def located(self, adapter: str | None, file: str | Path | None,
                fix: str | None = None) -> AdapterError:
        """The same error with the adapter, file and fix filled in where they were missing."""
        return type(self)(self.problem, self.adapter or adapter, self.file or file,
                          self.fix or fix)


class InvalidNameError(AdapterError):
    """The name is not a plain adapter name (see `check_name`)."""


class AdapterNotFoundError(AdapterError):
    """No adapter of that name in the store; the message lists the available names."""


class AdapterExistsError(AdapterError):
    """An adapter of that name exists and replacing it was not asked for."""


class ManifestError(AdapterError):
    """manifest.json or adapter_config.json is missing, does not parse, or has a bad field."""


class UnknownFormatVersionError(ManifestError):
    """manifest.json was written by a lorastack whose format this one does not know."""


class MissingFileError(AdapterError):
    """A file the adapter directory must hold is not there."""


class UnsafeWeightsError(AdapterError):
    """The weights are pickle (never loaded) or not a well-formed safetensors file."""


class BaseMismatchError(AdapterError):
    """The adapter was trained on other base weights than the base model at hand."""


class NotServableError(AdapterError):
    """The adapter uses something the serving engine cannot load (rank, modules, DoRA, ...)."""


# -- names ---------------------------------------------------------------------------------------

def check_name(name: str) -> str:
    """Return `name` if it is a plain adapter name, else raise InvalidNameError.

    Plain: 1 to 64 characters from [A-Za-z0-9._-], starting with a letter or digit. So no path
    separators, no `..`-only names, nothing hidden (the store keeps its temporary entries hidden),
    and the name is usable as-is as a directory, an OpenAI `model` value and a URL segment.
    """
    fix = (f"use 1 to {NAME_MAX_LEN} characters from A-Z a-z 0-9 . _ -, starting with a letter "
           f"or digit (e.g. reviews-sentiment)")
    if not isinstance(name, str) or not name:
        raise InvalidNameError("the name is empty", None, None, fix)
    if len(name) > NAME_MAX_LEN:
        raise InvalidNameError(f"the name is {len(name)} characters long (at most "
                               f"{NAME_MAX_LEN})", name[:NAME_MAX_LEN] + "...", None, fix)
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidNameError("the name is not plain (path separators, '..', spaces or other "
                               "characters outside A-Z a-z 0-9 . _ -)", name, None, fix)
    return name


# -- the manifest ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraSettings:
    """The LoRA hyperparameters, copied from adapter_config.json for display and checks."""

    rank: int
    """r: width of the low-rank update; vLLM's default max_lora_rank is 16."""
    alpha: float
    """lora_alpha: the update is scaled by alpha / rank (alpha / sqrt(rank) with rsLoRA)."""
    target_modules: tuple[str, ...]
    """Module names (suffixes) that carry a LoRA update, e.g. ("q_proj", "v_proj")."""
    dropout: float = 0.0
    """lora_dropout used in training (no effect at inference), in [0, 1)."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA). vLLM cannot serve it; kept so the check can refuse it."""
    use_rslora: bool = False
    """rsLoRA scaling alpha / sqrt(rank); vLLM applies it too."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not _is_int(self.rank) or self.rank <= 0:
            raise ManifestError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise ManifestError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ManifestError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(
                isinstance(m, str) and m for m in self.target_modules):
            raise ManifestError(f"lora.target_modules must be a non-empty list of module names, "
                                f"got {list(self.target_modules)!r}")
        for flag in ("use_dora", "use_rslora"):
            if not isinstance(getattr(self, flag), bool):
                raise ManifestError(f"lora.{flag} must be true or false")


@dataclass(frozen=True)
class Metrics:
    """Evaluation results by split; names as the trainer reports them (accuracy, macro_f1, ...)."""

    validation: dict[str, float] = field(default_factory=dict)
    """Metrics on the validation split (the one used to pick the checkpoint)."""
    test: dict[str, float] = field(default_factory=dict)
    """Metrics on the held-out test split, when there is one."""

    def __post_init__(self) -> None:
        for split in ("validation", "test"):
            values = getattr(self, split)
            if not isinstance(values, dict) or not all(
                    isinstance(k, str) and _is_number(v) for k, v in values.items()):
                raise ManifestError(f"metrics.{split} must map metric names to numbers, "
                                    f"got {values!r}")


KEY_METRICS = ("accuracy", "macro_f1", "f1", "exact_match", "token_f1", "loss")


@dataclass(frozen=True)
class AdapterManifest:
    """manifest.json: what an adapter is for, what it was trained on and how well it does."""

    name: str
    """The adapter's name in the store; equal to its directory name (see check_name)."""
    task: str
    """"classification" (answers one of `labels`, scored not sampled) or "generation"."""
    base_model: str
    """The base model as named when training: a catalog alias, hub id or directory."""
    base_fingerprint: str
    """"sha256:<hex>" over the base weights; the server refuses an adapter whose base differs."""
    lora: LoraSettings
    """LoRA hyperparameters (mirrors adapter_config.json)."""
    prompt_template: str = "{text}"
    """str.format template over a record's fields that builds the prompt, e.g.
    "Review: {text}\\nSentiment:". Classification scores each label as its continuation."""
    labels: tuple[str, ...] = ()
    """Classification: the label set, in a fixed order (at least two). Generation: empty."""
    label_words: dict[str, str] = field(default_factory=dict)
    """Optional label -> the text the model emits for it (default: the label itself)."""
    examples: tuple[str, ...] = ()
    """A few inputs from the validation data (their text field), to try the adapter with: the
    server lists them on its model card, the page offers them one click away."""
    chat_format: str = "{input}"
    """The base model's chat template rendered around the slot `{input}` (system message
    included): the full prompt is this text with `{input}` replaced by the filled
    prompt_template. It lets the server rebuild the trainer's exact prompt without a tokenizer
    or a template engine. "{input}" alone means a raw prompt."""
    end_of_turn: str = ""
    """Text that ends an answer (the chat template's end-of-turn token, e.g. <|im_end|>)."""
    score_end_of_turn: bool = False
    """Classification: whether a label's scored continuation is its word plus end_of_turn
    (needed when one label word's tokens are a prefix of another's), or the word alone."""
    metrics: Metrics = field(default_factory=Metrics)
    """Evaluation results (validation and test)."""
    training: dict[str, Any] = field(default_factory=dict)
    """The training configuration as run (JSON-able), to reproduce or compare runs."""
    data_fingerprint: str = ""
    """"sha256:<hex>" over the training records, or "" when unknown (imported adapters)."""
    versions: dict[str, str] = field(default_factory=dict)
    """Library versions at training time (lorastack, torch, transformers, peft, ...)."""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(
        timespec="seconds"))
    """When the adapter was written, ISO 8601 with a UTC offset."""
    format_version: int = FORMAT_VERSION
    """Version of this file's format; readers refuse versions they do not know."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "examples", tuple(self.examples))
        if not all(isinstance(e, str) for e in self.examples):
            raise ManifestError("examples must be a list of strings")
        check_name(self.name)
        if self.format_version != FORMAT_VERSION:
            raise UnknownFormatVersionError(
                f"format_version {self.format_version!r} is not one this lorastack reads "
                f"({FORMAT_VERSION})",
                fix="upgrade lorastack to the version that wrote the adapter, or re-export it")
        if self.task not in TASKS:
            raise ManifestError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ManifestError("base_model is empty")
        if not _FINGERPRINT.fullmatch(str(self.base_fingerprint)):
            raise ManifestError(f"base_fingerprint must be 'sha256:' and 64 hex digits, got "
                                f"{self.base_fingerprint!r}")
        if self.data_fingerprint and not _FINGERPRINT.fullmatch(str(self.data_fingerprint)):
            raise ManifestError(f"data_fingerprint must be '' or 'sha256:' and 64 hex digits, "
                                f"got {self.data_fingerprint!r}")
        if not isinstance(self.lora, LoraSettings) or not isinstance(self.metrics, Metrics):
            raise ManifestError("lora and metrics must be LoraSettings and Metrics")
        self._check_template()
        self._check_labels()
        for key in ("training", "versions"):
            if not isinstance(getattr(self, key), dict):
                raise ManifestError(f"{key} must be a JSON object")
        try:
            datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            raise ManifestError(f"created_at must be an ISO 8601 time, got "
                                f"{self.created_at!r}") from None

    def _check_template(self) -> None:
        if not isinstance(self.prompt_template, str):
            raise ManifestError("prompt_template must be a string")
        if not isinstance(self.chat_format, str) or self.chat_format.count("{input}") != 1:
            raise ManifestError(f"chat_format must contain the slot {{input}} exactly once, got "
                                f"{self.chat_format!r}")
        if not isinstance(self.end_of_turn, str) or not isinstance(self.score_end_of_turn, bool):
            raise ManifestError("end_of_turn must be a string and score_end_of_turn a boolean")
        try:
            fields_used = [f for _, f, _, _ in string.Formatter().parse(self.prompt_template)
                           if f is not None]
        except ValueError as exc:
            raise ManifestError(f"prompt_template is not a valid str.format template ({exc}): "
                                f"{self.prompt_template!r}", fix="escape literal braces as "
                                "{{ and }}") from None
        if self.task == "classification" and not any(fields_used):
            raise ManifestError(f"a classification prompt_template must use a record field "
                                f"such as {{text}}, got {self.prompt_template!r}")

    def _check_labels(self) -> None:
        labels = self.labels
        if self.task == "generation":
            if labels or self.label_words:
                raise ManifestError("a generation adapter has no labels or label_words")
            return
        if len(labels) < 2 or not all(isinstance(lab, str) and lab for lab in labels):
            raise ManifestError(f"a classification adapter needs at least two non-empty "
                                f"labels, got {list(labels)!r}")
        if len(set(labels)) != len(labels):
            raise ManifestError(f"labels repeat: {list(labels)!r}")
        words = self.label_words
        if not isinstance(words, dict) or set(words) - set(labels):
            raise ManifestError(f"label_words keys must be labels ({list(labels)!r}), got "
                                f"{words!r}")
        emitted = [self.label_word(lab) for lab in labels]
        if not all(isinstance(w, str) and w for w in emitted) or len(set(emitted)) != len(labels):
            raise ManifestError(f"label words must be non-empty and distinct (they are what "
                                f"gets scored), got {emitted!r}")

    def label_word(self, label: str) -> str:
        """The text the model emits for `label`."""
        return self.label_words.get(label, label)

    def key_metric(self) -> tuple[str, str, float] | None:
        """(split, metric, value) worth showing in a listing: test before validation."""
        for split, values in (("test", self.metrics.test), ("validation",
                                                             self.metrics.validation)):
            for name in KEY_METRICS:
                if name in values:
                    return split, name, values[name]
            if values:
                name = min(values)
                return split, name, values[name]
        return None

    # -- (de)serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["examples"] = list(self.examples)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> AdapterManifest:
        """Build from parsed JSON; raises ManifestError naming the bad field."""
        if not isinstance(data, dict):
            raise ManifestError(f"the manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            newer = _is_int(version) and version > FORMAT_VERSION
            raise UnknownFormatVersionError(
                f"format_version {version!r} is unknown (this lorastack reads {FORMAT_VERSION})",
                fix="upgrade lorastack (the adapter was written by a newer one)" if newer else
                "re-export the adapter with `lorastack adapters import` or retrain it")
        missing = [k for k in ("name", "task", "base_model", "base_fingerprint", "lora")
                   if k not in data]
        if missing:
            raise ManifestError(f"missing field(s) {', '.join(missing)}")
        try:
            lora = LoraSettings(**_known(data["lora"], LoraSettings, "lora"))
            metrics = Metrics(**_known(data.get("metrics", {}), Metrics, "metrics"))
            top = _known(data, cls, "manifest")
            return cls(**{**top, "lora": lora, "metrics": metrics})
        except TypeError as exc:  # a missing nested field, e.g. lora.rank
            raise ManifestError(f"a field is missing or misnamed: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> AdapterManifest:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"not valid JSON ({exc})") from None
        return cls.from_dict(data)


def _known(data: Any, cls: type, where: str) -> dict[str, Any]:
    """The keys of `data` that are fields of `cls` (unknown keys come from newer writers)."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where} must be a JSON object, got {type(data).__name__}")
    names = cls.__dataclass_fields__
    return {k: v for k, v in data.items() if k in names}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and not (isinstance(value, float) and math.isinf(value)))


# -- what the serving engine can load ------------------------------------------------------

# The module suffixes vLLM can put LoRA on in Llama-architecture models (SmolLM2 is one). vLLM
# fuses q/k/v into qkv_proj and gate/up into gate_up_proj and maps PEFT's names onto those
# (LlamaForCausalLM.packed_modules_mapping in vllm 0.32). embed_tokens and lm_head are listed
# there as embedding_modules too, but lorastack neither trains nor serves embedding LoRA.
LLAMA_TARGET_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})

# PEFT init schemes that only set the initial weights, so the saved adapter is a plain LoRA.
# Others (pissa, olora, corda, loftq) modify the base weights: vLLM refuses them.
_PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}


@dataclass(frozen=True)
class ServingLimits:
    """What the serving engine accepts. Defaults match vLLM 0.32 serving a Llama-style model.

    What vLLM 0.32 checks, read in vllm/lora/peft_helper.py (PEFTHelper._validate_features,
    validate_legal) and lora_model.py (from_local_checkpoint):
    - rank: refused above LoRAConfig.max_lora_rank (default 16; one of 1, 8, 16, 32, 64, 128,
      256, 320, 512), counting rank_pattern overrides.
    - use_rslora: supported (scaling alpha / sqrt(r)).
    - use_dora: refused ("vLLM does not yet support DoRA").
    - modules_to_save: refused except ["classifier", "score"] on classification-head models;
      lorastack serves causal LMs, so any modules_to_save is refused.
    - bias != "none", lora_bias, aLoRA, layer_replication, BD-LoRA, QALoRA and inits that change
      the base weights (pissa, olora, corda, loftq): refused.
    - target modules: every LoRA tensor must sit on a module the model supports.
    """

    max_rank: int = 16
    """The server's max LoRA rank (vLLM --max-lora-rank)."""
    target_modules: frozenset[str] = LLAMA_TARGET_MODULES
    """Module suffixes the engine can carry LoRA on for the served base model."""


def check_servable(adapter: Any, limits: ServingLimits | None = None,
                   config: dict[str, Any] | None = None) -> None:
    """Raise NotServableError listing every reason the engine would refuse `adapter`.

    `adapter` is an AdapterManifest or a loaded Adapter (anything with `.manifest`; its
    `.config`, the adapter_config.json that vLLM itself reads, is then checked too).
    """
    limits = limits or ServingLimits()
    manifest: AdapterManifest = getattr(adapter, "manifest", adapter)
    if config is None:
        config = getattr(adapter, "config", None)
    path = getattr(adapter, "path", None)
    file = (Path(path) / "adapter_config.json" if config is not None else
            Path(path) / "manifest.json") if path else None
    config = config or {}
    reasons: list[tuple[str, str]] = []  # (problem, fix)

    ranks = [manifest.lora.rank, config.get("r") or 0,
             *(v for v in (config.get("rank_pattern") or {}).values() if _is_int(v))]
    rank = max(r for r in ranks if _is_int(r))
    if rank > limits.max_rank:
        reasons.append((f"rank {rank} is above the server's limit {limits.max_rank}",
                        (f"retrain with rank <= {limits.max_rank}, or serve with a max LoRA "
                         f"rank of at least {rank}")))
    targets = set(manifest.lora.target_modules)
    if isinstance(config.get("target_modules"), list):
        targets |= set(config["target_modules"])
    # peft writes full paths (model.layers.3.self_attn.q_proj) when layers are chosen; vLLM
    # matches module suffixes, so compare those.
    targets = {t.rsplit(".", 1)[-1] for t in targets}
    unknown = sorted(targets - limits.target_modules)
    if unknown:
        reasons.append(((f"target modules {unknown} cannot be served (the engine supports "
                         f"{sorted(limits.target_modules)})"),
                        "retrain with target_modules among those"))
    if manifest.lora.use_dora or config.get("use_dora"):
        reasons.append(("it is a DoRA adapter (use_dora), which vLLM cannot serve",
                        "retrain with use_dora off"))
    if config.get("modules_to_save"):
        reasons.append(((f"modules_to_save {config['modules_to_save']} (fully trained extra "
                         f"modules) cannot be served by vLLM"), "retrain without modules_to_save"))
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        reasons.append(("it trains biases (bias / lora_bias), which vLLM cannot serve",
                        "retrain with bias='none' and lora_bias off"))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        reasons.append(((f"init_lora_weights={init!r} changes the base weights, which vLLM "
                         f"does not do"), "convert it to a plain LoRA with PEFT first"))
    for key, what in (("alora_invocation_tokens", "aLoRA"), ("layer_replication",
                      "layer_replication"), ("use_bdlora", "BD-LoRA"), ("use_qalora", "QALoRA")):
        if config.get(key):
            reasons.append((f"it uses {what}, which vLLM cannot serve", f"retrain without {key}"))
    if reasons:
        raise NotServableError("; ".join(p for p, _ in reasons), manifest.name, file,
                               "; ".join(dict.fromkeys(f for _, f in reasons)))
