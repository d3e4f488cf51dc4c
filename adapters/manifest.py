"""The adapter manifest (manifest.json), the errors of the adapter contract, and what vLLM serves.

An adapter directory holds PEFT's two files unchanged plus `manifest.json`, which says what the
adapter is for (task, prompt template, labels), what it was trained on (base model fingerprint,
data fingerprint, training config) and how well it did (metrics). `AdapterManifest` is that file
as a frozen pydantic model, checked when built; `FORMAT_VERSION` is bumped when a field changes
meaning or a required field is added (readers ignore unknown extra fields, so adding an optional
one does not). A bad field raises ManifestError naming it, never pydantic's ValidationError.

Light (stdlib and pydantic): this module is imported by the CLI, the trainer and the server.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)

from lorastack.adapters import labels as label_scoring
from lorastack.adapters.fsutil import utc_now
from lorastack.adapters.validation import explain_errors

FORMAT_VERSION = 1
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

def check_task(task: str, prompt_template: str, labels: Sequence[str] | None = None,
               label_words: Mapping[str, str] | None = None) -> None:
    """The rules a task's prompt and labels follow: what a manifest must hold, and what the
    trainer's config is checked against before training (train/config.py; labels found in the
    data, when the config lists none, once they are read). Raises ManifestError."""
    try:
        fields_used = [f for _, f, _, _ in string.Formatter().parse(prompt_template)
                       if f is not None]
    except ValueError as exc:
        raise ManifestError(f"prompt_template is not a valid str.format template ({exc}): "
                            f"{prompt_template!r}", fix="escape literal braces as {{ and }}") \
            from None
    if task == "classification" and not any(fields_used):
        raise ManifestError(f"a classification prompt_template must use a record field such "
                            f"as {{text}}, got {prompt_template!r}")
    if task != "classification" or labels is None:
        return
    words = dict(label_words or {})
    if len(labels) < 2 or not all(labels):
        raise ManifestError(f"a classification adapter needs at least two non-empty labels, "
                            f"got {list(labels)!r}")
    if len(set(labels)) != len(labels):
        raise ManifestError(f"labels repeat: {list(labels)!r}")
    if set(words) - set(labels):
        raise ManifestError(f"label_words keys must be labels ({list(labels)!r}), got {words!r}")
    emitted = [words.get(lab, lab) for lab in labels]
    if not all(emitted) or len(set(emitted)) != len(labels):
        raise ManifestError(f"label words must be non-empty and distinct (they are what gets "
                            f"scored), got {emitted!r}")


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


AdapterName = Annotated[str, AfterValidator(check_name)]  # the name rule as a field's type


# -- the manifest ------------------------------------------------------------------------------

def _rule(test: Callable[[Any], Any], words: str, before: bool = False) -> Any:
    """A field check: where `test(value)` is false or raises, the error reads "<field>: <words>
    (got <value>)" (see _manifest_error); `before`: on the raw value, before pydantic's own."""
    def check(value: Any) -> Any:
        with contextlib.suppress(TypeError, ValueError):
            if test(value):
                return value
        raise ValueError(words)
    return BeforeValidator(check) if before else AfterValidator(check)


Number = Annotated[float, Field(strict=True),  # strict: not a bool, not "1"
                   _rule(math.isfinite, "must be a finite number")]


def short_hash(fingerprint: str, digits: int = 12) -> str:
    """The first `digits` hex digits of a "sha256:<hex>" fingerprint or content hash."""
    return fingerprint.split(":", 1)[-1][:digits]


Fingerprint = Annotated[str, _rule(_FINGERPRINT.fullmatch, "must be 'sha256:' and 64 hex digits")]


class _Part(BaseModel):
    """A frozen, checked part of manifest.json; unknown keys (a newer writer's) are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", use_attribute_docstrings=True)
    _where: ClassVar[tuple[str, ...]] = ()  # how its fields are named in errors: lora.rank

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _manifest_error(exc, self._where) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, checked like a new one (pydantic's model_copy checks nothing)."""
        return type(self)(**{**dict(self), **changes})


class LoraSettings(_Part):
    """The LoRA hyperparameters, copied from adapter_config.json for display and checks."""

    _where = ("lora",)
    rank: Annotated[int, Field(strict=True, gt=0)]
    """r: width of the low-rank update; vLLM's default max_lora_rank is 16."""
    alpha: Annotated[Number, Field(gt=0)]
    """lora_alpha: the update is scaled by alpha / rank (alpha / sqrt(rank) with rsLoRA)."""
    target_modules: Annotated[tuple[str, ...], _rule(lambda names: names and all(names),
                                                     "must be a non-empty list of module names")]
    """Module names (suffixes) that carry a LoRA update, e.g. ("q_proj", "v_proj")."""
    dropout: Annotated[Number, Field(ge=0, lt=1)] = 0.0
    """lora_dropout used in training (no effect at inference), in [0, 1)."""
    use_dora: StrictBool = False
    """DoRA (weight-decomposed LoRA). vLLM cannot serve it; kept so the check can refuse it."""
    use_rslora: StrictBool = False
    """rsLoRA scaling alpha / sqrt(rank); vLLM applies it too."""


