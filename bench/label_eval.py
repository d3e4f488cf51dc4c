"""Trainer evaluation of a multi-token label set against its training time.

    .venv/bin/python -m bench.label_eval            # 4 conditions as labels, 1 epoch, float LoRA
    .venv/bin/python -m bench.label_eval --tiny --out /tmp/b

Writes bench/results/label_eval.json. The task: name which of the four most frequent conditions
a drug review is about ("Birth Control", "Depression", ...: labels of several tokens), trained
with lorastack's trainer (float LoRA r=16 on the top 15 layers, 1 epoch). Then the validation
and test examples are scored twice with the trained model: as the trainer does (each prompt once,
the label continuations on its KV cache) and the way it used to (prompt + continuation, one row
per label). Goal (the issue): evaluation <= 0.3x the training time.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.common import goal, log, table, write_result


def task_files(root: Path, limit: int | None) -> tuple[Path, Path, list[str]]:
    from lorastack.train.data import load_records

    train, test = load_records("drug-reviews", "train"), load_records("drug-reviews", "test")
    top = [c for c, _ in Counter(r.get("condition") for r in train if r.get("condition"))
           .most_common(4)]
    paths = []
    for name, rows in (("train", train), ("test", test)):
        kept = [{"text": r["text"], "label": r["condition"]} for r in rows
                if r.get("condition") in top][:limit]
        path = root / f"{name}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["text", "label"])
            writer.writeheader()
            writer.writerows(kept)
        paths.append(path)
    return paths[0], paths[1], top


def per_row_sums(model, fmt, examples, batch_size=16):
    """The former scorer, kept here as the yardstick: one row per (example, label)."""
    import torch

    from lorastack.train.batching import collate
    from lorastack.train.examples import IGNORE, Example
    from lorastack.train.model import answer_logits

    conts = [fmt.continuations[label] for label in fmt.labels]
    rows = [Example(ex.input_ids[:ex.prompt_len] + c, [IGNORE] * ex.prompt_len + c, ex.row)
            for ex in examples for c in conts]
    with torch.no_grad():
        for start in range(0, len(rows), batch_size * len(conts)):
            batch = collate(rows[start:start + batch_size * len(conts)], fmt.pad_id)
            targets = batch["labels"][:, 1:]
            positions = torch.zeros_like(batch["labels"], dtype=torch.bool)
            positions[:, :-1] = targets != IGNORE
            answer_logits(model, batch["input_ids"], batch["attention_mask"], positions)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorastack-bench-label-eval-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    from peft import PeftModel

    from lorastack.adapters.models import resolve_base
    from lorastack.train import train
    from lorastack.train.config import build_config
    from lorastack.train.evaluate import label_logprob_sums
    from lorastack.train.examples import PromptFormat, encode_records
    from lorastack.train.model import load_base, load_tokenizer, pick_device
    from lorastack.train.run import config_splits

    train_csv, test_csv, labels = task_files(work, 12 if args.tiny else None)
    config = {"name": "conditions", "base": "smollm2-135m", "quantization": "none",
              "store": str(work / "store"), "runs_dir": str(work / "runs"),
              "task": {"type": "classification", "prompt": "Review: {text}",
                       "system": "Which condition is this drug review about?",
                       "labels": labels},
              "data": {"source": str(train_csv), "test": str(test_csv), "max_length": 224},
              "lora": {"r": 16, "alpha": 32, "layers": list(range(15, 30))},
              "training": {"epochs": 1, "batch_size": 8, "eval_every": 10**6,
                           **({"max_steps": 2} if args.tiny else {})}}
    log(f"training a 4-label classifier ({', '.join(labels)})")
    result = train(config)
    summary = result.summary
    cfg = build_config(config)
    base = resolve_base(cfg.base)
    tok = load_tokenizer(base.path)
    fmt = PromptFormat(tok, cfg, labels)
    splits = config_splits(cfg)
    examples = (encode_records(fmt, splits.validation, "validation").examples +
                encode_records(fmt, splits.test, "test").examples)
    model = PeftModel.from_pretrained(load_base(cfg, base.path, pick_device()),
                                      str(result.adapter_dir)).eval()
    timings = {}
    for name, fn in (("lorastack (KV cache)", lambda: label_logprob_sums(model, fmt, examples)),
                     ("one row per label (before)", lambda: per_row_sums(model, fmt,
                                                                          examples))):
        t = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t
        log(f"{name}: {timings[name]:.1f} s for {len(examples)} examples")
    lengths = {label: len(c) for label, c in fmt.continuations.items()}
    ratio = timings["lorastack (KV cache)"] / summary["train_seconds"]
    report = {
        "title": "Label evaluation vs training time",
        "summary": (f"A 4-label task whose labels are {min(lengths.values())}-"
                    f"{max(lengths.values())} tokens: evaluating {len(examples)} validation and "
                    f"test examples takes {timings['lorastack (KV cache)']:.0f} s, {ratio:.2f}x "
                    f"the {summary['train_seconds']:.0f} s of training ("
                    f"{timings['one row per label (before)'] / timings['lorastack (KV cache)']:.1f}"
                    f"x faster than one row per label)."),
        "goals": [goal("trainer evaluation of a 4-label multi-token task <= 0.3x its training "
                       "time", ratio, 0.3, at_least=False, shown=f"{ratio:.2f}x")],
        "tables": [table("Seconds, on this machine", ["what", "seconds"],
                         [["training (1 epoch, " + str(summary["steps"]) + " steps)",
                           f"{summary['train_seconds']:.1f}"],
                          *([k, f"{v:.1f}"] for k, v in timings.items())])],
        "labels": lengths, "examples": len(examples), "train_seconds": summary["train_seconds"],
        "eval_seconds": timings}
    write_result("label_eval", report, args.out, setting="tiny" if args.tiny else "full")


if __name__ == "__main__":
    main()
