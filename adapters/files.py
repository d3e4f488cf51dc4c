"""The adapter directory on disk: its file names, writing it atomically and reading it back checked.

    <store>/<name>/adapter_config.json        PEFT, unchanged
    <store>/<name>/adapter_model.safetensors  PEFT weights, unchanged; never pickle
    <store>/<name>/manifest.json              ours (AdapterManifest)

A write fills a hidden `.<name>.*.partial` directory beside the final one and renames it into
place, so readers see a whole adapter or none. The safetensors header is checked by hand (8-byte
little-endian length, then a JSON header) so that this module needs neither torch nor the
safetensors library and never unpickles anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorastack.adapters.fsutil import staging_dir
from lorastack.adapters.manifest import (
    AdapterError,
    AdapterExistsError,
    AdapterManifest,
    BaseMismatchError,
    ManifestError,
    MissingFileError,
    UnsafeWeightsError,
    check_name,
    short_hash,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
# beside a model merged by `lorastack export --merged`: what went in, its manifest, the parity
EXPORT_FILE = "lorastack-export.json"
LOCK_FILE = ".lock"
# Weight files that are (or may be) Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8}
_SAFE_FIX = ("save the adapter with safetensors: in a trusted environment load it with peft and "
             "call save_pretrained(dir, safe_serialization=True)")


@dataclass(frozen=True)
class Adapter:
    """An adapter directory that was read and checked."""

    name: str
    path: Path
    manifest: AdapterManifest
    config: dict[str, Any]  # adapter_config.json as parsed (what peft and vLLM read)
    weights_bytes: int  # size of adapter_model.safetensors

    def content_hash(self) -> str:
        """"sha256:<hex>" over the three files: changes whenever the adapter is rewritten.

        The server loads a replaced adapter into vLLM under a fresh identity built from this,
        because vLLM caches adapters by name and id.
        """
        digest = hashlib.sha256()
        for file in (MANIFEST_FILE, CONFIG_FILE, WEIGHTS_FILE):
            digest.update(file.encode() + b"\0")
            with open(self.path / file, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
        return "sha256:" + digest.hexdigest()


# -- reading -------------------------------------------------------------------------------------

def read_adapter(path: str | Path, *, base_fingerprint: str | None = None,
                 check_weights: bool = True) -> Adapter:
    """Read and check the adapter directory `path`; raise an AdapterError saying what to fix.

    `base_fingerprint`: the fingerprint of the base model at hand; a different one is refused.
    `check_weights=False` skips opening the weights (it still checks they exist and are not
    pickle): listings use it so that they read only the small JSON files.
    """
    path = Path(path)
    name = path.name
    try:
        check_name(name)
    except AdapterError as exc:
        raise exc.located(name, path) from None
    # Every file is read through one open directory handle, so that all of them come from the
    # same directory even if a writer renames a replacement into `path` meanwhile.
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise MissingFileError("no such adapter directory", name, path,
                               "check the store path and the adapter name") from None
    try:
        _refuse_pickles(os.listdir(dir_fd), path, name)
        manifest = read_manifest(path / MANIFEST_FILE, name, dir_fd)
        config = read_config(path / CONFIG_FILE, name, dir_fd)
        check_agrees(manifest, config, name, path / CONFIG_FILE)
        weights = path / WEIGHTS_FILE
        try:
            weights_bytes = os.stat(WEIGHTS_FILE, dir_fd=dir_fd).st_size
        except FileNotFoundError:
            raise MissingFileError(f"{WEIGHTS_FILE} is missing", name, weights,
                                   "copy the PEFT weights back in, or re-export the "
                                   "adapter") from None
        if check_weights:
            read_safetensors_header(weights, name, dir_fd)
    finally:
        os.close(dir_fd)
    if base_fingerprint is not None:
        check_base(manifest, base_fingerprint, path / MANIFEST_FILE)
    return Adapter(name, path, manifest, config, weights_bytes)


def read_manifest(file: Path, name: str, dir_fd: int | None = None) -> AdapterManifest:
    """Parse manifest.json; its `name` must be the directory's name."""
    try:
        with open(file, encoding="utf-8", opener=_opener(dir_fd)) as fh:
            text = fh.read()
    except FileNotFoundError:
        raise MissingFileError(f"{MANIFEST_FILE} is missing (a PEFT directory without it is not "
                               f"a lorastack adapter)", name, file,
                               f"import the directory: lorastack adapters import DIR --name "
                               f"{name} --task TASK") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read it ({exc})", name, file,
                            "check the file's permissions and encoding (UTF-8)") from None
    try:
        manifest = AdapterManifest.from_json(text)
    except AdapterError as exc:
        raise exc.located(name, file, "correct the field, or re-export the adapter "
                                      "(retrain, or `lorastack adapters import`)") from None
    if manifest.name != name:
        raise ManifestError(f"it names the adapter {manifest.name!r} but the directory is "
                            f"{name!r}", name, file,
                            "rename the directory or set the manifest's name to match")
    return manifest