class Metrics(_Part):
    """Evaluation results by split; names as the trainer reports them (accuracy, macro_f1, ...)."""

    _where = ("metrics",)
    validation: dict[str, Number] = Field(default_factory=dict)
    """Metrics on the validation split (the one used to pick the checkpoint)."""
    test: dict[str, Number] = Field(default_factory=dict)
    """Metrics on the held-out test split, when there is one."""


KEY_METRICS = ("accuracy", "macro_f1", "f1", "exact_match", "token_f1", "loss")


class AdapterManifest(_Part):
    """manifest.json: what an adapter is for, what it was trained on and how well it does."""

    name: AdapterName
    """The adapter's name in the store; equal to its directory name (see check_name)."""
    task: Literal["classification", "generation"]
    """"classification" (answers one of `labels`, scored not sampled) or "generation"."""
    base_model: Annotated[str, Field(min_length=1)]
    """The base model as named when training: a catalog alias, hub id or directory."""
    base_fingerprint: Fingerprint
    """"sha256:<hex>" over the base weights; the server refuses an adapter whose base differs."""
    lora: LoraSettings
    """LoRA hyperparameters (mirrors adapter_config.json)."""
    prompt_template: str = "{text}"
    """str.format template over a record's fields that builds the prompt, e.g.
    "Review: {text}\\nSentiment:". Classification scores each label as its continuation."""
    labels: tuple[str, ...] = ()
    """Classification: the label set, in a fixed order (at least two). Generation: empty."""
    label_words: dict[str, str] = Field(default_factory=dict)
    """Optional label -> the text the model emits for it (default: the label itself)."""
    examples: Annotated[tuple[str, ...], _rule(lambda v: all(isinstance(e, str) for e in v),
                                               "must be a list of strings", before=True)] = ()
    """A few inputs from the validation data (their text field), to try the adapter with: the
    server lists them on its model card, the page offers them one click away."""
    chat_format: Annotated[str, _rule(lambda f: f.count("{input}") == 1,
                                      "must contain the slot {input} exactly once")] = "{input}"
    """The base model's chat template rendered around the slot `{input}` (system message
    included): the full prompt is this text with `{input}` replaced by the filled
    prompt_template. It lets the server rebuild the trainer's exact prompt without a tokenizer
    or a template engine. "{input}" alone means a raw prompt."""
    prompt_format: Literal["chat", "plain"] = "chat"
    """How chat_format was made: "chat" (the tokenizer's chat template) or "plain" (no
    template: the prompt as written, answers ended by EOS). For the record and model cards."""
    end_of_turn: str = ""
    """Text that ends an answer (the chat template's end-of-turn token, e.g. <|im_end|>)."""
    score_end_of_turn: StrictBool = False
    """Classification: whether a label's scored continuation is its word plus end_of_turn
    (needed when one label word's tokens are a prefix of another's), or the word alone."""
    temperature: Annotated[Number, Field(gt=0)] = 1.0
    """Classification: the label scores are divided by it before the softmax (temperature
    scaling, fitted on validation: train/calibration.py); 1 means uncalibrated."""
    label_bias: dict[str, Number] = Field(default_factory=dict)
    """Classification: added to a label's score before the temperature (a shift of the
    labels' prior, fitted on validation for macro-F1 when the config's task.label_bias asks
    for it: train/calibration.py); a label missing from it gets 0, and {} is none."""
    metrics: Metrics = Field(default_factory=Metrics)
    """Evaluation results (validation and test)."""
    training: dict[str, Any] = Field(default_factory=dict)
    """The training configuration as run (JSON-able), to reproduce or compare runs."""
    data_fingerprint: Annotated[str, _rule(lambda v: not v or _FINGERPRINT.fullmatch(v),
                                           "must be '' or 'sha256:' and 64 hex digits")] = ""
    """"sha256:<hex>" over the training records, or "" when unknown (imported adapters)."""
    versions: dict[str, str] = Field(default_factory=dict)
    """Library versions at training time (lorastack, torch, transformers, peft, ...)."""
    created_at: Annotated[str, _rule(datetime.fromisoformat, "must be an ISO 8601 time")] = Field(
        default_factory=utc_now)
    """When the adapter was written, ISO 8601 with a UTC offset."""
    format_version: int = FORMAT_VERSION
    """Version of this file's format; readers refuse versions they do not know."""

    @model_validator(mode="before")
    @classmethod
    def _known_format(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ManifestError(f"the manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise UnknownFormatVersionError(
                f"format_version {version!r} is unknown (this lorastack reads {FORMAT_VERSION})",
                fix="upgrade lorastack (the adapter was written by a newer one)" if newer else
                "re-export the adapter with `lorastack adapters import` or retrain it")
        return data

    @model_validator(mode="after")
    def _fits_task(self) -> AdapterManifest:
        labels = self.labels
        if self.task == "generation" and (labels or self.label_words or self.label_bias):
            raise ManifestError("a generation adapter has no labels, label_words or label_bias")
        check_task(self.task, self.prompt_template, labels, self.label_words)
        if set(self.label_bias) - set(labels):
            raise ManifestError(f"label_bias keys must be labels ({list(labels)!r}), got "
                                f"{self.label_bias!r}")
        return self

    def label_word(self, label: str) -> str:
        """The text the model emits for `label`."""
        return self.label_words.get(label, label)

    def probabilities(self, logprob_sums: dict[str, float]) -> dict[str, float]:
        """The labels' probabilities from their scores, under this adapter's calibration
        (label_bias, then temperature): what /v1/classify answers."""
        return label_scoring.probabilities(logprob_sums, self.temperature, self.label_bias)

    def key_metric(self) -> tuple[str, str, float] | None:
        """(split, metric, value) worth showing in a listing: test before validation."""
        for split in ("test", "validation"):
            values = getattr(self.metrics, split)
            name = next((n for n in KEY_METRICS if n in values), min(values, default=None))
            if name is not None:
                return split, name, values[name]
        return None

    # -- (de)serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        # fields added after format 1 are written only when not at their default (which every
        # manifest written before them has), so older manifests round-trip byte for byte
        later = {"prompt_format": "chat", "temperature": 1.0, "label_bias": {}}
        return self.model_dump(mode="json", exclude={k for k, v in later.items()
                                                     if getattr(self, k) == v} or None)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> AdapterManifest:
        """Build from parsed JSON (format_version required); a bad field raises ManifestError."""
        if isinstance(data, dict):
            data = {"format_version": None, **data}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _manifest_error(exc, ()) from None

    @classmethod
    def from_json(cls, text: str) -> AdapterManifest:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"not valid JSON ({exc})") from None
        return cls.from_dict(data)


