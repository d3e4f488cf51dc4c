"""lorastack.adapters.engine_lora: what the installed vLLM can carry LoRA on, per base model.

The fast tests fake the child process (the cache, the errors, "vLLM not installed", the
expansion of packed modules). The slow ones probe the real vLLM once per tiny random-weight
model (Llama, Qwen2, Gemma2, Phi-3, GPT-2, and a config naming an architecture nobody knows),
all sharing one module-scoped LORASTACK_HOME, so that the cache test reuses their answers.

(Named *_probe.py: tests/serve/test_engine_lora.py already owns the basename, and the test
folders have no __init__.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorastack.adapters import engine_lora as el
from lorastack.adapters.engine_lora import EngineLora, EngineProbeError, engine_lora

LLAMA_HF = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _config_dir(tmp_path: Path, config: dict, name: str = "model") -> Path:
    model = tmp_path / name
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    return model


# --- fast: no vLLM, the child process faked ---


def test_import_pulls_in_neither_vllm_nor_torch():
    code = ("import sys, lorastack.adapters.engine_lora; "
            "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_expansion_follows_vllms_load_adapter():
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    got = el.expected_lora_modules(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], packed)
    assert got == LLAMA_HF
    phi3 = {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["gate_up_proj"]}
    assert el.expected_lora_modules(["qkv_proj", "gate_up_proj"], phi3) == {"qkv_proj",
                                                                            "gate_up_proj"}
    moe = {"experts": ["experts.0.w1", "experts.0.w2"]}
    assert el.expected_lora_modules(["experts"], moe) == {"experts", "experts.0.w1",
                                                          "experts.0.w2"}


def test_no_vllm_means_none(tmp_path, isolated_home, monkeypatch):
    monkeypatch.setattr(el.importlib.util, "find_spec", lambda name, package=None: None)
    assert el.vllm_version() is None
    assert engine_lora(_config_dir(tmp_path, {"architectures": ["LlamaForCausalLM"]})) is None
    assert not (isolated_home / el.CACHE_NAME).exists()


def test_version_read_without_importing_vllm():
    version = el.vllm_version()
    if version is None:
        pytest.skip("vLLM is not installed")
    assert version[0].isdigit()


class _FakeRun:
    """Stands in for subprocess.run: records the calls, answers with one canned result."""

    def __init__(self, stdout: str = "", stderr: str = "", returncode: int = 0, raises=None):
        self.calls: list[list[str]] = []
        self.answer = (stdout, stderr, returncode)
        self.raises = raises

    def __call__(self, command, **kwargs):
        self.calls.append(command)
        assert kwargs["env"]["VLLM_LOGGING_LEVEL"] == "ERROR"
        if self.raises is not None:
            raise self.raises
        stdout, stderr, returncode = self.answer
        return subprocess.CompletedProcess(command, returncode, stdout, stderr)


@pytest.fixture
def fake_vllm(monkeypatch, isolated_home):
    monkeypatch.setattr(el, "vllm_version", lambda: "9.9.9")
    return isolated_home


def test_answer_is_cached_per_config_and_version(tmp_path, fake_vllm, monkeypatch):
    answer = EngineLora("LlamaForCausalLM", True, frozenset(LLAMA_HF), "9.9.9", "")
    run = _FakeRun(stdout="some log line\n" + json.dumps(answer.to_json()) + "\n")
    monkeypatch.setattr(el.subprocess, "run", run)
    model = _config_dir(tmp_path, {"architectures": ["LlamaForCausalLM"]})
    assert engine_lora(model) == answer
    assert run.calls[0][1:] == ["-m", "lorastack.adapters.engine_lora", str(model.resolve())]
    twin = _config_dir(tmp_path, {"architectures": ["LlamaForCausalLM"]}, "same-config")
    assert engine_lora(twin) == answer and len(run.calls) == 1  # same config.json bytes
    cache = json.loads((fake_vllm / el.CACHE_NAME).read_text())
    assert len(cache) == 1 and "vllm-9.9.9" in next(iter(cache))
    monkeypatch.setattr(el, "vllm_version", lambda: "10.0.0")  # a new vLLM asks again
    engine_lora(model)
    assert len(run.calls) == 2


def test_failing_probe_names_the_dir_and_its_last_stderr_line(tmp_path, fake_vllm, monkeypatch):
    run = _FakeRun(stderr="Traceback ...\n  File x\nValueError: boom\n\n", returncode=1)
    monkeypatch.setattr(el.subprocess, "run", run)
    model = _config_dir(tmp_path, {"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(EngineProbeError) as info:
        engine_lora(model)
    message = str(info.value)
    assert str(model.resolve()) in message and message.endswith("ValueError: boom")
    assert "\n" not in message
    assert not (fake_vllm / el.CACHE_NAME).exists()  # failures are not cached
    assert isinstance(info.value, RuntimeError)


def test_probe_timeout_and_garbage_and_missing_config(tmp_path, fake_vllm, monkeypatch):
    model = _config_dir(tmp_path, {"architectures": ["LlamaForCausalLM"]})
    expired = subprocess.TimeoutExpired(["x"], 3, stderr=b"loading\nstill loading\n")
    monkeypatch.setattr(el.subprocess, "run", _FakeRun(raises=expired))
    with pytest.raises(EngineProbeError, match="timed out after 3 s: still loading"):
        engine_lora(model, timeout=3)
    monkeypatch.setattr(el.subprocess, "run", _FakeRun(stdout="not json\n"))
    with pytest.raises(EngineProbeError, match="printed no answer"):
        engine_lora(model)
    with pytest.raises(EngineProbeError, match="config.json"):
        engine_lora(tmp_path / "nowhere")


# --- slow: the real vLLM, once per tiny model ---

COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
          "max_position_embeddings": 512}
FAMILIES = {  # name: (config class, model class, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """{name: (EngineLora, seconds)} for each tiny model, probed once, in one LORASTACK_HOME."""
    if el.vllm_version() is None:
        pytest.skip("vLLM is not installed")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("engine-lora")
    dirs = {}
    for name, (config_cls, model_cls, extra) in FAMILIES.items():
        config = getattr(transformers, config_cls)(**COMMON, **extra)
        getattr(transformers, model_cls)(config).save_pretrained(root / name,
                                                                 safe_serialization=True)
        dirs[name] = root / name
    config = json.loads((dirs["llama"] / "config.json").read_text())
    config["architectures"] = ["FrobnicatorForCausalLM"]
    dirs["unknown"] = _config_dir(root, config, "unknown")
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORASTACK_HOME", str(root / "home"))
        for name, path in dirs.items():
            started = time.monotonic()
            results[name] = (engine_lora(path), time.monotonic() - started)
            print(f"\nprobe {name}: {time.monotonic() - started:.1f} s {results[name][0]}")
        yield {"results": results, "dirs": dirs, "home": root / "home"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama"])  # Qwen2, Gemma 2: tests/train/test_families.py
def test_llama_like_families_take_the_hf_projection_names(probed, name):
    result, _ = probed["results"][name]
    assert result.supports_lora and result.reason == ""
    assert result.architecture == FAMILIES[name][1]
    assert result.modules >= LLAMA_HF
    assert not {"qkv_proj", "gate_up_proj"} & result.modules  # packed names expanded
    assert result.vllm_version == el.vllm_version()


# Phi-3's fused modules and GPT-2's refusal, probed on the family models:
# tests/train/test_families.py::test_servability_asks_vllms_model_class


@pytest.mark.slow
def test_unknown_architecture_is_an_answer_not_an_error(probed):
    result, _ = probed["results"]["unknown"]
    assert not result.supports_lora and result.architecture == "FrobnicatorForCausalLM"
    assert "FrobnicatorForCausalLM" in result.reason and "not supported" in result.reason
    assert "\n" not in result.reason and len(result.reason) < 400


@pytest.mark.slow
def test_second_call_comes_from_the_cache(probed, monkeypatch):
    monkeypatch.setenv("LORASTACK_HOME", str(probed["home"]))

    def no_spawn(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(el.subprocess, "run", no_spawn)
    cache = json.loads((probed["home"] / el.CACHE_NAME).read_text())
    assert len(cache) == len(probed["dirs"])
    for name, path in probed["dirs"].items():
        started = time.monotonic()
        assert engine_lora(path) == probed["results"][name][0]
        assert time.monotonic() - started < 0.5
