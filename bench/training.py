"""Training throughput: lorastack's trainer vs the tutorial recipe vs TRL's SFTTrainer.

    .venv/bin/python -m bench.training            # ~21 min on 2 cores; bench/results/training.*
    .venv/bin/python -m bench.training --tiny --out /tmp/b   # seconds-scale check (the tests)

Three trainers fit the same LoRA (the reviews-classify config's: r=16, all linear layers of
layers 15-29, same learning rate, schedule, batch size 8 and seed) on the same float32
SmolLM2-135M-Instruct and the same 510 drug reviews rendered with the same chat prompt:

- lorastack: lorastack.train.loop.Trainer as `lorastack train` runs it (length-grouped batches,
  loss and output head only at the answer tokens, class-weighted loss);
- hf-tutorial: the recipe copied from tutorials: transformers Trainer + peft, the tokenizer
  padding every example to max_length, DataCollatorForLanguageModeling(mlm=False) (loss on every
  token);
- trl-sft: TRL's SFTTrainer with peft_config and its default settings (prompt/completion data:
  completion-only loss, padding to the longest in the batch, gradient checkpointing on), except
  bf16=False: all three compute in float32, as bfloat16 matmuls are ~30x slower on this CPU.

Two phases, each trainer in a fresh process (clean peak memory, no shared caches):
1. throughput, repeated: rounds of (lorastack, hf-tutorial, trl-sft) side by side, each
   `--steps` optimizer steps; real (non-padding) tokens per second over steps 2..N; the paired
   per-round ratios give a median and spread.
2. time to accuracy, once: each trainer trains `--accuracy-steps` steps (24 of batch 8: 38% of an
   epoch; the schedule spans them), evaluated on the 90 validation reviews every `--eval-every` steps by the same scorer (lorastack's label scoring); training time
   (evaluation excluded) until each first reaches the accuracy that all three reach.

All three run under the allocator `lorastack train` runs under (tcmalloc; --allocator system for
glibc's malloc), so that the comparison is of trainers, not allocators (adapters/allocator.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from lorastack.adapters import allocator

RECIPES = ("lorastack", "hf-tutorial", "trl-sft")
LABELS = {"lorastack": "lorastack", "hf-tutorial": "HF Trainer + peft (tutorial)",
          "trl-sft": "TRL SFTTrainer + peft"}


# --------------------------------------------------------------------------------------------
# The worker: one trainer, one phase, in this process; prints one JSON line.

def _setup(args):
    import torch

    from lorastack.adapters.models import resolve_base
    from lorastack.train.config import load_config
    from lorastack.train.examples import PromptFormat, encode_records
    from lorastack.train.model import load_tokenizer
    from lorastack.train.run import config_splits

    cfg = load_config("reviews-classify").model_copy(update={"quantization": "none"})
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={
        "early_stopping_patience": 0, "epochs": 1, "max_steps": args.steps if
        args.phase == "throughput" else args.accuracy_steps, "eval_every": 10**9,
        "save_every": 10**9})})
    torch.manual_seed(cfg.training.seed)
    base = resolve_base(cfg.base)
    tok = load_tokenizer(base.path)
    splits = config_splits(cfg)
    if args.limit_train:
        splits.train = splits.train[:args.limit_train]
    if args.limit_eval:
        splits.validation = splits.validation[:args.limit_eval]
    labels = list(cfg.task.labels)
    fmt = PromptFormat(tok, cfg, labels)
    train_set = encode_records(fmt, splits.train, "train")
    val_set = encode_records(fmt, splits.validation, "validation")
    return cfg, base, tok, fmt, labels, train_set.examples, val_set.examples


class _Clock:
    """Step timestamps with evaluation time taken out; tokens per step."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.eval_seconds = 0.0
        self.steps: list[dict] = []  # {"step", "t" (training seconds), "tokens" (cumulative)}
        self.tokens = 0
        self.evals: list[dict] = []

    def step(self, step: int) -> None:
        self.steps.append({"step": step, "t": time.perf_counter() - self.t0 - self.eval_seconds,
                           "tokens": self.tokens})

    def evaluate(self, model, fmt, examples, step: int) -> dict:
        from lorastack.train.evaluate import evaluate_classification

        t = time.perf_counter()
        was_training = model.training
        model.eval()
        metrics = evaluate_classification(model, fmt, examples)[0]
        if was_training:
            model.train()
        self.eval_seconds += time.perf_counter() - t
        self.evals.append({"step": step, "t": time.perf_counter() - self.t0 - self.eval_seconds,
                           "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]})
        return metrics


def _run_lorastack(args, cfg, base, fmt, labels, train_ex, val_ex, clock):
    from lorastack.train.loop import Trainer
    from lorastack.train.model import attach_lora, load_base, pick_device
    from lorastack.train.report import RunLogger

    model = attach_lora(cfg, load_base(cfg, base.path, pick_device()))
    run_dir = Path(tempfile.mkdtemp(prefix="bench-lorastack-"))
    logger = RunLogger(run_dir)

    def on_step(state):
        clock.tokens = state.tokens
        clock.step(state.step)
        if args.phase == "accuracy" and (state.step % args.eval_every == 0
                                         or state.step == trainer.total_steps):
            clock.evaluate(model, fmt, val_ex, state.step)

    trainer = Trainer(cfg, model, train_ex, len(labels), fmt.pad_id,
                      lambda: {"accuracy": 0.0, "macro_f1": 0.0, "loss": 0.0}, run_dir, logger,
                      on_step)
    trainer._save_checkpoint = lambda: None  # checkpoints off, as for the other two
    clock.t0 = time.perf_counter()
    trainer.fit()
    logger.close()
    return trainer.total_steps


def _hf_callback(args, fmt, val_ex, clock, total_steps):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, model=None, **kw):
            clock.step(state.global_step)
            if args.phase == "accuracy" and (state.global_step % args.eval_every == 0
                                             or state.global_step == total_steps):
                clock.evaluate(model, fmt, val_ex, state.global_step)

    return Timing()


def _counting(trainer_cls, clock):
    class Counting(trainer_cls):
        def training_step(self, model, inputs, *a, **kw):
            mask = inputs.get("attention_mask")
            clock.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *a, **kw)

    return Counting


