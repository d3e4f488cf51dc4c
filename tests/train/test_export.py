"""`lorastack export ADAPTER --merged DIR` (train/export.py) on the real base model and real vLLM.

The adapter is the session's quickstart classifier (tests/conftest.py: reviews-classify trained
for 2 steps on SmolLM2-135M, served by the session's gateway). It is merged once for the module;
the merged directory is then served by a second `lorastack serve --base DIR --no-lora` (plain
vLLM, no LoRA), whose /v1/classify on the base is compared with the adapter's own answers.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
import typer
from processes import lorastack_serve
from typer.testing import CliRunner

from lorastack.adapters.files import EXPORT_FILE
from lorastack.adapters.store import AdapterStore
from lorastack.train import export

ADAPTER = "reviews-classify"
TOLERANCE = 1e-4  # the goal: merged classify equals the adapter's within 1e-4
TEXTS = ["Works great, no side effects at all.", "It made me sick and I stopped after a week.",
         "Some days it helps, some days it does not."]


def run_export(*args: str):
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so that `export` is a subcommand as in lorastack
    app.command("export")(export.export_command)
    return CliRunner().invoke(app, ["export", *args])


@pytest.fixture(scope="module")
def merged(quickstart, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    result = run_export(ADAPTER, "--merged", str(out), "--store", str(quickstart.store.root))
    assert result.exit_code == 0, result.output
    record = json.loads((out / EXPORT_FILE).read_text())
    return SimpleNamespace(dir=out, output=result.output, record=record, store=quickstart.store)


def test_export_writes_a_plain_safetensors_model(merged, base_model):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from lorastack.adapters.models import hash_safetensors, resolve_base

    names = {p.name for p in merged.dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", EXPORT_FILE} <= names, names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert "adapter_config.json" not in names  # a model, not an adapter
    assert not [p.name for p in merged.dir.parent.iterdir() if p.name.startswith(".")]
    with safe_open(str(merged.dir / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and not [k for k in keys if "lora" in k.lower()], keys[:5]
    config = json.loads((merged.dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(merged.dir)
    assert tok.chat_template == AutoTokenizer.from_pretrained(base_model.path).chat_template
    assert "lorastack serve --base" in merged.output

    rec = merged.record
    adapter = merged.store.resolve(ADAPTER)
    assert rec["adapter"] == ADAPTER and rec["task"] == "classification"
    assert rec["adapter_content_hash"] == adapter.content_hash()
    assert rec["base_fingerprint"] == base_model.fingerprint
    assert rec["merged_fingerprint"] == hash_safetensors(merged.dir) != base_model.fingerprint
    assert resolve_base(str(merged.dir)).fingerprint == rec["merged_fingerprint"]
    assert {"torch", "transformers", "peft", "lorastack"} <= set(rec["versions"])
    assert rec["manifest"]["chat_format"] == adapter.manifest.chat_format
    assert rec["manifest"]["labels"] == list(adapter.manifest.labels)


def test_parity_is_recorded_and_within_tolerance(merged):
    parity = merged.record["parity"]
    print(f"\nparity: {json.dumps({k: v for k, v in parity.items() if 'probabilities' not in k})}")
    assert parity["passed"] is True and parity["prompts"] >= 3
    assert parity["label_probability_max_diff"] <= TOLERANCE
    assert parity["token_probability_max_diff"] <= TOLERANCE
    # the check compares models that differ: the adapter moves the labels far more than that
    assert parity["adapter_effect"]["label_probability_max_diff"] > 10 * TOLERANCE
    for adapter_p, merged_p in zip(parity["adapter_label_probabilities"],
                                   parity["merged_label_probabilities"], strict=True):
        assert adapter_p.keys() == merged_p.keys() and abs(sum(merged_p.values()) - 1) < 1e-6


def test_an_existing_directory_is_refused_and_kept(merged):
    before = (merged.dir / EXPORT_FILE).read_bytes()
    result = run_export(ADAPTER, "--merged", str(merged.dir), "--store", str(merged.store.root))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "not empty" in result.output and "--replace" in result.output
    assert (merged.dir / EXPORT_FILE).read_bytes() == before


def test_an_unknown_adapter_is_one_line_error(tmp_path):
    out = tmp_path / "out"
    result = run_export("no-such-adapter", "--merged", str(out), "--store", str(tmp_path / "s"))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no-such-adapter" in lines[0]
    assert not out.exists()


def test_an_adapter_of_other_base_weights_is_refused(merged, tmp_path):
    from lorastack.adapters.store import AdapterStore

    store = AdapterStore(tmp_path / "store")
    merged.store.copy(ADAPTER, "other-base", into=store)
    manifest = store.path("other-base") / "manifest.json"
    data = json.loads(manifest.read_text())
    data["base_fingerprint"] = "sha256:" + "0" * 64  # trained on other weights
    manifest.write_text(json.dumps(data))
    result = run_export("other-base", "--merged", str(tmp_path / "out"), "--store",
                        str(store.root))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "000000000000" in lines[0] and "smollm2-135m" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_failed_parity_check_leaves_the_old_directory(merged, monkeypatch):
    """--replace gets past the refusal; a parity failure (tolerance 0 here: float rounding alone
    exceeds it) then leaves the previous export in place and no staging directory behind."""
    before = (merged.dir / EXPORT_FILE).read_bytes()
    monkeypatch.setattr(export, "PARITY_TOLERANCE", 0.0)
    result = run_export(ADAPTER, "--merged", str(merged.dir), "--store", str(merged.store.root),
                        "--replace")
    assert result.exit_code == 1, result.output
    assert "does not match" in result.output and "nothing was written" in result.output
    assert (merged.dir / EXPORT_FILE).read_bytes() == before
    assert not [p.name for p in merged.dir.parent.iterdir() if p.name.startswith(".")]


def _probabilities(url: str, model: str, texts: list[str]) -> list[dict]:
    answer = httpx.post(f"{url}/v1/classify", timeout=120, json={"model": model, "input": texts})
    assert answer.status_code == 200, answer.text
    return [row["probabilities"] for row in answer.json()["data"]]


def test_served_merged_model_classifies_as_the_adapter(quickstart, merged, tmp_path_factory):
    """`lorastack serve --base DIR --no-lora`: plain vLLM (no LoRA flags), and /v1/classify on
    the base, scored from the manifest the export recorded: the adapter's probabilities."""
    texts = TEXTS + merged.record["manifest"]["examples"][:2]
    adapter_p = _probabilities(quickstart.url, ADAPTER, texts)
    root = tmp_path_factory.mktemp("merged-serve")
    (root / "store").mkdir()
    AdapterStore(quickstart.store.root).copy(ADAPTER, ADAPTER, into=AdapterStore(root / "store"))
    # --enforce-eager: without LoRA, vLLM compiles the model on its first start (~100 s here,
    # then cached under ~/.cache/vllm); a fresh CI machine would pay it on every run
    with lorastack_serve(root, root / "store", "--base", str(merged.dir), "--no-lora",
                         "--vllm-args=--enforce-eager") as url:
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        merged_p = _probabilities(url, str(merged.dir), texts)
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": str(merged.dir), "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Review: " + TEXTS[0]}]})
        completion = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": str(merged.dir), "prompt": "The review says", "max_tokens": 4,
            "temperature": 0})
        refused = httpx.post(f"{url}/v1/classify", timeout=30,
                             json={"model": ADAPTER, "input": TEXTS[0]})
    vllm_command = (root / "work" / "vllm.log").read_text().split("\n", 3)[1]
    assert "--enable-lora" not in vllm_command and str(merged.dir) in vllm_command
    # the base card says what it classifies; the store's adapter is not served without LoRA
    assert [(m["id"], m["task"], m["labels"]) for m in models] == [
        (str(merged.dir), "classification", merged.record["manifest"]["labels"])]
    assert refused.status_code == 404 and "--no-lora" in refused.json()["error"]["message"]
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"], \
        completion.text

    diff = max(abs(a[k] - m[k]) for a, m in zip(adapter_p, merged_p, strict=True) for k in a)
    print(f"\nserved: max |P(adapter) - P(merged)| = {diff:.2e}")
    assert diff <= TOLERANCE, (adapter_p, merged_p)
    # the merged model is the adapted one: its probabilities are not the base's zero-shot ones
    assert merged.record["parity"]["adapter_effect"]["label_probability_max_diff"] > 10 * TOLERANCE