def _manifest_error(exc: ValidationError, where: tuple[str, ...]) -> AdapterError:
    """pydantic's errors as one ManifestError, `field: what is wrong; ...` as the trainer's
    config and the gateway word theirs; where one of ours was raised, that one itself."""
    errors: list[dict[str, Any]] = [{**e, "loc": (*where, *e["loc"])} for e in exc.errors()]
    causes = [(err.get("ctx") or {}).get("error") for err in errors]
    ours = [cause for cause in causes if isinstance(cause, AdapterError)]  # nested parts' too
    if len(errors) == 1 and ours:
        return ours[0]  # with its own fix and type (InvalidNameError, ...)
    theirs = [err for err, cause in zip(errors, causes) if not isinstance(cause, AdapterError)]
    problems = [c.problem for c in ours] + [explain_errors(theirs, AdapterManifest)] * bool(theirs)
    return ManifestError("; ".join(problems),
                         fix="; ".join(dict.fromkeys(c.fix for c in ours if c.fix)) or None)


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
    """The server's max LoRA rank (vLLM --max-lora-rank; 16 is vLLM's default)."""
    target_modules: frozenset[str] | None = LLAMA_TARGET_MODULES
    """Module suffixes the engine can carry LoRA on for the served base model (the gateway asks
    vLLM's model class, adapters/engine_lora.py); None: not known here, the engine decides."""


def unservable_lora(rank: int, target_modules: Iterable[str], use_dora: bool,
                    limits: ServingLimits | None = None) -> dict[str, Any]:
    """{setting: what is wrong} for the LoRA settings the engine cannot serve: "rank" (the
    rank), "target_modules" (the suffixes it lacks, sorted), "use_dora" (True). The one rule:
    check_servable applies it to adapters, TrainConfig to settings before training."""
    limits = limits or ServingLimits()
    # peft writes full paths (model.layers.3.self_attn.q_proj) when layers are chosen; vLLM
    # matches module suffixes, so compare those.
    unknown = [] if limits.target_modules is None else \
        sorted({t.rsplit(".", 1)[-1] for t in target_modules} - limits.target_modules)
    found = {"rank": rank > limits.max_rank and rank, "target_modules": unknown,
             "use_dora": bool(use_dora)}
    return {setting: value for setting, value in found.items() if value}


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

    ranks = [manifest.lora.rank, config.get("r"), *(config.get("rank_pattern") or {}).values()]
    targets = set(manifest.lora.target_modules)
    if isinstance(config.get("target_modules"), list):
        targets |= set(config["target_modules"])
    bad = unservable_lora(max(r for r in ranks if type(r) is int), targets,  # not bool
                          manifest.lora.use_dora or bool(config.get("use_dora")), limits)
    if "rank" in bad:
        reasons.append((f"rank {bad['rank']} is above the server's limit {limits.max_rank}",
                        (f"retrain with rank <= {limits.max_rank}, or serve with a max LoRA "
                         f"rank of at least {bad['rank']}")))
    if "target_modules" in bad:
        reasons.append(((f"target modules {bad['target_modules']} cannot be served (the engine "
                         f"supports {sorted(limits.target_modules or ())})"),
                        "retrain with target_modules among those"))
    if "use_dora" in bad:
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
