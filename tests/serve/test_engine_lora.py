"""Multi-LoRA in real vLLM (the CPU build, with lorastack's plugin): every request of a mixed
batch gets the answer it gets alone, with every LoRA slot of the engine full.

Four adapters with random weights on the real base (strong enough that each one answers
differently from the base model and from each other: a row routed to the wrong slot shows),
served by the real gateway and its vLLM child (max_loras = capacity = 4).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from lorastack.adapters.manifest import AdapterManifest, LoraSettings
from lorastack.adapters.store import AdapterStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ADAPTERS = [f"rand-{i}" for i in range(4)]
PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
# SmolLM2-135M: hidden 576, 30 layers, 3 KV heads of 64, MLP 1536
SHAPES = {"q_proj": (576, 576), "v_proj": (576, 192), "down_proj": (1536, 576)}
PARENT = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}


def random_adapter(store: AdapterStore, name: str, base, seed: int, tmp, rank: int = 8):
    import json

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
        name=name, task="generation", base_model=base.name, base_fingerprint=base.fingerprint,
        lora=LoraSettings(rank=rank, alpha=rank, target_modules=tuple(SHAPES)),
        prompt_template="{text}",
        chat_format="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        end_of_turn="<|im_end|>")
    return store.write(name, src, manifest)


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_model):
    import uvicorn

    from lorastack.serve.app import create_app
    from lorastack.serve.settings import ServeSettings
    from lorastack.serve.vllm_proc import free_port

    root = tmp_path_factory.mktemp("engine-lora")
    store = AdapterStore(root / "store")
    for i, name in enumerate(ADAPTERS):
        random_adapter(store, name, base_model, seed=i, tmp=root)
    port = free_port()
    settings = ServeSettings(store=store.root, port=port, capacity=4, max_loras=4,
                             work_dir=root / "work", max_batch=8, max_tokens=64)
    app = create_app(settings)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        assert thread.is_alive(), "the gateway failed to start (see the output above)"
        time.sleep(0.5)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
        yield SimpleNamespace(client=client, gw=app.state.gateway, store=store, root=root)
    uv.should_exit = True
    thread.join(60)


def chat(client: httpx.Client, model: str) -> str:
    r = client.post("/v1/chat/completions", json={"model": model, "messages": PROMPT,
                                                  "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_plugin_is_active_in_the_engine(server):
    log = server.gw.engines[0].process.log_file.read_text(errors="replace")
    assert "lorastack vLLM plugin: active" in log
    assert "Using GroupedPunicaWrapperCPU" in log


def test_mixed_batch_every_slot_full_answers_as_alone(server):
    base = server.gw.base.name
    alone = {model: chat(server.client, model) for model in [base, *ADAPTERS]}
    print(f"\nalone: {alone}")
    health = server.client.get("/health").json()["vllm"][0]
    assert health["adapters_loaded"] == 4  # every slot of --max-loras 4 holds an adapter
    # the test can fail: every adapter answers differently from the base model
    assert all(alone[a] != alone[base] for a in ADAPTERS)
    assert len({alone[a] for a in ADAPTERS}) == 4
    models = [base, *ADAPTERS, base, base, *ADAPTERS]  # base rows between adapter rows
    wrong = []
    with ThreadPoolExecutor(len(models)) as pool:
        for _ in range(3):
            answers = list(pool.map(lambda m: (m, chat(server.client, m)), models))
            wrong += [(m, got) for m, got in answers if got != alone[m]]
    assert not wrong, f"rows that got another answer than alone: {wrong}"
