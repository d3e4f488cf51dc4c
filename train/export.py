"""`lorastack export ADAPTER --merged DIR`: an adapter merged into its float base, as a plain model.

The result is an ordinary transformers directory (config.json, *.safetensors, tokenizer, chat
template) that any tool loads: plain vLLM serves it with no LoRA at all, `lorastack serve --base
DIR` as a base model with no adapter in the request path. Its lorastack-export.json says what
went in (adapter, content hash, base fingerprint, library versions, the adapter's manifest) and
what came out: a parity check of the merged model read back from disk against the float base
with the adapter applied, on prompts rendered as the adapter was trained (its manifest's
examples). A classification adapter is compared the way it is used, label probabilities through
the trainer's and the server's scoring (adapters/labels.py, train/evaluate.py); every adapter is
also compared on its next-token distributions. A difference above PARITY_TOLERANCE fails the
export and leaves DIR untouched.

The directory is written to a hidden staging directory beside DIR and renamed into place, so a
reader (a server starting on it) sees the whole model or none.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from lorastack.adapters import labels as label_scoring
from lorastack.adapters.cli import StoreOption, console, fail
from lorastack.adapters.files import EXPORT_FILE, MANIFEST_FILE, PICKLE_SUFFIXES, check_base
from lorastack.adapters.fsutil import atomic_write_json, staging_dir, utc_now
from lorastack.adapters.manifest import AdapterError, AdapterManifest
from lorastack.adapters.models import META_FILE, ModelError, hash_safetensors, resolve_base
from lorastack.adapters.provenance import library_versions
from lorastack.adapters.store import AdapterStore

PARITY_TOLERANCE = 1e-4  # max |P(merged) - P(base + adapter)|, per label and per next token
PARITY_PROMPTS = 4  # how many of the manifest's examples the check renders
# Used when a manifest carries no examples (an imported adapter): short, varied inputs.
FALLBACK_TEXTS = ("It worked well and I had no side effects.",
                  "Terrible. It made my headaches worse and I stopped after a week.",
                  "Some days are better than others; hard to say if it helps.",
                  "The doctor changed my dose twice.")


class ExportError(RuntimeError):
    """The merged model could not be written, or it does not behave as the adapter does."""


@dataclass
class _Scoring:
    """What train/evaluate.label_logprob_sums reads of a PromptFormat: the label continuations
    (built here exactly as the server builds them, from the manifest) and the padding id."""

    labels: list[str]
    continuations: dict[str, list[int]]
    pad_id: int


def export_merged(adapter_name: str, out_dir: str | Path, store: str | Path | None = None, *,
                  replace: bool = False) -> dict[str, Any]:
    """Merge adapter `adapter_name` of `store` into its float base and write it to `out_dir`.

    Returns what lorastack-export.json records. Raises AdapterError (unknown or broken adapter,
    base mismatch), ModelError (base not available) or ExportError (DIR not empty without
    `replace`, parity above PARITY_TOLERANCE); DIR is then as it was.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, replace)  # before anything loads
    started = time.monotonic()
    store = AdapterStore(store)
    if out_dir.is_relative_to(store.root.expanduser().absolute()):
        raise ExportError(f"{out_dir} is inside the adapter store {store.root}, which holds "
                          f"adapters only; give --merged a directory outside it")
    adapter = store.resolve(adapter_name)
    manifest = adapter.manifest
    base = resolve_base(manifest.base_model)
    check_base(manifest, base.fingerprint, adapter.path / MANIFEST_FILE)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    prompts = _parity_prompts(tokenizer, manifest)
    scoring = _label_scoring(tokenizer, manifest)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter.path))  # safetensors: resolve checked
    model.eval()
    with model.disable_adapter():
        base_out = _outputs(model, prompts, scoring)
    adapter_out = _outputs(model, prompts, scoring)
    merged = model.merge_and_unload(safe_merge=True)  # in place: one copy of the weights
    del model
    aside = None
    with staging_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged
        _share(tmp)
        _check_files(tmp)
        # read back what was written: the parity is of the files, not of the model in memory
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        merged_out = _outputs(reloaded, prompts, scoring)
        del reloaded
        parity = _parity(base_out, adapter_out, merged_out, len(prompts))
        fingerprint = hash_safetensors(tmp)
        record = {
            "adapter": manifest.name, "adapter_content_hash": adapter.content_hash(),
            "task": manifest.task, "base_model": manifest.base_model,
            "base_fingerprint": manifest.base_fingerprint, "merged_fingerprint": fingerprint,
            "lora": manifest.lora.model_dump(mode="json"),
            "trained_quantization": manifest.training.get("quantization", "unknown"),
            "dtype": "float32", "parity": parity,
            # how to prompt (and score) the merged model as the adapter was trained; the
            # gateway classifies with it (serve/registry.py merged_classifier)
            "manifest": manifest.model_dump(mode="json"),
            "versions": library_versions(),
            "created_at": utc_now(),
            "seconds": round(time.monotonic() - started, 1),
        }
        atomic_write_json(tmp / EXPORT_FILE, record)
        # what resolve_base reads for a directory: the fingerprint without hashing it again
        atomic_write_json(tmp / META_FILE, {"fingerprint": fingerprint, "merged_from": {
            "adapter": manifest.name, "content_hash": record["adapter_content_hash"],
            "base_fingerprint": manifest.base_fingerprint}})
        if not parity["passed"]:
            raise ExportError(
                f"the merged model does not match adapter {manifest.name!r} on its base: max "
                f"label-probability difference {parity['label_probability_max_diff']}, max "
                f"next-token probability difference {parity['token_probability_max_diff']} "
                f"(tolerance {PARITY_TOLERANCE}); nothing was written to {out_dir}")
        aside = _clear_target(out_dir, replace)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return record


