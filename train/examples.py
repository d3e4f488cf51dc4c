"""Records -> token examples: prompt through the chat template, answer + end-of-turn, masks.

The loss falls on the answer tokens only: prompt positions carry the label -100. The prompt is
the base model's chat template rendered around the user message (see adapters/labels.py), and
the answer ends with the template's end-of-turn token, checked present in every example.
"""

from __future__ import annotations

import random
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lorastack.adapters import labels as label_scoring
from lorastack.train.config import TrainConfig
from lorastack.train.data import DataError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt positions
    row: int  # index of the record in its split (for messages)
    label: int = -1  # classification: index into the label set
    answer: str = ""  # generation: the reference answer
    prompt_len: int = 0


@dataclass
class Encoded:
    examples: list[Example]
    truncated: int = 0
    dropped: int = 0  # generation records without an answer
    label_counts: Counter = field(default_factory=Counter)


class PromptFormat:
    """How a task turns a record into prompt text and answer text for one tokenizer."""

    def __init__(self, tokenizer: Any, cfg: TrainConfig, labels: list[str] | None = None):
        self.tok = tokenizer
        self.cfg = cfg
        self.task = cfg.task
        self.labels = labels or []
        self.words = label_scoring.label_words(self.labels, self.task.label_words)
        self.chat_format, self.end_of_turn = chat_format(tokenizer, self.task.system)
        self.end_id = _single_token(tokenizer, self.end_of_turn)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else self.end_id
        # Trained: word + end-of-turn, so that generation stops. Scored: the word alone, unless
        # one label's tokens are a prefix of another's (then end-of-turn tells them apart).
        self.targets = self.label_ids(with_end=True)
        self.score_end = _prefix_ambiguous(list(self.label_ids(with_end=False).values()))
        self.continuations = self.label_ids(self.score_end)

    def label_ids(self, with_end: bool) -> dict[str, list[int]]:  # as the server builds them
        return label_scoring.continuation_ids(self.tok, self.words, self.end_of_turn, with_end)

    def follow(self, manifest) -> None:
        """Score as the adapter's manifest says (as the server does)."""
        self.chat_format = manifest.chat_format
        if self.labels:
            self.score_end = manifest.score_end_of_turn
            self.continuations = self.label_ids(self.score_end)

    def encode(self, text: str) -> list[int]:
        return label_scoring.token_ids(self.tok, text)

    def prompt_ids(self, record: dict) -> list[int]:
        """The prompt's token ids; a template task's as the server builds them (adapters/labels)."""
        if self.task.messages_field:
            return self.encode(self.prompt_text(record))
        return label_scoring.prompt_ids(self.tok, self.chat_format, self.task.prompt, record)

    def prompt_text(self, record: dict) -> str:
        if self.task.messages_field:
            messages = record[self.task.messages_field][:-1]
            if self.task.system and messages and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": self.task.system}] + messages
            return self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
        return label_scoring.render_prompt(self.chat_format, self.task.prompt, record)

    def answer_text(self, record: dict) -> str | None:
        if self.task.messages_field:
            last = record[self.task.messages_field][-1]
            return last.get("content") if last.get("role") == "assistant" else None
        value = record.get(self.task.target_field)
        return None if value is None or str(value).strip() == "" else str(value).strip()

    def check_fields(self, record: dict, where: str) -> None:
        """Refuse a template that names fields the data does not have (before any training)."""
        if self.task.messages_field:
            if self.task.messages_field not in record:
                raise DataError(f"{where}: no field {self.task.messages_field!r} "
                                f"(task.messages_field); fields: {sorted(record)}")
            return
        names = {f for _, f, _, _ in string.Formatter().parse(self.task.prompt) if f}
        wanted = names | ({self.task.label_field} if self.task.type == "classification"
                          else {self.task.target_field})
        missing = sorted(n for n in wanted if n not in record)
        if missing:
            raise DataError(f"{where}: task refers to field(s) {missing} that the records do not "
                            f"have (fields: {', '.join(sorted(record))}). Fix task.prompt / "
                            f"task.label_field / task.target_field or data.columns.")


def chat_format(tokenizer: Any, system: str | None) -> tuple[str, str]:
    """The chat template rendered around the slot {input}, and the end-of-turn marker text."""
    sentinel, answer = "\u241fLORASTACK\u241f", "\u241fANSWER\u241f"
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": sentinel})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": answer}], tokenize=False)
    tail = full.split(answer, 1)[1]
    end = tail.strip().split("\n")[0].strip() or tokenizer.eos_token
    return prompt.replace(sentinel, label_scoring.INPUT_SLOT), end