def read_config(file: Path, name: str, dir_fd: int | None = None) -> dict[str, Any]:
    """Parse PEFT's adapter_config.json and check that it describes a LoRA adapter."""
    try:
        with open(file, encoding="utf-8", opener=_opener(dir_fd)) as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise MissingFileError(f"{CONFIG_FILE} is missing", name, file,
                               "copy PEFT's adapter_config.json back in, or re-export the "
                               "adapter") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{CONFIG_FILE} does not parse as JSON ({exc})", name, file,
                            "restore the file that peft wrote") from None
    if not isinstance(config, dict):
        raise ManifestError(f"{CONFIG_FILE} is not a JSON object", name, file,
                            "restore the file that peft wrote")
    if config.get("peft_type", "LORA") != "LORA":
        raise ManifestError(f"peft_type is {config['peft_type']!r}; only LoRA adapters are "
                            f"supported", name, file, "train a LoRA adapter (peft LoraConfig)")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ManifestError(f"r (the LoRA rank) must be a positive integer, got {rank!r}",
                            name, file, "restore the file that peft wrote")
    return config


def check_agrees(manifest: AdapterManifest, config: dict, name: str, file: Path) -> None:
    """The manifest's copy of the LoRA settings must match what peft and vLLM will read."""
    if manifest.lora.rank != config["r"] or manifest.lora.use_dora != bool(
            config.get("use_dora", False)):
        raise ManifestError(
            f"manifest.json says rank {manifest.lora.rank}, dora {manifest.lora.use_dora} but "
            f"{CONFIG_FILE} says r {config['r']}, use_dora {bool(config.get('use_dora'))}",
            name, file, "one of the files was edited or swapped: re-export the adapter")


def check_base(manifest: AdapterManifest, base_fingerprint: str, file: Path | None = None) -> None:
    """Refuse an adapter trained on other base weights than `base_fingerprint`."""
    if manifest.base_fingerprint != base_fingerprint:
        raise BaseMismatchError(
            f"it was trained on base {manifest.base_model!r} with weights "
            f"{_short(manifest.base_fingerprint)}, but the base model at hand has weights "
            f"{_short(base_fingerprint)}", manifest.name, file,
            f"serve it with the base it was trained on ({manifest.base_model}), or retrain it "
            f"on this base")


def read_safetensors_header(file: Path, name: str | None = None,
                            dir_fd: int | None = None) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked to be well-formed; never loads tensors.

    Format: 8-byte little-endian header length N, N bytes of JSON ({tensor: {dtype, shape,
    data_offsets}, "__metadata__": {...}}), then the tensor bytes, packed without gaps.
    """
    def bad(problem: str) -> UnsafeWeightsError:
        return UnsafeWeightsError(f"{file.name} is not a well-formed safetensors file: "
                                  f"{problem}", name, file, _SAFE_FIX)
    try:
        with open(file, "rb", opener=_opener(dir_fd)) as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise bad(f"only {size} bytes long")
            (length,) = struct.unpack("<Q", prefix)
            if not 2 <= length <= min(_SAFETENSORS_MAX_HEADER, size - 8):
                raise bad(f"header length {length} does not fit the file ({size} bytes)")
            raw = fh.read(length)
    except FileNotFoundError:
        raise MissingFileError(f"{file.name} is missing", name, file,
                               "pass the directory peft's save_pretrained wrote") from None
    except OSError as exc:
        raise UnsafeWeightsError(f"cannot read {file.name} ({exc})", name, file,
                                 "check the file's permissions") from None
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise bad(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = math.prod(shape)
            ok = (dtype in _DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(start, int) and isinstance(end, int)
                  and end - start == count * _DTYPE_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"tensor {key!r} has a bad entry {info!r}")
        spans.append((start, end))
    spans.sort()
    position = 0
    for start, end in spans:  # tensors must tile the data section exactly
        if start != position:
            raise bad("the tensor data overlaps or has gaps")
        position = end
    if position != size - 8 - length:
        raise bad(f"the data section holds {size - 8 - length} bytes but the tensors need "
                  f"{position} (truncated or padded file)")
    return header


def lora_tensor_info(header: Mapping[str, Any]) -> tuple[int, set[str]]:
    """(largest rank, module suffixes) of the LoRA tensors named in a safetensors header.

    PEFT names them `base_model.model.<path>.<module>.lora_A.weight` (shape [r, in]) and
    `...lora_B.weight` (shape [out, r]).
    """
    rank, modules = 0, set()
    for key, info in header.items():
        parts = key.split(".")
        if key == "__metadata__" or len(parts) < 3 or parts[-2] not in ("lora_A", "lora_B"):
            continue
        modules.add(parts[-3])
        shape = info.get("shape") or [0, 0]
        rank = max(rank, shape[0] if parts[-2] == "lora_A" else shape[-1])
    return rank, modules


def _opener(dir_fd: int | None):
    """An `open(opener=...)` that opens the file's base name inside the directory `dir_fd`."""
    if dir_fd is None:
        return None
    return lambda file, flags: os.open(os.path.basename(file), flags, dir_fd=dir_fd)