def _common_args(args, cfg, total_steps, out_dir):
    t = cfg.training
    return {"output_dir": out_dir, "per_device_train_batch_size": t.batch_size,
            "gradient_accumulation_steps": t.grad_accum, "learning_rate": t.lr,
            "lr_scheduler_type": t.scheduler,
            "warmup_steps": round(t.warmup_ratio * total_steps),
            "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm or 0.0,
            "max_steps": total_steps, "save_strategy": "no", "report_to": "none",
            "use_cpu": True, "seed": t.seed, "disable_tqdm": True}


def _run_hf_tutorial(args, cfg, base, tok, fmt, labels, train_ex, val_ex, clock):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from lorastack.train.model import attach_lora, load_base, pick_device

    model = attach_lora(cfg, load_base(cfg, base.path, pick_device()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.decode(ex.input_ids) for ex in train_ex]
    ds = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], padding="max_length", truncation=True,
                      max_length=cfg.data.max_length, add_special_tokens=False),
        batched=True, remove_columns=["text"])
    total = _total_steps(args, cfg, len(train_ex))
    targs = TrainingArguments(**_common_args(args, cfg, total, tempfile.mkdtemp()),
                              logging_steps=10)
    trainer = _counting(Trainer, clock)(
        model=model, args=targs, train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=[_hf_callback(args, fmt, val_ex, clock, total)])
    trainer.train()
    return total


def _run_trl(args, cfg, base, tok, fmt, labels, train_ex, val_ex, clock):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lorastack.train.model import load_base, lora_config, pick_device

    model = load_base(cfg, base.path, pick_device())
    rows = {"prompt": [tok.decode(ex.input_ids[:ex.prompt_len]) for ex in train_ex],
            "completion": [tok.decode(ex.input_ids[ex.prompt_len:]) for ex in train_ex]}
    total = _total_steps(args, cfg, len(train_ex))
    sft = SFTConfig(**_common_args(args, cfg, total, tempfile.mkdtemp()), bf16=False)
    resolved_completion_only = sft.completion_only_loss is not False  # None: on for prompt/completion
    trainer = _counting(SFTTrainer, clock)(
        model=model, args=sft, train_dataset=Dataset.from_dict(rows), processing_class=tok,
        peft_config=lora_config(cfg, model),
        callbacks=[_hf_callback(args, fmt, val_ex, clock, total)])
    settings = {"gradient_checkpointing": sft.gradient_checkpointing,
                "max_length": sft.max_length, "padding_free": sft.padding_free,
                "packing": sft.packing, "completion_only_loss": resolved_completion_only,
                "loss_type": sft.loss_type}
    trainer.train()
    return total, settings