# -- the target directory ----------------------------------------------------------------------

def _check_target(out_dir: Path, replace: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory; give --merged a new "
                          f"directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not replace:
        raise ExportError(f"{out_dir} exists and is not empty; pass --replace to overwrite it, "
                          f"or give --merged a new directory")


def _clear_target(out_dir: Path, replace: bool) -> Path | None:
    """Make room for the rename: remove an empty DIR, move a replaced one aside (returned, to
    delete once the new one is in place)."""
    _check_target(out_dir, replace)  # again: it may have changed while we merged
    if not out_dir.exists():
        return None
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        return None
    aside = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(out_dir, aside)
    return aside


def _share(directory: Path) -> None:
    """The usual file mode (safetensors writes its files 0600): the model is for other tools
    and other users too."""
    mask = os.umask(0)
    os.umask(mask)
    for file in directory.iterdir():
        os.chmod(file, 0o666 & ~mask)


def _check_files(directory: Path) -> None:
    names = [p.name for p in directory.iterdir()]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles or not any(n.endswith(".safetensors") for n in names):
        raise ExportError(f"the saved model is not safetensors only (files: {sorted(names)})")
    if not (directory / "config.json").is_file():
        raise ExportError("the saved model has no config.json")
    if not _has_chat_template(directory):
        raise ExportError("the base model's tokenizer carries no chat template to export")


def _has_chat_template(directory: Path) -> bool:
    import json

    if (directory / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template"))


# -- the parity check --------------------------------------------------------------------------

def _parity_prompts(tokenizer: Any, manifest: AdapterManifest) -> list[list[int]]:
    """Prompt token ids as the adapter was trained and is served: its examples in its template,
    inside its chat format (adapters/labels.py)."""
    texts = list(manifest.examples[:PARITY_PROMPTS]) or list(FALLBACK_TEXTS)
    fields = label_scoring.template_fields(manifest.prompt_template) or ["text"]
    return [label_scoring.prompt_ids(tokenizer, manifest.chat_format, manifest.prompt_template,
                                     {fields[0]: text}) for text in texts]


def _label_scoring(tokenizer: Any, manifest: AdapterManifest) -> _Scoring | None:
    if manifest.task != "classification":
        return None
    return _Scoring(list(manifest.labels), label_scoring.label_continuations(tokenizer, manifest),
                    label_scoring.pad_id(tokenizer))


def _outputs(model: Any, prompts: list[list[int]], scoring: _Scoring | None) -> dict[str, Any]:
    """Per prompt: the logits at every position, and (classification) label probabilities."""
    import torch

    from lorastack.train.evaluate import label_logprob_sums
    from lorastack.train.examples import IGNORE, Example

    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in prompts]
    out: dict[str, Any] = {"logits": logits, "labels": None}
    if scoring is not None:
        examples = [Example(ids, [IGNORE] * len(ids), i, prompt_len=len(ids))
                    for i, ids in enumerate(prompts)]
        sums = label_logprob_sums(model, scoring, examples)
        out["labels"] = [label_scoring.probabilities(dict(zip(scoring.labels, row)))
                         for row in sums]
    return out


def _parity(base: dict, adapter: dict, merged: dict, n_prompts: int) -> dict[str, Any]:
    """Max differences merged vs base + adapter; the adapter's own effect (adapter vs base) is
    recorded beside them, so that a reader sees the check compares models that differ."""
    def token_diff(a: dict, b: dict) -> float:
        return max(float((x.softmax(-1) - y.softmax(-1)).abs().max())
                   for x, y in zip(a["logits"], b["logits"]))

    def label_diff(a: dict, b: dict) -> float | None:
        if a["labels"] is None:
            return None
        return max(abs(p[k] - q[k]) for p, q in zip(a["labels"], b["labels"]) for k in p)

    logit_diff = max(float((x - y).abs().max()) for x, y in zip(merged["logits"],
                                                                adapter["logits"]))
    found = {
        "prompts": n_prompts, "tolerance": PARITY_TOLERANCE,
        "label_probability_max_diff": label_diff(merged, adapter),
        "token_probability_max_diff": token_diff(merged, adapter),
        "logit_max_diff": logit_diff,
        "adapter_effect": {"label_probability_max_diff": label_diff(adapter, base),
                           "token_probability_max_diff": token_diff(adapter, base)},
        "adapter_label_probabilities": adapter["labels"],
        "merged_label_probabilities": merged["labels"],
    }
    checked = [v for v in (found["label_probability_max_diff"],
                           found["token_probability_max_diff"]) if v is not None]
    found["passed"] = all(v <= PARITY_TOLERANCE for v in checked)
    return found


# -- the command -------------------------------------------------------------------------------

def export_command(
    adapter: str = typer.Argument(..., help="adapter name in the store"),
    merged: Path = typer.Option(  # noqa: B008 (typer's idiom)
        ..., "--merged", help="directory to write the merged model to (new, or empty unless "
        "--replace)"),
    store: Path | None = StoreOption,
    replace: bool = typer.Option(False, "--replace", help="overwrite a non-empty --merged "
                                 "directory (the old one stays until the new one is whole)"),
) -> None:
    """Merge an adapter into its float base: a plain safetensors model that vLLM serves."""
    try:
        record = export_merged(adapter, merged, store, replace=replace)
    except (AdapterError, ModelError, ExportError) as exc:
        raise fail(exc) from exc
    parity = record["parity"]
    label = parity["label_probability_max_diff"]
    what = (f"label probabilities within {label:.1e}" if label is not None else
            f"next-token probabilities within {parity['token_probability_max_diff']:.1e}")
    size = sum(p.stat().st_size for p in Path(merged).glob("*.safetensors")) / 2**20
    console.print(f"merged [bold]{record['adapter']}[/bold] into {merged} ({size:.0f} MB, "
                  f"{record['seconds']:.0f} s); parity on {parity['prompts']} prompts: {what} "
                  f"(tolerance {PARITY_TOLERANCE:g}). Serve it: lorastack serve --base {merged}")