def _refuse_pickles(names: list[str], path: Path, name: str) -> None:
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UnsafeWeightsError(
            f"it holds pickle weight file(s) {', '.join(pickles)}, which lorastack never loads "
            f"(unpickling can run arbitrary code)", name, path / pickles[0],
            f"delete them if {WEIGHTS_FILE} is there, otherwise {_SAFE_FIX}")


def _short(fingerprint: str) -> str:
    return short_hash(fingerprint) or "(none)"


# -- writing ---------------------------------------------------------------------------------

@contextlib.contextmanager
def store_lock(root: Path) -> Iterator[None]:
    """Exclusive lock over the store's check-then-rename steps (across processes and threads:
    each call opens its own file description, and flock locks those)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def move_aside(path: Path, tag: str) -> Path:
    """Rename `path` to a hidden sibling (never listed) and return the new path."""
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{tag}")
    os.rename(path, aside)
    return aside


def write_adapter(store: Any, name: str, source: str | Path | Mapping[str, str | Path],
                  manifest: AdapterManifest, replace: bool = False) -> Adapter:
    """Write adapter `name` into `store` (an AdapterStore or its root directory), atomically.

    `source`: a PEFT output directory (adapter_config.json + adapter_model.safetensors; other
    files there are not copied) or a mapping {file name: path} for those two files.
    An existing adapter of that name raises AdapterExistsError unless `replace`; with it, the old
    directory is renamed aside, the new one renamed in, and the old one deleted: a reader sees
    the old adapter, briefly none, or the new one, never a mix.
    """
    # (not getattr(store, "root"): a Path has a .root too, "/")
    root = Path(store) if isinstance(store, (str, os.PathLike)) else Path(store.root)
    check_name(name)
    if manifest.name != name:
        raise ManifestError(f"the manifest names the adapter {manifest.name!r}", name, None,
                            f"build the manifest with name={name!r}")
    config_src, weights_src = source_files(source, name)
    config = read_config(config_src, name)
    read_safetensors_header(weights_src, name)
    check_agrees(manifest, config, name, config_src)

    final = root / name
    root.mkdir(parents=True, exist_ok=True)
    old: Path | None = None
    locked = contextlib.ExitStack()
    try:
        with locked, staging_dir(final) as tmp:
            for src, dest in ((config_src, CONFIG_FILE), (weights_src, WEIGHTS_FILE)):
                shutil.copyfile(src, tmp / dest)
            (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
            for file in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
                _fsync(tmp / file)
            weights_bytes = (tmp / WEIGHTS_FILE).stat().st_size
            # Check-then-rename under the store lock; staging_dir renames when this block ends,
            # before `locked` (entered first) releases the lock.
            locked.enter_context(store_lock(root))
            if os.path.lexists(final):
                if not replace:
                    raise AdapterExistsError(
                        f"an adapter with this name already exists in {root}", name, final,
                        f"choose another name, remove it first (lorastack adapters rm {name}), "
                        f"or replace it (replace=True, --replace)")
                old = move_aside(final, "replaced")
    except BaseException as exc:
        if old is not None and not os.path.lexists(final):
            os.rename(old, final)  # the new copy did not land: put the old one back
            old = None
        if isinstance(exc, OSError) and exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise AdapterExistsError("another writer created it at the same time", name, final,
                                     "retry with another name, or with replace") from exc
        raise
    _fsync(root)  # make the rename itself durable
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return Adapter(name, final, manifest, config, weights_bytes)


def source_files(source: str | Path | Mapping[str, str | Path], name: str) -> tuple[Path, Path]:
    """(config, weights) paths of a write's source; refuses pickle-only or incomplete sources."""
    if isinstance(source, Mapping):
        missing = {CONFIG_FILE, WEIGHTS_FILE} - set(source)
        if missing:
            raise MissingFileError(f"the files to write lack {', '.join(sorted(missing))}",
                                   name, None, f"pass both {CONFIG_FILE} and {WEIGHTS_FILE}")
        return Path(source[CONFIG_FILE]), Path(source[WEIGHTS_FILE])
    src = Path(source)
    if not src.is_dir():
        raise MissingFileError("the source is not a directory", name, src,
                               "pass the directory peft's save_pretrained wrote")
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in src.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise UnsafeWeightsError(
                f"the weights are pickle ({', '.join(pickles)}), which lorastack never loads",
                name, src / pickles[0], _SAFE_FIX)
        raise MissingFileError(f"{WEIGHTS_FILE} is missing", name, weights,
                               "pass the directory peft's save_pretrained wrote")
    return src / CONFIG_FILE, weights


def _fsync(file: Path) -> None:
    """Flush a file (or a directory's entries) to disk before it is published by a rename."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