def _total_steps(args, cfg, n_examples: int) -> int:
    return args.steps if args.phase == "throughput" else args.accuracy_steps


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, base, tok, fmt, labels, train_ex, val_ex = _setup(args)
    clock = _Clock()
    settings = {}
    if args.recipe == "lorastack":
        total = _run_lorastack(args, cfg, base, fmt, labels, train_ex, val_ex, clock)
    elif args.recipe == "hf-tutorial":
        total = _run_hf_tutorial(args, cfg, base, tok, fmt, labels, train_ex, val_ex, clock)
    else:
        total, settings = _run_trl(args, cfg, base, tok, fmt, labels, train_ex, val_ex, clock)
    steps = clock.steps
    first = steps[0] if len(steps) > 1 else {"t": 0.0, "tokens": 0}
    last = steps[-1]
    tok_s = (last["tokens"] - first["tokens"]) / max(last["t"] - first["t"], 1e-9)
    return {"recipe": args.recipe, "phase": args.phase, "steps": total,
            "examples": len(train_ex), "validation_examples": len(val_ex), "tokens": last["tokens"],
            "train_seconds": last["t"], "tokens_per_s": tok_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "evals": clock.evals, "step_times": steps, "settings": settings,
            "threads": torch.get_num_threads(), "allocator": allocator.active()}


# --------------------------------------------------------------------------------------------
# The driver: workers side by side, repeated; results, figure.

