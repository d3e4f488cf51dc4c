"""Label scoring through vLLM, exactly as the trainer's evaluation scores (train/evaluate.py).

For an input and a classification adapter:
  prompt_ids = tokenizer(render_prompt(chat_format, prompt_template, record)), no special tokens
  cont_ids[label] = tokenizer(label_word(label)) (+ the end-of-turn id if score_end_of_turn)
  score[label] = sum of log P(cont token | prompt, earlier cont tokens)
  probabilities = labels.probabilities(score)        (softmax over the label set)
Prompts and continuations are tokenized separately, with the base model's own HF tokenizer, and
sent to vLLM as token ids, so the tokens are the trainer's tokens.

Two ways to get the log-probabilities from vLLM's /v1/completions:
- every continuation is one token (the usual case): one row per input, the prompt alone,
  `max_tokens=1` and `logprob_token_ids=[label token ids]`: vLLM returns the raw log-softmax of
  exactly those ids at the next position. One forward per input, and prefix caching applies.
- otherwise: one row per (input, label), prompt + continuation, `prompt_logprobs=0`: vLLM
  returns the log-probability of every prompt token; the continuation's are summed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorastack.adapters import labels as label_scoring
from lorastack.adapters.manifest import AdapterManifest
from lorastack.serve.engine import Engine
from lorastack.serve.protocol import ApiError


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
        return self.get()(text, add_special_tokens=False)["input_ids"]

    def chat_length(self, messages: list[dict]) -> int:
        ids = self.get().apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)


@dataclass
class Rows:
    """What one adapter sends to vLLM for a batch of inputs."""

    labels: list[str]
    prompts: list[list[int]]  # one per input
    conts: dict[str, list[int]]  # label -> continuation ids

    @property
    def single_token(self) -> bool:
        return all(len(c) == 1 for c in self.conts.values())

    def prompt_tokens(self) -> int:
        if self.single_token:
            return sum(map(len, self.prompts))
        return sum(len(p) * len(self.labels) for p in self.prompts) + \
            len(self.prompts) * sum(map(len, self.conts.values()))


def build_rows(tok: Tokenizer, manifest: AdapterManifest, records: Sequence[dict],
               max_prompt_tokens: int) -> Rows:
    labels = list(manifest.labels)
    conts = {}
    end_ids = tok.encode(manifest.end_of_turn) if manifest.score_end_of_turn else []
    for label in labels:
        conts[label] = tok.encode(manifest.label_word(label)) + end_ids
    longest = max(map(len, conts.values()))
    prompts = []
    for i, record in enumerate(records):
        text = label_scoring.render_prompt(manifest.chat_format, manifest.prompt_template, record)
        ids = tok.encode(text)
        if len(ids) + longest > max_prompt_tokens:
            raise ApiError(400, f"input {i} is {len(ids) + longest} tokens once put in adapter "
                           f"{manifest.name!r}'s prompt (with the longest label); the limit is "
                           f"{max_prompt_tokens}. Shorten the text.", "prompt_too_long", "input")
        prompts.append(ids)
    return Rows(labels, prompts, conts)


async def score(engine: Engine, identity: str, rows: Rows) -> list[dict[str, float]]:
    """Per input, label -> summed log-probability of its continuation."""
    if rows.single_token:
        ids = {label: c[0] for label, c in rows.conts.items()}
        body = {"model": identity, "prompt": rows.prompts, "max_tokens": 1, "temperature": 0,
                "logprobs": 1, "logprob_token_ids": sorted(set(ids.values())),
                "return_tokens_as_token_ids": True}
        choices = await _complete(engine, body, len(rows.prompts))
        out = []
        for choice in choices:
            top = choice["logprobs"]["top_logprobs"][0]
            out.append({label: _lookup(top, f"token_id:{tid}") for label, tid in ids.items()})
        return out
    flat = [p + rows.conts[label] for p in rows.prompts for label in rows.labels]
    body = {"model": identity, "prompt": flat, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 0}
    choices = await _complete(engine, body, len(flat))
    out, n = [], len(rows.labels)
    for i in range(len(rows.prompts)):
        sums = {}
        for j, label in enumerate(rows.labels):
            cont = rows.conts[label]
            positions = choices[i * n + j]["prompt_logprobs"][-len(cont):]
            sums[label] = sum(_lookup(pos, str(tid)) for pos, tid in zip(positions, cont))
        out.append(sums)
    return out


async def _complete(engine: Engine, body: dict, expected: int) -> list[dict]:
    response = await engine.post_json("/v1/completions", body)
    if response.status_code != 200:
        raise ApiError(502, f"vLLM could not score the labels: {response.text[:500]}",
                       "engine_error")
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    if len(choices) != expected:
        raise ApiError(502, f"vLLM answered {len(choices)} rows for {expected}", "engine_error")
    return choices


def _lookup(entry: dict, key: str) -> float:
    value = entry.get(key)
    if value is None:
        raise ApiError(502, f"vLLM's answer lacks the log-probability of token {key}",
                       "engine_error")
    return value["logprob"] if isinstance(value, dict) else float(value)

