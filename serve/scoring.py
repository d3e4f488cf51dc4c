"""Label scoring through vLLM, exactly as the trainer's evaluation scores (train/evaluate.py).

For an input and a classification adapter:
  prompt_ids = labels.prompt_ids(tokenizer, chat_format, prompt_template, record)
  cont_ids = labels.label_continuations(tokenizer, manifest)  (once per adapter version)
  score[label] = sum of log P(cont token | prompt, earlier cont tokens)
  probabilities = labels.probabilities(score)        (softmax over the label set)
The trainer builds its ids with the same functions, from the base model's own HF tokenizer, and
the ids are sent to vLLM as token ids, so the tokens are the trainer's tokens.

One way for every label set: the label continuations form a trie, and every node of it with
children is one query row, prompt + the node's prefix, asked for `max_tokens=1` with
`logprob_token_ids` = the tokens that may follow. vLLM returns the raw log-softmax of exactly
those ids at the next position. Single-token labels are one row per input (the trie's root);
a label of k tokens adds rows for its first k-1 prefixes, shared with the labels that share
them. The root rows go first and the deeper rows after them, so that the deeper rows find the
prompt in vLLM's prefix cache. `prompt_logprobs` is never used: it bypasses the prefix cache
and it is the request that crashed vLLM 0.32's CPU LoRA ops.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from lorastack.adapters import ensembles
from lorastack.adapters import labels as label_scoring
from lorastack.adapters.ensembles import EnsembleManifest
from lorastack.serve.engine import EngineError
from lorastack.serve.protocol import (
    ApiError,
    Classification,
    ClassifyResponse,
    ClassifyUsage,
    LabelScore,
    MemberAnswer,
)
from lorastack.serve.registry import MergedBase, Served


class Tokenizer:
    """The base model's HF tokenizer, loaded on first use (transformers is slow to import)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._tok = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._tok is None:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(str(self.model_dir))
            return self._tok

    def encode(self, text: str) -> list[int]:
        return label_scoring.token_ids(self.get(), text)

    def chat_length(self, messages: list[dict]) -> int:
        ids = self.get().apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)


MAX_TOKEN_IDS = 128  # vLLM's bound on logprob_token_ids per request (MAX_LOGPROB_TOKEN_IDS)


@dataclass
class Rows:
    """What one adapter sends to vLLM for a batch of inputs."""

    labels: list[str]
    prompts: list[list[int]]  # one per input
    conts: dict[str, list[int]]  # label -> continuation ids

    def prefixes(self) -> list[tuple[int, ...]]:
        """The trie's nodes with children: every proper prefix of a continuation, root first."""
        nodes = {tuple(c[:k]) for c in self.conts.values() for k in range(len(c))}
        return sorted(nodes, key=lambda p: (len(p), p))

    def prompt_tokens(self) -> int:
        n = len(self.prompts)
        return sum(map(len, self.prompts)) * len(self.prefixes()) + \
            n * sum(map(len, self.prefixes()))


class PromptTooLong(ValueError):
    """An input's prompt, with the longest label continuation, is over max_prompt_tokens."""


def build_rows(tok: Tokenizer, served: Served, records: Sequence[dict],
               max_prompt_tokens: int) -> Rows:
    """The adapter version's rows for `records`; raises PromptTooLong."""
    manifest, hf = served.manifest, tok.get()
    if served.continuations is None:  # tokenized once per adapter version (it is immutable)
        served.continuations = label_scoring.label_continuations(hf, manifest)
    conts = served.continuations
    longest = max(map(len, conts.values()))
    prompts = []
    for i, record in enumerate(records):
        ids = label_scoring.prompt_ids(hf, manifest.chat_format, manifest.prompt_template, record)
        if len(ids) + longest > max_prompt_tokens:
            raise PromptTooLong(f"input {i} is {len(ids) + longest} tokens once put in adapter "
                                f"{manifest.name!r}'s prompt (with the longest label); the limit "
                                f"is {max_prompt_tokens}. Shorten the text.")
        prompts.append(ids)
    return Rows(list(manifest.labels), prompts, conts)


Send = Callable[[dict], Awaitable[httpx.Response]]  # one /v1/completions body to the engine


async def score(send: Send, identity: str, rows: Rows) -> list[dict[str, float]]:
    """Per input, label -> summed log-probability of its continuation."""
    prefixes = rows.prefixes()
    wanted: dict[tuple[int, ...], set[int]] = {p: set() for p in prefixes}
    for cont in rows.conts.values():
        for k, token in enumerate(cont):
            wanted[tuple(cont[:k])].add(token)
    # (input, prefix) -> {token id: logprob}; the root rows first (they fill the prefix cache)
    got: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {}
    for depth_rows in (prefixes[:1], prefixes[1:]):
        if depth_rows:
            got.update(await _query(send, identity, rows.prompts, depth_rows, wanted))
    return [{label: sum(got[(i, tuple(cont[:k]))][token] for k, token in enumerate(cont))
             for label, cont in rows.conts.items()} for i in range(len(rows.prompts))]


