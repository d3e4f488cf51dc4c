"""Evaluation. Classification scores every label (never samples) through adapters/labels.py,
the same normalisation the server's /v1/classify uses; generation decodes greedily.

Metrics: classification -> accuracy, macro_f1, per-class precision/recall/F1, confusion matrix,
loss (answer-token cross-entropy of the true label); generation -> exact_match, token_f1, loss.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from lorastack.adapters import labels as label_scoring
from lorastack.train.batching import collate
from lorastack.train.examples import IGNORE, Example, PromptFormat
from lorastack.train.model import answer_logits, answer_loss

EVAL_BATCH = 16


@torch.no_grad()
def label_logprob_sums(model, fmt: PromptFormat, examples: Sequence[Example],
                       batch_size: int = EVAL_BATCH, progress: bool = False) -> list[list[float]]:
    """For each example, the summed log-probability of every label's continuation."""
    model.eval()
    device = next(model.parameters()).device
    conts = [fmt.continuations[label] for label in fmt.labels]
    if all(len(c) == 1 for c in conts):  # one forward per example: read the next-token scores
        return _single_token_scores(model, fmt, examples, [c[0] for c in conts], batch_size,
                                    progress, device)
    rows = []  # one row per (example, label): prompt + continuation
    for ex in examples:
        prompt = ex.input_ids[:ex.prompt_len]
        for cont in conts:
            rows.append(Example(prompt + cont, [IGNORE] * len(prompt) + cont, ex.row))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))  # less padding
    out = [0.0] * len(rows)
    step = batch_size * len(conts)
    for start in tqdm(range(0, len(order), step), desc="scoring labels", leave=False,
                      disable=not progress):
        idx = order[start:start + step]
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], fmt.pad_id).items()}
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        positions = torch.zeros_like(batch["labels"], dtype=torch.bool)
        positions[:, :-1] = mask
        logits = answer_logits(model, batch["input_ids"], batch["attention_mask"], positions)
        token_lp = torch.log_softmax(logits, -1).gather(-1, targets[mask][:, None])[:, 0]
        per_row = torch.zeros(len(idx), device=device).index_add_(
            0, mask.nonzero()[:, 0], token_lp)
        for i, value in zip(idx, per_row.tolist()):
            out[i] = value
    n = len(conts)
    return [out[i * n:(i + 1) * n] for i in range(len(examples))]


def _single_token_scores(model, fmt, examples, token_ids, batch_size, progress, device):
    out: list[list[float]] = [[] for _ in examples]
    order = sorted(range(len(examples)), key=lambda i: examples[i].prompt_len)
    for start in tqdm(range(0, len(order), batch_size), desc="scoring labels", leave=False,
                      disable=not progress):
        idx = order[start:start + batch_size]
        prompts = [Example(examples[i].input_ids[:examples[i].prompt_len],
                           [IGNORE] * examples[i].prompt_len, examples[i].row) for i in idx]
        batch = {k: v.to(device) for k, v in collate(prompts, fmt.pad_id).items()}
        positions = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for row, p in enumerate(prompts):
            positions[row, len(p.input_ids) - 1] = True
        logits = answer_logits(model, batch["input_ids"], batch["attention_mask"], positions)
        scores = torch.log_softmax(logits, -1)[:, token_ids]
        for row, i in enumerate(idx):
            out[i] = scores[row].tolist()
    return out


def evaluate_classification(model, fmt: PromptFormat, examples: Sequence[Example],
                            progress: bool = False) -> tuple[dict, list[dict[str, float]]]:
    """Metrics over `examples`, and each example's label probabilities."""
    sums = label_logprob_sums(model, fmt, examples, progress=progress)
    probs = [label_scoring.probabilities(dict(zip(fmt.labels, row))) for row in sums]
    preds = [fmt.labels.index(label_scoring.predict(p)) for p in probs]
    truth = [ex.label for ex in examples]
    metrics = classification_metrics(truth, preds, fmt.labels)
    lengths = [len(fmt.continuations[fmt.labels[t]]) for t in truth]
    metrics["loss"] = sum(-row[t] / n for row, t, n in zip(sums, truth, lengths)) / len(truth)
    return metrics, probs


def classification_metrics(truth: Sequence[int], preds: Sequence[int],
                           labels: Sequence[str]) -> dict:
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]
    for t, p in zip(truth, preds):
        confusion[t][p] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(confusion[r][i] for r in range(n))
        actual = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1,
                            "support": actual}
    return {
        "accuracy": sum(c[i] for i, c in enumerate(confusion)) / max(1, len(truth)),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / n,
        "per_class": per_class,
        "confusion": confusion,
        "labels": list(labels),
        "n": len(truth),
    }


@torch.no_grad()
def generate_answers(model, fmt: PromptFormat, examples: Sequence[Example], max_new_tokens: int,
                     batch_size: int = EVAL_BATCH, progress: bool = False) -> list[str]:
    """Greedy answers for the examples' prompts (left-padded batches)."""
    model.eval()
    device = next(model.parameters()).device
    answers = [""] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: examples[i].prompt_len)
    for start in tqdm(range(0, len(order), batch_size), desc="generating", leave=False,
                      disable=not progress):
        idx = order[start:start + batch_size]
        prompts = [examples[i].input_ids[:examples[i].prompt_len] for i in idx]
        width = max(map(len, prompts))
        ids = torch.full((len(idx), width), fmt.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=fmt.end_id, pad_token_id=fmt.pad_id)
        for row, i in enumerate(idx):
            answers[i] = fmt.tok.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers


def evaluate_generation(model, fmt: PromptFormat, examples: Sequence[Example],
                        max_new_tokens: int, progress: bool = False,
                        with_loss: bool = True) -> tuple[dict, list[str]]:
    """Greedy answers scored by exact match and token F1; `with_loss` adds the teacher-forced
    answer loss (a second full forward pass: skipped where only the answers matter)."""
    answers = generate_answers(model, fmt, examples, max_new_tokens, progress=progress)
    refs = [ex.answer for ex in examples]
    metrics = {
        "exact_match": sum(exact_match(a, r) for a, r in zip(answers, refs)) / len(refs),
        "token_f1": sum(token_f1(a, r) for a, r in zip(answers, refs)) / len(refs),
        "n": len(refs),
    }
    if with_loss:
        metrics["loss"] = teacher_forced_loss(model, fmt, examples)
    return metrics, answers


@torch.no_grad()
def teacher_forced_loss(model, fmt: PromptFormat, examples: Sequence[Example]) -> float:
    model.eval()
    device = next(model.parameters()).device
    total = tokens = 0.0
    for start in range(0, len(examples), EVAL_BATCH):
        batch = {k: v.to(device)
                 for k, v in collate(examples[start:start + EVAL_BATCH], fmt.pad_id).items()}
        loss, n = answer_loss(model, batch)
        total += float(loss) * n
        tokens += n
    return total / max(tokens, 1)


def normalize_answer(text: str) -> str:
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