def _spawn(args, recipe: str, phase: str) -> dict:
    cmd = [recipe, "--phase", phase, "--steps", str(args.steps),
           "--accuracy-steps", str(args.accuracy_steps), "--eval-every", str(args.eval_every)]
    if args.limit_train:
        cmd += ["--limit-train", str(args.limit_train)]
    if args.limit_eval:
        cmd += ["--limit-eval", str(args.limit_eval)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    common.log(f"{phase}: {LABELS[recipe]} ...")
    started = time.monotonic()
    result = common.run_worker("bench.training", cmd, recipe, malloc=args.allocator)
    common.log(f"{phase}: {LABELS[recipe]}: {result['tokens_per_s']:.0f} tok/s, "
               f"{result['train_seconds']:.0f} s training, peak {result['peak_rss_mb']:.0f} MB "
               f"({time.monotonic() - started:.0f} s with start-up)")
    return result


def _time_to(evals: list[dict], target: float) -> tuple[float | None, int | None]:
    for e in evals:
        if e["accuracy"] >= target - 1e-9:
            return e["t"], e["step"]
    return None, None


def run(args) -> Path:
    if args.rebuild:  # re-render the last full run's measurements (presentation changes)
        old = common.read_result("training", args.out)
        if old is None:
            raise SystemExit("bench.training --rebuild: no training.json to rebuild from")
        for key in ("repeats", "steps", "accuracy_steps", "eval_every", "limit_train",
                    "limit_eval"):
            setattr(args, key, old["settings"].get(key, getattr(args, key)))
        args.allocator = old["settings"].get("allocator", "system")  # before it was recorded
        rounds, accuracy = old["rounds"], old["accuracy_runs"]
        setting = old["setting"]
        kept = common.measurement_record(old)
    else:
        rounds, accuracy = _measure(args)
        setting = "tiny" if args.tiny else "full"
        kept = {}
    payload = _payload(args, rounds, accuracy)
    # the record names the workers' allocator, not this process's
    path = common.write_result("training", {**payload, **kept}, args.out, setting=setting,
                               allocator=args.allocator)
    _plot(payload, args.out)
    return path


def _measure(args) -> tuple[dict, dict]:
    rounds = {r: [] for r in RECIPES}
    for i in range(0 if args.tiny else args.repeats):
        common.log(f"throughput round {i + 1}/{args.repeats}")
        order = RECIPES if i % 2 == 0 else tuple(reversed(RECIPES))  # no fixed first slot
        for recipe in order:
            rounds[recipe].append(_spawn(args, recipe, "throughput"))
    accuracy = {}
    if not args.skip_accuracy or args.tiny:
        for recipe in RECIPES:
            accuracy[recipe] = _spawn(args, recipe, "accuracy")
    if args.tiny:  # one run per trainer: the accuracy runs stand in for the throughput round
        rounds = {r: [accuracy[r]] for r in RECIPES}
    rounds = {r: [{k: v for k, v in x.items() if k != "step_times"} for x in rounds[r]]
              for r in RECIPES}
    return rounds, accuracy


def _payload(args, rounds: dict, accuracy: dict) -> dict:
    tok_s = {r: [x["tokens_per_s"] for x in rounds[r]] for r in RECIPES}
    ratios = {f"lorastack/{r}": common.ratio(tok_s["lorastack"], tok_s[r])
              for r in RECIPES if r != "lorastack"}
    peak = {r: common.spread(x["peak_rss_mb"] for x in rounds[r]) for r in RECIPES}
    best = {r: max(e["accuracy"] for e in accuracy[r]["evals"]) for r in accuracy}
    final = {r: accuracy[r]["evals"][-1]["accuracy"] for r in accuracy}
    # two targets: the accuracy all three reach, and the one lorastack and TRL both reach
    targets = sorted({min(best.values()), min(best["lorastack"], best["trl-sft"])}) \
        if accuracy else []
    rows = []
    for r in RECIPES:
        s = common.spread(tok_s[r])
        row = [LABELS[r], f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})",
               "1.00x" if r == "lorastack" else common.fmt_ratio(ratios[f"lorastack/{r}"]),
               f"{peak[r]['median']:.0f}"]
        if accuracy:
            a = accuracy[r]
            row += [f"{final[r]:.3f} ({best[r]:.3f})"]
            for target in targets:
                t, step = _time_to(a["evals"], target)
                row.append(f"{t / 60:.1f} min (step {step})" if t is not None else
                           f"not reached in {args.accuracy_steps} steps")
            row.append(f"{a['train_seconds'] / 60:.1f} min")
        rows.append(row)
    columns = ["trainer", "real tokens/s (median, min-max)", "lorastack speed-up",
               "peak RSS, MB"]
    if accuracy:
        columns += [f"val. accuracy after {args.accuracy_steps} steps (best)"]
        columns += [f"time to val. acc. {t:.3f}" for t in targets]
        columns += [f"{args.accuracy_steps} steps"]
    trl_ratio = ratios["lorastack/trl-sft"]
    shown = common.fmt_ratio(trl_ratio)
    acc_ok = True
    if accuracy:
        acc_ok = final["lorastack"] >= final["trl-sft"] - 1e-9
        n_val = accuracy["lorastack"].get("validation_examples") or 90
        shown += (f"; validation accuracy after the same {args.accuracy_steps} steps "
                  f"{final['lorastack']:.3f} vs {final['trl-sft']:.3f} (best along the way "
                  f"{best['lorastack']:.3f} vs {best['trl-sft']:.3f}; one review is "
                  f"{1 / n_val:.3f})")
    goal = common.goal(
        "lorastack at least 1.5x TRL SFTTrainer's real tokens/s, at equal or better accuracy",
        trl_ratio["median"], 1.5, shown=shown)
    if goal["met"] and not acc_ok:
        goal["met"] = False
        goal["note"] = "faster, but less accurate after the same steps"
    tut = ratios["lorastack/hf-tutorial"]
    summary = (f"Real (non-padding) tokens per second, {args.repeats} round(s) side by side, "
               f"{args.steps} steps of batch 8 each (the first not timed): lorastack is "
               f"{common.fmt_ratio(trl_ratio)} TRL SFTTrainer and {common.fmt_ratio(tut)} the "
               f"tutorial recipe.")
    if accuracy:
        t_ours = _time_to(accuracy["lorastack"]["evals"], targets[-1])[0]
        t_trl = _time_to(accuracy["trl-sft"]["evals"], targets[-1])[0]
        summary += (f" Trained {args.accuracy_steps} steps each (one run per trainer, "
                    f"validation every {args.eval_every} steps): lorastack reaches validation "
                    f"accuracy {targets[-1]:.3f} after {t_ours / 60:.1f} min of training, TRL "
                    f"after {t_trl / 60:.1f} min.")
        tut_f1 = max(e["macro_f1"] for e in accuracy["hf-tutorial"]["evals"])
        if best["hf-tutorial"] <= min(best.values()) + 1e-9:
            summary += (f" The tutorial recipe does not get past {best['hf-tutorial']:.3f} "
                        f"(macro-F1 {tut_f1:.2f}: it answers positive, the majority, almost "
                        "always), likely because its loss covers every prompt token, of which "
                        "the answer is one.")
    payload = {
        "title": "Training throughput", "summary": summary,
        "tables": [common.table(
            "Same model (float32), same LoRA, same data, learning rate and schedule; each "
            f"trainer in its own process, under {common.MALLOC_NAMES[args.allocator]}. Peak "
            "RSS: the whole process (model load included).",
            columns, rows)],
        "goals": [goal], "figure": "training.png",
        "notes": [("TRL runs with its defaults (gradient checkpointing on, padding to the "
                   "longest, completion-only loss, per-step token-accuracy and entropy "
                   "metrics) except bf16=False; the same learning rate, schedule and batch "
                   "size as the others."),
                  ("GPU (Llama-8B-shaped model, random weights): not measured: no GPU was "
                   "lent to the session that produced these results.")],
        "settings": {"repeats": args.repeats, "steps": args.steps,
                     "accuracy_steps": args.accuracy_steps, "eval_every": args.eval_every,
                     "limit_train": args.limit_train, "limit_eval": args.limit_eval,
                     "allocator": args.allocator, "base": "smollm2-135m (float32)",
                     "lora": "reviews-classify config",
                     "trl_settings": rounds["trl-sft"][0]["settings"] if rounds["trl-sft"]
                     else {}},
        "tokens_per_s": {r: common.spread(tok_s[r]) for r in RECIPES}, "ratios": ratios,
        "peak_rss_mb": peak, "target_accuracy": targets[0] if targets else None,
        "target_accuracies": targets, "rounds": rounds, "accuracy_runs": accuracy,
        "gpu": None,
    }
    return payload


