"""Evaluation. Classification scores every label (never samples) through adapters/labels.py,
the same normalisation the server's /v1/classify uses; generation decodes greedily.

Metrics: classification -> accuracy, macro_f1, per-class precision/recall/F1, confusion matrix,
loss (answer-token cross-entropy of the true label); generation -> exact_match, token_f1, loss.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from lorastack.adapters import labels as label_scoring
from lorastack.train.batching import collate
from lorastack.train.examples import IGNORE, Example, PromptFormat
from lorastack.train.model import answer_logits, answer_loss, causal_lm

EVAL_BATCH = 16


@torch.no_grad()
def label_logprob_sums(model, fmt: PromptFormat, examples: Sequence[Example],
                       batch_size: int = EVAL_BATCH, progress: bool = False) -> list[list[float]]:
    """For each example, the summed log-probability of every label's continuation.

    Each prompt runs once, whatever the number of labels: scoring prompt + continuation as one
    row per label ran every prompt once per label, and evaluation outlasted training."""
    model.eval()
    device = next(model.parameters()).device
    conts = [fmt.continuations[label] for label in fmt.labels]
    out: list[list[float]] = [[] for _ in examples]
    order = sorted(range(len(examples)), key=lambda i: examples[i].prompt_len)  # less padding
    for start in tqdm(range(0, len(order), batch_size), desc="scoring labels", leave=False,
                      disable=not progress):
        idx = order[start:start + batch_size]
        prompts = [examples[i].input_ids[:examples[i].prompt_len] for i in idx]
        for i, row in zip(idx, _score_prompts(model, prompts, conts, fmt.pad_id, device)):
            out[i] = row.tolist()
    return out


def _score_prompts(model, prompts: list[list[int]], conts: list[list[int]], pad_id: int,
                   device: torch.device) -> torch.Tensor:
    """[prompts, conts]: summed log-probabilities of each continuation after each prompt.

    The prompts' last positions score every first token. Later tokens of multi-token
    continuations run on the prompts' KV cache, copied to one row per (prompt, continuation):
    a few tokens each, instead of the whole prompt again."""
    from transformers import DynamicCache

    batch = _padded([Example(p, [IGNORE] * len(p), 0) for p in prompts], pad_id, device)
    mask = batch["attention_mask"]
    lengths = mask.sum(1)
    last = torch.nn.functional.one_hot(lengths - 1, mask.shape[1]).bool()
    multi = [j for j, c in enumerate(conts) if len(c) > 1]
    cache = DynamicCache(config=causal_lm(model).config) if multi else None
    logits = answer_logits(model, batch["input_ids"], mask, last, past_key_values=cache)
    scores = torch.log_softmax(logits, -1)[:, [c[0] for c in conts]]
    if not multi:
        return scores
    rows = torch.arange(len(prompts), device=device).repeat_interleave(len(multi))
    cache.batch_select_indices(rows)
    # Row (prompt b, label j) reads its label's tokens but the last; each predicts the next.
    tail = _padded([Example(conts[j][:-1], conts[j][1:], 0) for _ in prompts for j in multi],
                   pad_id, device)
    real = tail["attention_mask"].bool()
    # The cache is right-padded: the mask hides its padding, and positions go on from each
    # prompt's own length (not the padded width), as they would in one unpadded row.
    positions = lengths[rows, None] + torch.arange(real.shape[1], device=device)
    logits = answer_logits(model, tail["input_ids"], torch.cat([mask[rows], real.long()], 1),
                           real, past_key_values=cache, position_ids=positions)
    token_lp = torch.log_softmax(logits, -1).gather(-1, tail["labels"][real][:, None])[:, 0]
    per_row = torch.zeros(len(rows), device=device).index_add_(0, real.nonzero()[:, 0], token_lp)
    scores[:, multi] += per_row.view(len(prompts), len(multi))
    return scores


def _padded(rows: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in collate(rows, pad_id).items()}


def evaluate_classification(model, fmt: PromptFormat, examples: Sequence[Example],
                            progress: bool = False, temperature: float = 1.0,
                            bias: Mapping[str, float] | None = None
                            ) -> tuple[dict, list[dict[str, float]]]:
    """Metrics over `examples`, and each example's label probabilities under `bias` and
    `temperature` (an adapter's calibration)."""
    sums = label_logprob_sums(model, fmt, examples, progress=progress)
    return classification_from_scores(fmt, examples, sums, temperature, bias)


def classification_from_scores(fmt: PromptFormat, examples: Sequence[Example],
                               sums: Sequence[Sequence[float]], temperature: float = 1.0,
                               bias: Mapping[str, float] | None = None
                               ) -> tuple[dict, list[dict[str, float]]]:
    """Metrics and probabilities from the labels' summed log-probabilities (label_logprob_sums).

    `loss` is the true label's answer-token cross-entropy (the training loss without class
    weights); `nll` the negative log-likelihood of the true label under the normalised
    probabilities, and `ece` their expected calibration error, both under `bias` and
    `temperature`."""
    from lorastack.train.calibration import calibrated, expected_calibration_error

    probs = calibrated(sums, fmt.labels, temperature, bias)
    preds = [fmt.labels.index(label_scoring.predict(p)) for p in probs]
    truth = [ex.label for ex in examples]
    metrics = classification_metrics(truth, preds, fmt.labels)
    lengths = [len(fmt.continuations[fmt.labels[t]]) for t in truth]
    metrics["loss"] = sum(-row[t] / n for row, t, n in zip(sums, truth, lengths)) / len(truth)
    metrics["nll"] = sum(-math.log(max(p[fmt.labels[t]], 1e-300))
                         for p, t in zip(probs, truth)) / len(truth)
    metrics["ece"] = expected_calibration_error(probs, [fmt.labels[t] for t in truth])
    return metrics, probs


def classification_metrics(truth: Sequence[int], preds: Sequence[int],
                           labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1 over every label, per-class precision/recall/F1 and the confusion
    matrix (rows: truth), by scikit-learn; a label never predicted scores 0."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(labels)))
    confusion = confusion_matrix(truth, preds, labels=ids).tolist()
    scores = precision_recall_fscore_support(truth, preds, labels=ids, zero_division=0)
    per_class = {label: {"precision": float(p), "recall": float(r), "f1": float(f),
                         "support": int(n)} for label, p, r, f, n in zip(labels, *scores)}
    return {
        "accuracy": sum(c[i] for i, c in enumerate(confusion)) / len(truth),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels),
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
