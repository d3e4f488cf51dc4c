"""The `search:` section of a training config: the space `lorastack tune` explores.

    search:
      metric: macro_f1              # validation metric to optimise (default: the selection one)
      space:                        # dotted config paths -> a range or a list of choices
        training.lr: {low: 1.0e-4, high: 2.0e-3, log: true}
        lora.r: {choices: [4, 8, 16]}
        lora.top_layers: {low: 6, high: 30, step: 6}   # adapt the top k layers
        task.class_weight_power: {low: 0.0, high: 1.0}
        training.epochs: {choices: [1, 2]}

A range with integer ends draws integers; `log: true` draws on a log scale; `step` a grid.
Choices may be any YAML values, lists included (`lora.layers: {choices: [null, [28, 29]]}`).
`lora.top_layers` is not a training setting but a shorthand the search expands into
`lora.layers` from the base model's layer count. Every path is checked before the first trial.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TOP_LAYERS = "lora.top_layers"  # shorthand: the top k transformer layers -> lora.layers
_PRIMITIVE = (str, int, float, bool, type(None))
# Settings that decide what the trials are measured on: a search over them would compare
# trials on different validation sets (or labels), so their scores would not be comparable.
UNSEARCHABLE = ("data.source", "data.validation", "data.test", "data.validation_fraction",
                "data.split_seed", "data.limit_eval", "data.columns", "task.labels",
                "task.label_field", "search")


class SearchParam(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    low: int | float | None = None
    """Lower end of a range (inclusive)."""
    high: int | float | None = None
    """Upper end of a range (inclusive)."""
    log: bool = False
    """Draw on a log scale (learning rates); needs low > 0."""
    step: int | float | None = None
    """Draw on a grid low, low+step, ... (not with log)."""
    choices: list[Any] | None = None
    """Draw one of these values instead of a range."""

    @model_validator(mode="after")
    def _one_kind(self) -> SearchParam:
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.log or self.step is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices must list at least one value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range) or choices (a list)")
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        if self.step is not None and self.step <= 0:
            raise ValueError("step must be positive")
        return self

    @property
    def integer(self) -> bool:
        ends = (self.low, self.high) + ((self.step,) if self.step is not None else ())
        return all(isinstance(v, int) and not isinstance(v, bool) for v in ends)

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw this parameter for an Optuna trial."""
        if self.choices is not None:
            if all(isinstance(c, _PRIMITIVE) for c in self.choices):
                return trial.suggest_categorical(name, self.choices)
            # Optuna's categorical values must be plain scalars: lists go as their JSON text
            return json.loads(trial.suggest_categorical(
                name, [json.dumps(c) for c in self.choices]))
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log,
                                   step=None if self.step is None else float(self.step))


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    space: dict[str, SearchParam] = Field(min_length=1)
    """Dotted config paths (training.lr, lora.r, ...) -> the values to try."""
    metric: str | None = None
    """Validation metric to optimise; default the config's selection metric. `loss` is
    minimised, every other metric maximised."""
    pruner: Literal["median", "none"] = "median"
    """median: stop a trial whose validation metric, at an evaluation, is below the median
    of earlier trials at the same step (Optuna's MedianPruner); none: every trial runs out."""
    startup_trials: int = Field(4, ge=0)
    """Trials drawn at random before TPE models the space, and before the pruner may stop
    any trial."""
    warmup_evaluations: int = Field(1, ge=1)
    """The pruner may stop a trial from this evaluation of it on (1: already at the first,
    which stops the trials that collapse onto one label at once)."""
    seed: int = 0
    """Seed of the sampler: the same study draws the same trials."""

    @model_validator(mode="after")
    def _comparable(self) -> SearchConfig:
        fixed = [p for p in self.space
                 if any(p == u or p.startswith(u + ".") for u in UNSEARCHABLE)]
        if fixed:
            raise ValueError(
                f"search.space cannot vary {', '.join(fixed)}: it decides the data the trials "
                "are scored on, so their validation scores would not be comparable; fix it in "
                "the config and search the training settings (training.seed may vary: the "
                "validation split is carved with data.split_seed)")
        return self


def set_path(raw: dict, path: str, value: Any) -> None:
    """Set `value` at a dotted `path` of a config dict (the path must exist)."""
    node = raw
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def check_paths(raw: dict, space: dict[str, SearchParam]) -> list[str]:
    """The search paths that name no setting of the config dict `raw` (a full dump)."""
    bad = []
    for path in space:
        if path == TOP_LAYERS:
            continue
        node: Any = raw
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                bad.append(path)
                break
            node = node[part]
    return bad


def current_values(raw: dict, space: dict[str, SearchParam],
                   layer_count: int | None) -> dict[str, Any]:
    """The config's own values of the searched settings that lie in the space: the search's
    first trial, so that it never ends worse than the config it started from."""
    out: dict[str, Any] = {}
    for path, spec in space.items():
        if path == TOP_LAYERS:
            layers = raw["lora"]["layers"]
            if layer_count is None:
                continue
            value: Any = layer_count if layers is None else len(layers)
            if layers is not None and layers != list(range(layer_count - value, layer_count)):
                continue  # not a top-k set of layers
        else:
            node: Any = raw
            for part in path.split("."):
                node = node[part]
            value = node
        if spec.choices is not None:
            if value in spec.choices:
                out[path] = value if all(isinstance(c, _PRIMITIVE) for c in spec.choices) \
                    else json.dumps(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and spec.low <= value <= spec.high:
            out[path] = value
    return out


def apply_params(raw: dict, params: dict[str, Any], layer_count: int | None) -> dict:
    """A config dict with the drawn `params` set (top_layers expanded into lora.layers)."""
    out = json.loads(json.dumps(raw))
    for path, value in params.items():
        if path == TOP_LAYERS:
            if layer_count is None:
                raise ValueError(f"{TOP_LAYERS} needs the base model's layer count, which its "
                                 "config does not give: search lora.layers instead")
            k = max(1, min(int(value), layer_count))
            out["lora"]["layers"] = list(range(layer_count - k, layer_count))
        else:
            set_path(out, path, value)
    return out
