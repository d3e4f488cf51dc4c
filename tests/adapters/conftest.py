"""Tiny fake PEFT adapters, written by hand: no torch, no peft, no safetensors library."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorastack.adapters.manifest import AdapterManifest, LoraSettings, Metrics
from lorastack.adapters.models import BaseModel
from lorastack.adapters.store import AdapterStore

FINGERPRINT = "sha256:" + "ab" * 32
OTHER_FINGERPRINT = "sha256:" + "cd" * 32
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A valid safetensors file: 8-byte LE header length, JSON header, zeroed tensor data."""
    header, offset = {}, 0
    for key, (dtype, shape) in tensors.items():
        size = math.prod(shape) * _ITEMSIZE[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def lora_tensors(rank: int, targets, layers: int = 2, width: int = 8) -> dict:
    tensors = {}
    for layer in range(layers):
        for module in targets:
            block = "mlp" if module.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = ("F32", [rank, width])
            tensors[f"{prefix}.lora_B.weight"] = ("F32", [width, rank])
    return tensors


def write_peft_dir(path: Path, rank: int = 8, targets=("q_proj", "v_proj"), **config) -> Path:
    """A directory like peft's save_pretrained writes (config keys as peft 0.21 names them)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
           "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": rank,
           "lora_alpha": 2 * rank, "lora_dropout": 0.05, "target_modules": list(targets),
           "use_dora": False, "use_rslora": False, "modules_to_save": None, "bias": "none",
           "init_lora_weights": True, "inference_mode": True, "peft_version": "0.21.2"}
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    write_safetensors(path / "adapter_model.safetensors", lora_tensors(rank, targets))
    (path / "README.md").write_text("model card peft writes; not part of the contract\n")
    return path


def make_manifest(name: str, task: str = "classification", rank: int = 8,
                  targets=("q_proj", "v_proj"), **fields) -> AdapterManifest:
    classify = task == "classification"
    values = {
        "name": name, "task": task, "base_model": "smollm2-135m", "base_fingerprint": FINGERPRINT,
        "lora": LoraSettings(rank=rank, alpha=2 * rank, target_modules=targets, dropout=0.05),
        "prompt_template": "Review: {text}\nSentiment:" if classify else "{text}",
        "labels": ("negative", "positive") if classify else (),
        "metrics": Metrics(validation={"accuracy": 0.8},
                           test={"accuracy": 0.75, "macro_f1": 0.7}),
        "training": {"learning_rate": 2e-4, "epochs": 1},
        "data_fingerprint": "sha256:" + "ef" * 32, "versions": {"peft": "0.21.2"}}
    return AdapterManifest(**(values | fields))


@pytest.fixture
def store_env(isolated_home, monkeypatch):
    """Never touch ~/.cache: an empty LORASTACK_HOME (tests/conftest.py) and no store override.
    Not autouse: test_models.py in this folder uses the real cache."""
    monkeypatch.delenv("LORASTACK_STORE", raising=False)
    return isolated_home


@pytest.fixture
def store(tmp_path, store_env) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


@pytest.fixture
def fake_base() -> BaseModel:
    """The base model the fake adapters were 'trained' on (never loaded)."""
    return BaseModel("smollm2-135m", Path("/nonexistent"), FINGERPRINT, "catalog")


@pytest.fixture
def add_adapter(store, tmp_path):
    """add_adapter(name, **manifest_fields) -> Adapter written into `store`."""
    def add(name: str, rank: int = 8, targets=("q_proj", "v_proj"), config=None, **fields):
        src = write_peft_dir(tmp_path / "peft" / name, rank, targets, **(config or {}))
        return store.write(name, src, make_manifest(name, rank=rank, targets=targets, **fields))
    return add


@pytest.fixture
def fake():
    """The helpers above, for test modules (importing from conftest is fragile in pytest)."""
    return SimpleNamespace(write_safetensors=write_safetensors, lora_tensors=lora_tensors,
                           write_peft_dir=write_peft_dir, make_manifest=make_manifest,
                           FINGERPRINT=FINGERPRINT, OTHER_FINGERPRINT=OTHER_FINGERPRINT)
