"""The settings that depend on the base model, checked as soon as it is resolved, from its
config alone (the architecture built on torch's meta device), still before its weights load:
lora.layers in range, lora.target_modules that exist and, with lora.for_serving, that vLLM
serves LoRA on. Also what the trainer and the search read from a base model's layout: its layer
count and the suffixes of the modules inside its numbered blocks."""

from __future__ import annotations

import re
from pathlib import Path

from lorastack.adapters.manifest import ServingLimits, unservable_lora
from lorastack.train.config import ConfigError, TrainConfig

# Module types peft's LoRA can adapt (what target_modules may name).
_ADAPTABLE_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D")


def check_against_base(cfg: TrainConfig, base_path: str | Path) -> list[str]:
    """Check the settings that depend on the base model, before its weights load; return notes
    on what was decided (printed by the trainer).

    lora.layers must be layers the model has (its config.json says how many) and
    lora.target_modules modules it has (the architecture built on torch's meta device: no
    memory and no weights, about a second): otherwise the error would come only after the
    model and the data had loaded, as peft's. With lora.for_serving, the modules must be ones
    vLLM's own model class for this architecture carries LoRA on (adapters/engine_lora.py
    asks it, once per architecture); all-linear then means the servable linear layers.
    Raises ConfigError naming the field and the fix.
    """
    lora = cfg.lora
    base_path = Path(base_path)
    if lora.layers is not None:
        count = layer_count(base_path)
        outside = [i for i in lora.layers if count is not None and i >= count]
        if outside:
            raise ConfigError(f"lora.layers: {outside} out of range: {cfg.base} has {count} "
                              f"layers, 0-{count - 1}; fix the indices, or null adapts all")
    modules = None
    if lora.target_modules != "all-linear":
        modules = adaptable_modules(base_path)
        if modules is None:
            return []  # an architecture transformers cannot build from its config: loading says
        if lora.layers is not None:  # peft then adapts only modules inside the numbered layers
            modules = [m for m in modules if BLOCK.search(m)]
        missing = [t for t in lora.target_modules
                   if not any(m == t or m.endswith("." + t) for m in modules)]
        if missing:
            inside = " inside the transformer layers (lora.layers is set)" if lora.layers else ""
            names = sorted({m.rsplit(".", 1)[-1] for m in modules})
            raise ConfigError(f"lora.target_modules: {missing} not found in {cfg.base}: the "
                              f"modules LoRA can adapt{inside} are {', '.join(names)}; fix the "
                              f"names, or all-linear adapts every linear layer")
    return _check_servable_modules(cfg, base_path) if lora.for_serving else []


_NOT_FOR_SERVING = ("or set lora.for_serving: false to train an adapter for transformers/peft "
                    "only (lorastack serve will not load it)")


def _check_servable_modules(cfg: TrainConfig, base_path: Path) -> list[str]:
    from lorastack.adapters.engine_lora import EngineProbeError, engine_lora

    try:
        engine = engine_lora(base_path)
    except EngineProbeError as exc:
        raise ConfigError(f"lora.for_serving: could not ask vLLM what it serves for {cfg.base} "
                          f"({exc}); fix the model directory, {_NOT_FOR_SERVING}") from None
    if engine is None:
        return [("servable modules not checked: vLLM is not installed here (the server checks "
                 "when it loads the adapter)")]
    if not engine.supports_lora:
        raise ConfigError(f"lora.for_serving: {cfg.base} cannot be served with LoRA: "
                          f"{engine.reason}; serve a merged model instead (lorastack export "
                          f"--merged), {_NOT_FOR_SERVING}")
    servable = set(engine.modules)
    lora = cfg.lora
    if lora.target_modules != "all-linear":
        bad = unservable_lora(0, lora.target_modules, False, ServingLimits(
            target_modules=engine.modules)).get("target_modules")
        if bad:
            raise ConfigError(f"lora.target_modules: {bad} are not servable by vLLM's "
                              f"{engine.architecture} (it carries LoRA on "
                              f"{', '.join(sorted(servable))}); choose among those, "
                              f"{_NOT_FOR_SERVING}")
        return []
    linear = block_linear_modules(base_path)
    if linear is None or set(linear) <= servable:
        return []
    kept = sorted(set(linear) & servable)
    if not kept:
        raise ConfigError(f"lora.target_modules=all-linear: none of {cfg.base}'s linear layers "
                          f"({', '.join(linear)}) are servable by vLLM's {engine.architecture} "
                          f"({', '.join(sorted(servable))}); {_NOT_FOR_SERVING}")
    lora.target_modules = kept
    dropped = sorted(set(linear) - servable)
    return [(f"lora.target_modules: all-linear of {cfg.base} adapts {', '.join(kept)}; "
             f"{', '.join(dropped)} left out: vLLM's {engine.architecture} cannot serve LoRA "
             f"there")]


def block_linear_modules(base_path: Path) -> list[str] | None:
    """Suffixes of the linear layers inside the numbered transformer blocks (what all-linear
    adapts), from the architecture alone; None if transformers cannot build it so."""
    modules = adaptable_modules(base_path, types=("Linear", "Conv1D"))
    if modules is None:
        return None
    return block_suffixes(modules)


BLOCK = re.compile(r"\.\d+\.")  # a module inside a numbered block: `.layers.3.`, `.h.3.`


def block_suffixes(names) -> list[str]:
    """The suffixes of the module `names` inside numbered transformer blocks (not the output
    head): `model.layers.3.self_attn.q_proj` (Llama), `transformer.h.3.attn.c_attn` (GPT-2)."""
    return sorted({name.rsplit(".", 1)[-1] for name in names if BLOCK.search(name)})


def layer_count(base_path: Path) -> int | None:
    """Transformer layers of a base model, from its config.json; None when it does not say."""
    import json

    try:
        config = json.loads((base_path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(section.get(key), int):
                return section[key]
    return None


def adaptable_modules(base_path: Path,
                      types: tuple[str, ...] = _ADAPTABLE_TYPES) -> list[str] | None:
    """Full names of the modules LoRA can adapt in a base model, from its architecture alone
    (built on the meta device, weights never read); None if it cannot be built so."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - any failure here is the real load's to report
        return None
    return [name for name, module in model.named_modules()
            if name and type(module).__name__ in types]
