"""ServeSettings: every knob of `lorastack serve`, from flags or LORASTACK_* environment variables.

Flags win over the environment (the CLI passes only the flags that were given). Lists
(LORASTACK_UPSTREAM, LORASTACK_API_KEYS, LORASTACK_VLLM_ARGS) take a JSON list or a
comma-separated string.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lorastack.adapters.manifest import ServingLimits
from lorastack.adapters.models import DEFAULT_BASE

CommaList = Annotated[list[str], NoDecode]


class SettingsError(ValueError):
    """The serving settings are inconsistent; the message says which and how to fix them."""


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASTACK_", extra="ignore",
                                      validate_default=True, use_attribute_docstrings=True)

    base: str = DEFAULT_BASE
    """Base model (catalog alias, hub id or directory); adapters trained on other weights are
    refused."""
    store: Path | None = None
    """Adapter store directory (default: $LORASTACK_STORE, else $LORASTACK_HOME/adapters)."""
    host: str = "127.0.0.1"
    """Address the gateway binds. Anything but loopback requires API and admin keys."""
    port: int = Field(8000, ge=0, le=65535)
    """Gateway port (0: any free port)."""
    upstream: CommaList = []
    """URLs of vLLM OpenAI servers already running (started with --enable-lora and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); when given, no vLLM child is started."""

    api_keys: CommaList = []
    """Keys accepted on /v1 routes (`Authorization: Bearer KEY`). Optional on loopback."""
    admin_key: str | None = None
    """Key for /v1/adapters/load and /unload (also accepted on /v1 routes)."""

    lora: bool = True
    """Serve LoRA adapters (vLLM --enable-lora). --no-lora serves the base model alone, without
    LoRA's per-token cost: a model merged by `lorastack export --merged`, for instance."""
    max_loras: int = Field(4, ge=1, le=64)
    """Adapters vLLM runs in one batch (vLLM --max-loras)."""
    capacity: int = Field(8, ge=1, le=1024)
    """Adapters kept loaded per engine (vLLM --max-cpu-loras); beyond it the least recently used
    idle one is unloaded, and loaded again when asked for."""
    max_lora_rank: int = Field(ServingLimits.max_rank, ge=1)
    """Largest LoRA rank served (vLLM --max-lora-rank: 8, 16, 32, 64, ...)."""
    max_model_len: int = Field(1024, ge=64)
    """Context length vLLM allocates per sequence (prompt + completion)."""
    max_prompt_tokens: int = Field(768, ge=1)
    """Longest prompt accepted, in tokens of the base model's tokenizer."""
    max_tokens: int = Field(512, ge=1)
    """Most tokens one completion may generate; also the default when a request names none."""
    max_batch: int = Field(32, ge=1)
    """Most prompts (completions: prompts x n; classify: inputs) in one request."""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body accepted."""

    poll_interval_s: float = Field(0.5, gt=0)
    """How often the store's change feed is polled (hot swap latency)."""
    start_timeout_s: float = Field(600, gt=0)
    """How long to wait for vLLM to become healthy before giving up."""
    request_timeout_s: float = Field(600, gt=0)
    """Longest a forwarded request may take."""
    vllm_port: int = Field(0, ge=0, le=65535)
    """Port of the vLLM child (0: a free one)."""
    vllm_host: str = "127.0.0.1"
    """Address vLLM binds (the child, or the Ray app's replicas). Anything but loopback opens its
    unauthenticated LoRA load routes to that network: only on a private cluster network (Ray on
    several nodes: 0.0.0.0, registered under the node's address)."""
    kv_cache_gb: float = Field(2, gt=0)
    """KV cache size of the vLLM child on CPU (VLLM_CPU_KVCACHE_SPACE)."""
    vllm_threads: Literal["all", "vllm"] = "all"
    """CPU only: `all` gives the engine every core (VLLM_CPU_NUM_OF_RESERVED_CPU=0) and runs the
    model inside vLLM's engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=0: no worker
    process, a faster start); `vllm` keeps vLLM's own placement, a worker process that reserves
    one core for its API front end (on 2 cores: one compute thread). Measured in
    bench/engine_tuning.py."""
    dtype: str = "float32"
    """vLLM --dtype (float32 on CPU: bfloat16 is far slower there)."""
    vllm_args: CommaList = []
    """Extra arguments passed to the vLLM child as they are."""
    work_dir: Path | None = None
    """Where the gateway keeps adapter snapshots and the vLLM log (default: a temporary dir)."""
    restart_vllm: bool = True
    """Restart the vLLM child when it dies."""
    upstream_dir: Path | None = None
    """Follow the vLLM servers registered in this directory (lorastack's Ray app: each replica
    writes its URL there) instead of --upstream; none is started."""

    backend: Literal["local", "ray"] = "local"
    """`ray`: run on Ray Serve (serve/ray_app.py): --replicas vLLM replicas as one deployment
    and --gateways gateway replicas as its ingress, on a local Ray or RAY_ADDRESS's cluster."""
    replicas: int = Field(1, ge=1)
    """With --backend ray: vLLM replicas (each one vLLM server with multi-LoRA)."""
    gateways: int = Field(1, ge=1)
    """With --backend ray: gateway replicas behind Ray's HTTP proxy (they share --work-dir)."""

    @field_validator("upstream", "api_keys", "vllm_args", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("upstream")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream {url!r} is not an http(s) URL "
                                 f"(e.g. http://10.0.0.5:8000)")
        return [u.rstrip("/") for u in value]

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.upstream and self.upstream_dir:
            raise ValueError("give --upstream or --upstream-dir, not both")
        if not self.upstream and self.capacity < self.max_loras:  # only the child's flags
            raise ValueError(f"capacity ({self.capacity}) must be >= max_loras "
                             f"({self.max_loras}); vLLM needs max-cpu-loras >= max-loras")
        if self.max_prompt_tokens >= self.max_model_len:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) must be below "
                             f"max_model_len ({self.max_model_len}) to leave room to answer")
        return self

    @property
    def on_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys or self.admin_key)

    def check_exposure(self) -> None:
        """Refuse to serve beyond loopback without keys: anyone could use and swap adapters."""
        if self.on_loopback:
            return
        missing = [what for what, ok in (("API keys (--api-key / LORASTACK_API_KEYS)",
                                          self.api_keys),
                                         ("an admin key (--admin-key / LORASTACK_ADMIN_KEY)",
                                          self.admin_key)) if not ok]
        if missing:
            raise SettingsError(f"binding {self.host} exposes the server beyond this machine, "
                                f"but {' and '.join(missing)} are not set. Set them, or bind "
                                f"127.0.0.1.")


def fit_context(settings: ServeSettings, model_dir: Path) -> tuple[ServeSettings, str]:
    """Settings whose context fits the base model: vLLM refuses a max_model_len above the
    model's positions (max_position_embeddings), so a smaller model (a tiny one, GPT-2's 1024)
    gets its own length, max_prompt_tokens shrunk in proportion; and a note saying so."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return settings, ""
    config = config.get("text_config") or config
    positions = next((config[k] for k in ("max_position_embeddings", "n_positions")
                      if isinstance(config.get(k), int)), None)
    if positions is None or positions >= settings.max_model_len:
        return settings, ""
    prompt = min(settings.max_prompt_tokens,
                 positions * settings.max_prompt_tokens // settings.max_model_len)
    fitted = settings.model_copy(update={"max_model_len": positions,
                                         "max_prompt_tokens": max(1, prompt)})
    return fitted, (f"max_model_len {settings.max_model_len} is above the base model's "
                    f"{positions} positions: serving with max_model_len {positions}, "
                    f"max_prompt_tokens {fitted.max_prompt_tokens}")
