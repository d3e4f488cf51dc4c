"""Helpers of the serving tests, in a module of their own: test modules import them by this
unique name (a bare `conftest` import resolves to whichever conftest.py was imported first,
which breaks when tests of several folders run together). The fixtures: conftest.py."""

from __future__ import annotations

import json
import math
import struct
import time
from contextlib import contextmanager
from pathlib import Path

from lorastack.adapters.manifest import AdapterManifest, LoraSettings
from lorastack.adapters.store import AdapterStore

FAKE_FINGERPRINT = "sha256:" + "ab" * 32


def write_fake_adapter(store: AdapterStore, name: str, *, task: str = "classification",
                       rank: int = 8, labels=("yes", "no"), fingerprint: str = FAKE_FINGERPRINT,
                       salt: int = 0, replace: bool = False, tmp: Path | None = None,
                       prompt_template: str = "{text}"):
    """A small valid PEFT adapter (zero weights; `salt` changes its bytes) written atomically."""
    src = (tmp or store.root.parent) / f"src-{name}-{salt}"
    src.mkdir(parents=True, exist_ok=True)
    targets = ["q_proj", "v_proj"]
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
           "lora_dropout": 0.0, "target_modules": targets, "use_dora": False,
           "modules_to_save": None, "bias": "none", "init_lora_weights": True,
           "salt": salt}
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    header, offset = {}, 0
    for layer in range(2):
        for module in targets:
            for part, shape in (("lora_A", [rank, 8]), ("lora_B", [8, rank])):
                size = math.prod(shape) * 4
                key = f"base_model.model.model.layers.{layer}.self_attn.{module}.{part}.weight"
                header[key] = {"dtype": "F32", "shape": shape,
                               "data_offsets": [offset, offset + size]}
                offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (src / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw +
                                                    bytes(offset))
    classify = task == "classification"
    manifest = AdapterManifest(
        name=name, task=task, base_model="smollm2-135m", base_fingerprint=fingerprint,
        lora=LoraSettings(rank=rank, alpha=2 * rank, target_modules=tuple(targets)),
        prompt_template=prompt_template, labels=tuple(labels) if classify else (),
        chat_format="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        end_of_turn="<|im_end|>")
    return store.write(name, src, manifest, replace=replace)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# SmolLM2-135M: hidden 576, 30 layers, 3 KV heads of 64, MLP 1536
SHAPES = {"q_proj": (576, 576), "v_proj": (576, 192), "down_proj": (1536, 576)}
PARENT = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}


def random_adapter(store: AdapterStore, name: str, base, seed: int, tmp, rank: int = 8,
                   labels: tuple[str, ...] = ()):
    """An adapter of random weights on the real base (q, v, down in every layer), strong enough
    that it answers differently from the base model; a classifier when `labels` are given."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(30):
        for module, (fan_in, fan_out) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{PARENT[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** .5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.25
    src = tmp / name
    src.mkdir()
    save_file(tensors, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
        "lora_dropout": 0.0, "target_modules": list(SHAPES), "use_dora": False,
        "modules_to_save": None, "bias": "none"}))
    manifest = AdapterManifest(
        name=name, task="classification" if labels else "generation", labels=labels,
        base_model=base.name, base_fingerprint=base.fingerprint,
        lora=LoraSettings(rank=rank, alpha=rank, target_modules=tuple(SHAPES)),
        prompt_template="{text}",
        chat_format="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        end_of_turn="<|im_end|>")
    return store.write(name, src, manifest)


@contextmanager
def serve_in_thread(store: AdapterStore, work: Path, **settings):
    """The real gateway (and its real vLLM child) on a free port in this process, as a
    context: (httpx client, gateway)."""
    import threading

    import httpx
    import uvicorn

    from lorastack.serve.app import create_app
    from lorastack.serve.settings import ServeSettings
    from lorastack.serve.vllm_proc import listening_socket

    sock = listening_socket()
    port = sock.getsockname()[1]
    app = create_app(ServeSettings(store=store.root, port=port, work_dir=work / "work",
                                   **settings))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, args=([sock],), daemon=True)
    thread.start()
    while not uv.started:
        assert thread.is_alive(), "the gateway failed to start (see the output above)"
        time.sleep(0.5)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            yield client, app.state.gateway
    finally:
        uv.should_exit = True
        thread.join(60)
