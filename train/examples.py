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

from jinja2 import TemplateError

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
        self.chat_format, self.end_of_turn, self.prompt_format = chat_format(
            tokenizer, self.task.system, self.task.format)
        # whether the template renders a system turn: asked once, not once per record
        self.system_turn = bool(self.task.system) and self.prompt_format == "chat" and \
            renders_system(tokenizer)
        if self.task.messages_field and self.prompt_format == "plain":
            raise DataError("task.messages_field renders chat messages with the chat template, "
                            "and this base model's tokenizer has none (or task.format=plain); "
                            "use a task.prompt template with task.target_field instead")
        self.end_id = _single_token(tokenizer, self.end_of_turn)
        self.pad_id = label_scoring.pad_id(tokenizer, self.end_id)
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
        self.prompt_format = manifest.prompt_format
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
            messages = system_messages(self.tok, self.task.system,
                                       record[self.task.messages_field][:-1], self.system_turn)
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


def chat_format(tokenizer: Any, system: str | None,
                prompt_format: str = "auto") -> tuple[str, str, str]:
    """The prompt around the slot {input}, the end-of-turn text, and the format used.

    "chat": the tokenizer's chat template rendered around the slot (a system message folded
    into the first user turn when the template has no system role); "plain": the prompt as
    written, preceded by the tokenizer's BOS where it adds one, and the answer ended by EOS
    (a base model without a chat template). "auto" is chat when the tokenizer has a template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        prompt_format = "chat" if has_template else "plain"
    if prompt_format == "plain":
        return _plain_format(tokenizer, system)
    if not has_template:
        raise DataError("task.format=chat, but the base model's tokenizer has no chat template "
                        "(a pretrained, not instruction-tuned model); set task.format: plain "
                        "(or auto, which picks plain for such models)")
    sentinel, answer = "\u241fLORASTACK\u241f", "\u241fANSWER\u241f"
    messages = system_messages(tokenizer, system, [{"role": "user", "content": sentinel}])
    try:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=False)
    except TEMPLATE_ERRORS as exc:  # raised by the template itself (raise_exception)
        raise DataError(f"the base model's chat template cannot render a user turn and an "
                        f"answer ({type(exc).__name__}: {exc}); set task.format: plain") from None
    if sentinel not in prompt or answer not in full:
        raise DataError("the base model's chat template drops the user or assistant text; "
                        "set task.format: plain")
    tail = full.split(answer, 1)[1]
    end = tail.strip().split("\n")[0].strip() or tokenizer.eos_token
    return prompt.replace(sentinel, label_scoring.INPUT_SLOT), end, "chat"


# what a chat template raises on messages it refuses (raise_exception) or cannot render
TEMPLATE_ERRORS = (TemplateError, TypeError, KeyError, ValueError, IndexError)


def _plain_format(tokenizer: Any, system: str | None) -> tuple[str, str, str]:
    if not tokenizer.eos_token:
        raise DataError("task.format=plain needs an end-of-sequence token to end answers, and "
                        "the base model's tokenizer has none (eos_token); use a tokenizer "
                        "that defines one")
    bos = tokenizer.bos_token or ""
    if bos and tokenizer.bos_token_id not in tokenizer("a")["input_ids"]:
        bos = ""  # this tokenizer does not put BOS in front of text: neither do we
    head = f"{system}\n\n" if system else ""
    return bos + head + label_scoring.INPUT_SLOT, tokenizer.eos_token, "plain"


def system_messages(tokenizer: Any, system: str | None, messages: list[dict],
                    system_turn: bool | None = None) -> list[dict]:
    """`messages` with the system text in front: as a system turn when the chat template
    renders one, else folded into the first user turn (Gemma's and Mistral's templates raise
    on a system role, others drop it silently). `system_turn`: renders_system(tokenizer),
    when the caller already knows it."""
    if not system or (messages and messages[0].get("role") == "system"):
        return messages
    if system_turn is None:
        system_turn = renders_system(tokenizer)
    if system_turn:
        return [{"role": "system", "content": system}] + messages
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("role") == "user":
            m["content"] = f"{system}\n\n{m.get('content', '')}"
            break
    return out


def renders_system(tokenizer: Any) -> bool:
    mark = "\u241fSYSTEM\u241f"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": mark}, {"role": "user", "content": "x"}],
            tokenize=False, add_generation_prompt=True)
    except TEMPLATE_ERRORS:  # the template raises on a system role
        return False
    return mark in text


def _prefix_ambiguous(seqs: list[list[int]]) -> bool:
    return any(a != b and a == b[:len(a)] for a in seqs for b in seqs)


def _single_token(tokenizer: Any, text: str) -> int:
    ids = label_scoring.token_ids(tokenizer, text)
    if len(ids) != 1:
        raise DataError(f"the chat template's end-of-turn {text!r} is not one token ({ids}); "
                        f"lorastack needs one token to end every answer: add it to the "
                        f"tokenizer as a special token, or set task.format: plain (answers "
                        f"then end with the EOS token)")
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
