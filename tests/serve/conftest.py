"""Serving fixtures.

Fast unit tests run the gateway against FakeVllm (tests/serve/fake_vllm.py) through an httpx
transport. The integration tests (marked slow) run the real thing: adapters trained on the real
base model, the real vLLM child, real HTTP; vLLM starts once per session.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # fake_vllm, reference

from lorastack.adapters.manifest import AdapterManifest, LoraSettings
from lorastack.adapters.models import BaseModel
from lorastack.adapters.store import AdapterStore

FAKE_FINGERPRINT = "sha256:" + "ab" * 32


def write_fake_adapter(store: AdapterStore, name: str, *, task: str = "classification",
                       rank: int = 8, labels=("yes", "no"), fingerprint: str = FAKE_FINGERPRINT,
                       salt: int = 0, replace: bool = False, tmp: Path | None = None):
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
        prompt_template="{text}", labels=tuple(labels) if classify else (),
        chat_format="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        end_of_turn="<|im_end|>")
    return store.write(name, src, manifest, replace=replace)


@pytest.fixture(scope="session")
def fake_base(base_model) -> BaseModel:
    """The real base model's directory (for its tokenizer) under the fake adapters' fingerprint."""
    return BaseModel(base_model.name, base_model.path, FAKE_FINGERPRINT, base_model.source)