async def _query(send: Send, identity: str, prompts: list[list[int]],
                 prefixes: list[tuple[int, ...]], wanted: dict[tuple[int, ...], set[int]]):
    """One completions request per chunk of at most MAX_TOKEN_IDS token ids."""
    ids = sorted(set().union(*(wanted[p] for p in prefixes)))
    out: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {}
    for start in range(0, len(ids), MAX_TOKEN_IDS):
        chunk = ids[start:start + MAX_TOKEN_IDS]
        keys = [(i, p) for i in range(len(prompts)) for p in prefixes
                if wanted[p] & set(chunk)]
        body = {"model": identity, "prompt": [prompts[i] + list(p) for i, p in keys],
                "max_tokens": 1, "temperature": 0, "logprobs": 1, "logprob_token_ids": chunk,
                "return_tokens_as_token_ids": True}
        for key, choice in zip(keys, await _complete(send, body, len(keys)), strict=True):
            top = choice["logprobs"]["top_logprobs"][0]
            found = out.setdefault(key, {})
            for token in wanted[key[1]] & set(chunk):
                found[token] = _lookup(top, f"token_id:{token}")
    return out


async def _complete(send: Send, body: dict, expected: int) -> list[dict]:
    response = await send(body)
    if response.status_code != 200:
        raise EngineError(f"vLLM could not score the labels: {response.text[:500]}", 502)
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    if len(choices) != expected:
        raise EngineError(f"vLLM answered {len(choices)} rows for {expected}", 502)
    return choices


def _lookup(entry: dict, key: str) -> float:
    value = entry.get(key)
    if value is None:
        raise EngineError(f"vLLM's answer lacks the log-probability of token {key}", 502)
    return value["logprob"] if isinstance(value, dict) else float(value)



def check_batch(records: Sequence[dict], limit: int) -> None:
    """400 when a /v1/classify request holds more inputs than `limit`."""
    if len(records) > limit:
        raise ApiError(400, f"{len(records)} inputs is over the batch limit {limit}; split the "
                       f"request", "batch_too_large", "input")


def check_classifiers(members: Sequence[Served | MergedBase],
                      records: Sequence[dict]) -> list[str]:
    """The label set the members share, after refusing what /v1/classify cannot score: a
    generation adapter (400), a record without a field a prompt template fills in (422),
    members with different label sets (400). The gateway's route and the replicas' use it."""
    for served in members:
        if served.manifest.task != "classification":
            raise ApiError(400, f"{served.name!r} is a {served.manifest.task} adapter; "
                           f"/v1/classify needs classification adapters (use /v1/completions "
                           f"for generation)", "not_a_classifier", "model")
    for served in members:
        needed = label_scoring.template_fields(served.manifest.prompt_template)
        for i, record in enumerate(records):
            missing = [f for f in needed if f not in record]
            if missing:
                template = served.manifest.prompt_template
                raise ApiError(422, f"input {i} lacks the field(s) {', '.join(missing)}: "
                               f"adapter {served.name!r} builds its prompt from {template!r}; "
                               f"send records with {', '.join(needed)} (a plain string is "
                               f"{{\"text\": ...}})", "missing_field", "input")
    labels = list(members[0].manifest.labels)
    for served in members[1:]:
        if set(served.manifest.labels) != set(labels):
            raise ApiError(400, f"an ensemble needs one label set: {members[0].name!r} has "
                           f"{labels}, {served.name!r} has {list(served.manifest.labels)}",
                           "label_sets_differ", "model")
    return labels


Answer = tuple[int, list[dict[str, float]]]  # one model's prompt tokens, per-input probabilities


def classify_response(model: str, labels: list[str], models: list[str], answers: list[Answer],
                      n_inputs: int, top_k: int | None,
                      ensemble: EnsembleManifest | None = None) -> ClassifyResponse:
    """The /v1/classify answer from each model's probabilities: one model's, a stored
    ensemble's mixture, or the plain mean of several (each member's answer beside it). The
    gateway and the vLLM replicas' route (vllm_plugin/endpoint.py) answer through it."""
    data = []
    for i in range(n_inputs):
        per_member = {name: {lab: probs[i][lab] for lab in labels}
                      for name, (_, probs) in zip(models, answers, strict=True)}
        probs = ensembles.mixture(per_member, ensemble.weights, ensemble.temperature) \
            if ensemble is not None else label_scoring.ensemble(list(per_member.values()))
        ranked = sorted(labels, key=lambda lab: -probs[lab])[:top_k or len(labels)]
        data.append(Classification(
            index=i, label=label_scoring.predict(probs), probabilities=probs,
            top=[LabelScore(label=lab, probability=probs[lab]) for lab in ranked],
            members={name: MemberAnswer(label=label_scoring.predict(p), probabilities=p)
                     for name, p in per_member.items()} if len(models) > 1 else None))
    tokens = sum(t for t, _ in answers)
    return ClassifyResponse(model=model, labels=labels, data=data,
                            usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens))