def _prefix_ambiguous(seqs: list[list[int]]) -> bool:
    return any(a != b and a == b[:len(a)] for a in seqs for b in seqs)


def _single_token(tokenizer: Any, text: str) -> int:
    ids = label_scoring.token_ids(tokenizer, text)
    if len(ids) != 1:
        raise DataError(f"the chat template's end-of-turn {text!r} is not one token ({ids}); "
                        f"lorastack needs it to end every answer")
    return ids[0]


def encode_records(fmt: PromptFormat, records: list[dict], split: str, *,
                   augment_seed: int | None = None) -> Encoded:
    """Tokenize records into examples; refuse rows left with no answer token."""
    cfg = fmt.cfg
    out = Encoded([])
    no_target_rows = []
    rng = random.Random(augment_seed) if augment_seed is not None else None
    label_index = {label: i for i, label in enumerate(fmt.labels)}
    if records:
        fmt.check_fields(records[0], f"{split} row 0")
    for row, record in enumerate(records):
        if cfg.task.type == "classification":
            raw = record.get(cfg.task.label_field)
            label = None if raw is None else str(raw).strip()
            if label not in label_index:
                raise DataError(f"{split} row {row}: label {raw!r} is not in the label set "
                                f"{fmt.labels}; fix the data or task.labels")
            target = fmt.targets[label]
            answer = label
        else:
            answer = fmt.answer_text(record)
            if answer is None:
                out.dropped += 1
                continue
            target = fmt.encode(answer) + [fmt.end_id]
        if rng is not None and cfg.data.augment == "word_dropout":
            record = _word_dropout(record, cfg.data.text_field, cfg.data.augment_prob, rng)
        prompt_ids, cut = _fit_prompt(fmt, record, len(target))
        out.truncated += cut
        room = cfg.data.max_length - len(prompt_ids)
        if room < 1:
            no_target_rows.append(row)
            continue
        target = target[:room]
        if target[-1] != fmt.end_id and cfg.task.type == "generation":
            out.truncated += 1
        ex = Example(prompt_ids + target, [IGNORE] * len(prompt_ids) + target, row,
                     answer=answer, prompt_len=len(prompt_ids))
        if cfg.task.type == "classification":
            ex.label = label_index[label]
            out.label_counts[label] += 1
        out.examples.append(ex)
    if no_target_rows:
        shown = ", ".join(map(str, no_target_rows[:20]))
        raise DataError(f"{split}: {len(no_target_rows)} example(s) have no answer token left "
                        f"after the prompt at data.max_length={cfg.data.max_length} (rows "
                        f"{shown}{' ...' if len(no_target_rows) > 20 else ''}). Raise "
                        f"data.max_length or shorten task.prompt.")
    return out


def _fit_prompt(fmt: PromptFormat, record: dict, target_len: int) -> tuple[list[int], int]:
    """Prompt token ids, with the text field cut so that prompt + answer fit max_length."""
    limit = fmt.cfg.data.max_length - target_len
    field_name = fmt.cfg.data.text_field
    ids = fmt.prompt_ids(record)
    if len(ids) <= limit or field_name not in record or fmt.task.messages_field:
        return ids, int(len(ids) > limit)
    text_ids = fmt.encode(str(record[field_name] or ""))
    for _ in range(4):  # re-tokenizing across the cut can shift a token or two
        over = len(ids) - limit
        if over <= 0:
            break
        text_ids = text_ids[:max(0, len(text_ids) - over - 2)]
        shorter = dict(record, **{field_name: fmt.tok.decode(text_ids) + " ..."})
        ids = fmt.prompt_ids(shorter)
    return ids, 1


def _word_dropout(record: dict, field_name: str, prob: float, rng: random.Random) -> dict:
    words = str(record.get(field_name) or "").split()
    kept = [w for w in words if rng.random() >= prob] or words
    return dict(record, **{field_name: " ".join(kept)})


def infer_labels(records: list[dict], field_name: str) -> list[str]:
    """The label set, read from training records, most frequent first (ties by name)."""
    counts = Counter(str(r.get(field_name)).strip() for r in records
                     if r.get(field_name) is not None)
    if len(counts) < 2:
        raise DataError(f"found {len(counts)} distinct value(s) in field {field_name!r}; a "
                        f"classification task needs at least two labels")
    return [label for label, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
