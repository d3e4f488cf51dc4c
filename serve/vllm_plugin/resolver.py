"""A vLLM LoRA resolver over a lorastack store: `model=<adapter name>` served on first use.

Any `vllm serve BASE --enable-lora` (or `python -m vllm.entrypoints.openai.api_server ...`)
with lorastack installed registers it (vLLM's `vllm.general_plugins` entry point calls
serve/vllm_plugin.register) when these are set:

    LORASTACK_RESOLVER_STORE=/shared/adapters    # a store: a directory, or an fsspec URL
                                                 # (s3://bucket/adapters, gs://..., memory://)
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True        # vLLM asks resolvers only then
    LORASTACK_RESOLVER_BASE=smollm2-135m         # optional: the lorastack base (alias or
                                                 # directory) when vLLM's --model is not one

A request for a model vLLM does not know names an adapter: `reviews-classify`, or one version
of it, `reviews-classify@<first 8-16 hex of its content hash>` (a client that must not see a
retrained adapter change under it pins the version). The resolver reads the adapter from the
store with the store's checks (plain name, manifest, safetensors only, LoRA settings vLLM can
load, the base model's fingerprint, rank against LORASTACK_MAX_LORA_RANK when set; vLLM checks
its own --max-lora-rank), copies it into a private, immutable, content-addressed directory
(LORASTACK_RESOLVER_CACHE, default $LORASTACK_HOME/resolver) and hands vLLM that path. A
remote store's files are downloaded there first and checked the same way. A refused adapter
gets vLLM's 404; with the endpoint plugin enabled (VLLM_PLUGINS=lorastack) its message carries
lorastack's reason (endpoint.py), and vLLM's log has it either way.

vLLM remembers a resolved name for the life of the server, so an unpinned name keeps the
version it first resolved; the content-hash form is how a client asks for another one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
from pathlib import Path

from lorastack.adapters.files import (
    CONFIG_FILE,
    MANIFEST_FILE,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    Adapter,
    read_adapter,
)
from lorastack.adapters.home import lorastack_home
from lorastack.adapters.manifest import AdapterError, ServingLimits, check_name, short_hash
from lorastack.adapters.models import ModelError, resolve_base
from lorastack.adapters.store import AdapterStore, pin

STORE_ENV, BASE_ENV = "LORASTACK_RESOLVER_STORE", "LORASTACK_RESOLVER_BASE"
CACHE_ENV, RANK_ENV = "LORASTACK_RESOLVER_CACHE", "LORASTACK_MAX_LORA_RANK"
_VERSION = re.compile(r"(?P<name>[^@]+)@(?:sha256:)?(?P<hash>[0-9a-f]{8,64})")

log = logging.getLogger("lorastack.resolver")
ACTIVE: StoreResolver | None = None  # the one register() put into vLLM's registry


class Refused(Exception):
    """An adapter the resolver will not hand to vLLM; the message says why and what to do."""


class StoreResolver:
    """Resolves adapter names from one lorastack store (see the module's docstring)."""

    def __init__(self, store: str, cache: Path, *, base: str | None = None,
                 limits: ServingLimits | None = None) -> None:
        self.store, self.cache, self.base, self.limits = store, cache, base, limits
        self.refusals: dict[str, str] = {}  # name -> why it was last refused (endpoint.py)
        self._fingerprints: dict[str, str] = {}

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        from vllm.lora.request import LoRARequest

        try:
            path = (await asyncio.to_thread(self.fetch, base_model_name, lora_name)).path
        except Refused as exc:
            self.refusals[lora_name] = str(exc)
            log.warning("lorastack resolver: %r refused: %s", lora_name, exc)
            return None
        self.refusals.pop(lora_name, None)
        log.info("lorastack resolver: %r -> %s", lora_name, path)
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    def fetch(self, base_model_name: str, lora_name: str) -> Adapter:
        """Adapter `lora_name` for vLLM's base model, checked and pinned (its .path is what
        vLLM loads)."""
        m = _VERSION.fullmatch(lora_name)
        name, want = (m["name"], m["hash"]) if m else (lora_name, None)
        try:
            check_name(name)
            fingerprint = self._base_fingerprint(base_model_name)
            if not _is_url(self.store):
                adapter = AdapterStore(self.store).resolve(name, base_fingerprint=fingerprint)
                return self._pin(adapter, want, fingerprint)
            with tempfile.TemporaryDirectory(prefix=f".{name}.", suffix=".download",
                                             dir=self._cache()) as tmp:
                return self._pin(self._download(name, Path(tmp), fingerprint), want,
                                 fingerprint)
        except (AdapterError, ModelError) as exc:
            raise Refused(str(exc)) from None

    def _pin(self, adapter: Adapter, want: str | None, fingerprint: str) -> Adapter:
        held = short_hash(adapter.content_hash(), 64)
        if want and not held.startswith(want):
            raise Refused(f"the store holds {adapter.name} at content hash {held[:16]}, not "
                          f"{want}: ask for {adapter.name} (the store's current version) or "
                          f"{adapter.name}@{held[:16]}")
        return pin(adapter, self._cache(), base_fingerprint=fingerprint, limits=self.limits)

    def _cache(self) -> Path:
        self.cache.mkdir(parents=True, exist_ok=True)
        return self.cache

    def _base_fingerprint(self, base_model_name: str) -> str:
        name = self.base or base_model_name
        if name not in self._fingerprints:
            try:
                self._fingerprints[name] = resolve_base(name, fetch=False).fingerprint
            except ModelError as exc:
                raise Refused(f"vLLM's base model {name!r} is not one lorastack can fingerprint "
                              f"({exc}); set {BASE_ENV} to its lorastack alias or directory") \
                    from None
        return self._fingerprints[name]

    def _download(self, name: str, into: Path, fingerprint: str) -> Adapter:
        """A remote store's adapter, copied into `into` and read with a local one's checks."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.store)
        remote = f"{root.rstrip('/')}/{name}"
        if not fs.isdir(remote):
            raise Refused(f"no adapter {name!r} in the store {self.store}: train or copy it "
                          f"there first")
        target = into / name
        target.mkdir()
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(remote, detail=False)}
        pickles = sorted(p for p in present if p.endswith(PICKLE_SUFFIXES))
        if WEIGHTS_FILE not in present and pickles:
            raise Refused(f"adapter {name!r} in {self.store} has pickled weights ({', '.join(pickles)})"
                          f" and no {WEIGHTS_FILE}; lorastack loads safetensors only: convert "
                          f"it and import it with `lorastack adapters import`")
        for file in (MANIFEST_FILE, CONFIG_FILE, WEIGHTS_FILE):
            if file in present:  # a missing one is named by read_adapter below
                fs.get(f"{remote}/{file}", str(target / file))
        try:
            return read_adapter(target, base_fingerprint=fingerprint)
        except AdapterError as exc:  # name the remote place, not the download directory
            raise Refused(str(exc).replace(str(target), f"{self.store.rstrip('/')}/{name}")) \
                from None


def _is_url(store: str) -> bool:
    return "://" in store and not store.startswith("file://")


def from_env() -> StoreResolver | None:
    """The resolver the environment asks for, or None when LORASTACK_RESOLVER_STORE is unset."""
    store = os.environ.get(STORE_ENV, "").strip()
    if not store:
        return None
    store = store.removeprefix("file://")
    rank = os.environ.get(RANK_ENV, "").strip()
    # modules: the engine decides (it knows its model class); rank: vLLM's --max-lora-rank
    # unless told here
    limits = ServingLimits(max_rank=int(rank) if rank.isdigit() else 1 << 16,
                           target_modules=None)
    cache = Path(os.environ.get(CACHE_ENV) or lorastack_home() / "resolver")
    return StoreResolver(store, cache, base=os.environ.get(BASE_ENV) or None, limits=limits)


def register() -> str:
    """Put the environment's store resolver into vLLM's LoRA resolver registry (idempotent);
    return what was done, in words."""
    global ACTIVE
    resolver = from_env()
    if resolver is None:
        return f"no store resolver ({STORE_ENV} is unset)"
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver("lorastack", resolver)
    ACTIVE = resolver
    return f"store resolver over {resolver.store} (adapters pinned in {resolver.cache})"