def _plot(payload: dict, out) -> None:
    plt = common.pyplot()
    acc = payload["accuracy_runs"]
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(11 if acc else 5.5, 3.8),
                             squeeze=False)
    ax = axes[0][0]
    names = [LABELS[r] for r in RECIPES]
    med = [payload["tokens_per_s"][r]["median"] for r in RECIPES]
    lo = [m - payload["tokens_per_s"][r]["min"] for r, m in zip(RECIPES, med)]
    hi = [payload["tokens_per_s"][r]["max"] - m for r, m in zip(RECIPES, med)]
    ax.barh(names[::-1], med[::-1], xerr=[lo[::-1], hi[::-1]], capsize=3,
            color=["#bbb", "#bbb", "#2a7"])  # reversed order: lorastack on top
    ax.set_xlabel("real tokens / s (median, min-max)")
    ax.set_title("Training throughput, float32, 2 CPU cores" if not
                 payload.get("gpu") else "Training throughput")
    if acc:
        ax = axes[0][1]
        for r, color in zip(RECIPES, ("#2a7", "#d62", "#36c")):
            ev = acc[r]["evals"]
            ax.plot([e["t"] / 60 for e in ev], [e["accuracy"] for e in ev], "o-", color=color,
                    label=LABELS[r])
        if payload["target_accuracy"] is not None:
            ax.axhline(payload["target_accuracy"], color="#888", ls="--", lw=1)
        ax.set_xlabel("training time, minutes (evaluation excluded)")
        ax.set_ylabel("validation accuracy")
        ax.set_title("Time to accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, "training", out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="a plumbing check: 16 train / 8 validation reviews, one short run "
                        "per trainer (its throughput and accuracy both come from it)")
    p.add_argument("--out", help="results directory (default bench/results)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per throughput run")
    p.add_argument("--accuracy-steps", type=int, default=24,
                   help="steps of the time-to-accuracy runs (the schedule spans them; "
                        "24 steps of 8 = 192 of the 510 training reviews)")
    p.add_argument("--eval-every", type=int, default=8)
    p.add_argument("--limit-train", type=int, default=0)
    p.add_argument("--limit-eval", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--skip-accuracy", action="store_true",
                   help="throughput only (no one-epoch time-to-accuracy runs)")
    common.add_allocator_arg(p)
    p.add_argument("--rebuild", action="store_true",
                   help="re-render training.json and the figure from its stored runs")
    p.add_argument("--worker", choices=RECIPES, help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=("throughput", "accuracy"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.repeats, args.steps, args.accuracy_steps, args.eval_every = 1, 2, 1, 1
        args.limit_train, args.limit_eval = args.limit_train or 16, args.limit_eval or 8
    if args.worker:
        args.recipe = args.worker
        result = worker(args)
        sys.stdout.write(json.dumps(result) + "\n")
        return
    run(args)


if __name__ == "__main__":
    main()
