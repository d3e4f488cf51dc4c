"""The memory plan (lorastack.train.plan) against measured peaks: predicted vs measured.

    .venv/bin/python -m bench.memory_plan          # ~15 min on 2 cores (2 runs a row)
    .venv/bin/python -m bench.memory_plan --tiny --out /tmp/b   # ~30 s: a tiny random Llama
    .venv/bin/python -m bench.memory_plan --rebuild   # re-plan the stored measurements
    .venv/bin/python -m bench.memory_plan --allocator system   # the workers under glibc malloc

Rows: SmolLM2-135M-Instruct (the real default base) and two random-weight Llama-family models
of about 0.5B and 1B parameters (SmolLM2's tokenizer and vocabulary, saved as safetensors in a
temporary directory), each float32 and 4-bit NF4, gradient checkpointing off and on, plus
HELD_OUT rows at other batch shapes. Each row runs in a fresh process: import the libraries
and the tokenizer, load the base as `lorastack train` does (lorastack.train.model load_base +
attach_lora, the default LoRA: r 16 on every linear layer), and run `--steps` optimizer steps
(answer_loss, backward, gradient clipping, AdamW) on a batch of real text, `batch x length`
tokens, the last two positions the answer. The measured peak is the process's resident
high-water mark (getrusage ru_maxrss), nothing subtracted: the plan predicts the whole
process, runtime included. The plan is computed from the model's config alone, with the same
constants for every row; error = predicted / measured - 1.

The workers run under the allocator `lorastack train` runs under (tcmalloc; --allocator
system for glibc's malloc), and the plan is made for it. Under tcmalloc the plan counts no
allocator slack. Under glibc, two of its constants (the allocator's slack, train/plan.py
CPU_SLACK and DEQUANT_HOLES) and the runtime's share were set from a first run of the 12 main
rows; the HELD_OUT rows (other batch shapes) were not used for that and check the plan out of
sample.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench import common
from lorastack.adapters import allocator

# name -> LlamaConfig fields (None: the real SmolLM2-135M-Instruct) and the batch measured
MODELS = {
    "smollm2-135m": (None, 4, 128),
    "llama-0.5b": ({"hidden_size": 1280, "intermediate_size": 3584, "num_hidden_layers": 24,
                        "num_attention_heads": 20, "num_key_value_heads": 4}, 2, 128),
    "llama-1b": ({"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                      "num_attention_heads": 32, "num_key_value_heads": 8}, 2, 128),
}
TINY = {"tiny-llama": ({"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "num_key_value_heads": 2}, 2, 64)}
VARIANTS = (("none", False), ("none", True), ("4bit", False), ("4bit", True))
TINY_VARIANTS = (("none", False), ("4bit", True))
# Rows the plan's measured constants were NOT fitted on (train/plan.py fitted them on the
# MODELS x VARIANTS rows of a first run): other batch shapes, checked out of sample.
HELD_OUT = (("smollm2-135m", "none", False, 8, 224), ("smollm2-135m", "4bit", True, 8, 224),
            ("llama-0.5b", "none", True, 4, 256), ("llama-1b", "4bit", True, 4, 128))
TARGET = 0.15
TEXT = ("The medicine worked well for my back pain, with mild side effects at first that "
        "faded after a week. I would recommend it to anyone with the same condition. ")


def _cfg(base: str, quant: str, ckpt: bool, batch: int, length: int):
    from lorastack.train.config import build_config

    return build_config({"base": base, "quantization": quant,
                         "data": {"max_length": length},
                         "training": {"batch_size": batch, "gradient_checkpointing": ckpt}})


def worker(base: str, quant: str, ckpt: bool, batch: int, length: int, steps: int) -> dict:
    import resource

    import bitsandbytes  # noqa: F401 - the runtime `lorastack train` has imported
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from lorastack.train.model import answer_loss, attach_lora, load_base, load_tokenizer

    tok = load_tokenizer(base)
    runtime = _rss()
    cfg = _cfg(base, quant, ckpt, batch, length)
    torch.manual_seed(0)
    model = attach_lora(cfg, load_base(cfg, base, torch.device("cpu")))
    loaded = _rss()
    ids = tok(TEXT * (length // 20 + 2), add_special_tokens=False)["input_ids"][:length]
    input_ids = torch.tensor([ids] * batch)
    labels = torch.full_like(input_ids, -100)
    labels[:, -2:] = input_ids[:, -2:]
    data = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": labels, "weights": torch.ones(batch)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    for _ in range(steps):
        loss, _ = answer_loss(model, data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured_bytes": peak, "runtime_bytes": runtime, "loaded_bytes": loaded,
            "loss": float(loss.detach()), "allocator": allocator.active()}


def _rss() -> int:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not in /proc/self/status")


def _make_base(fields: dict, tok_dir: Path, out: Path) -> Path:
    """A random-weight Llama of the given shape with SmolLM2's tokenizer, as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **fields)
    torch.manual_seed(0)
    with torch.no_grad():
        LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _predict(shape, quant: str, ckpt: bool, batch: int, length: int, malloc: str) -> dict:
    """The plan of a row from the model's shape alone (the config's `base` is not read), for a
    process under the allocator `malloc`."""
    import dataclasses

    from lorastack.train.plan import Device, plan_memory

    plan = plan_memory(_cfg("smollm2-135m", quant, ckpt, batch, length),
                       Device("cpu", 1 << 40, "cpu"), shape=shape, answer_tokens=2,
                       malloc=malloc)
    return {"predicted_bytes": plan.total, "rows": {r.name: r.bytes for r in plan.rows},
            "shape": dataclasses.asdict(shape)}


def _shape(base: Path):
    from transformers import AutoConfig

    from lorastack.train.plan import Shape

    return Shape.from_config(AutoConfig.from_pretrained(base))


def rebuild(args) -> None:
    """Re-plan the stored measurements (after a change to the plan): nothing is re-measured."""
    from lorastack.train.plan import Shape

    old = common.read_result("memory_plan", args.out)
    if old is None:
        raise SystemExit("bench.memory_plan --rebuild: no memory_plan.json to rebuild from")
    results = []
    for r in old["rows"]:
        pred = _predict(Shape(**r["shape"]), r["quantization"], r["gradient_checkpointing"],
                        r["batch_size"], r["max_length"], r.get("allocator", "system"))
        peaks = r.get("runs_bytes", [r["measured_bytes"]])  # records from before --repeats
        measured = _worst(pred["predicted_bytes"], peaks)
        results.append({**r, **pred, "measured_bytes": measured, "runs_bytes": peaks,
                        "spread": max(peaks) / min(peaks) - 1,
                        "error": _error(pred["predicted_bytes"], measured)})
    args.steps, args.tiny = old["settings"]["steps"], old["setting"] == "tiny"
    args.repeats = old["settings"].get("repeats", 1)
    args.allocator = old["settings"].get("allocator", "system")
    _write(results, args, kept=common.measurement_record(old))


def run(args) -> None:
    from lorastack.adapters.models import resolve_base

    models, variants = (TINY, TINY_VARIANTS) if args.tiny else (MODELS, VARIANTS)
    if args.models:
        models = {k: v for k, v in {**MODELS, **TINY}.items() if k in args.models.split(",")}
    smol = resolve_base("smollm2-135m").path
    results = []
    with tempfile.TemporaryDirectory(prefix="lorastack-plan-") as tmp:
        for name, (fields, batch, length) in models.items():
            if fields is None:
                base = Path(smol)
            else:
                common.log(f"{name}: building random weights")
                base = _make_base(fields, Path(smol), Path(tmp) / name)
            todo = [(q, c, *((1, 32) if args.tiny and fields is None else (batch, length)),
                     False) for q, c in variants]
            if not args.tiny and not args.no_held_out:
                todo += [(q, c, b, t, True) for m, q, c, b, t in HELD_OUT if m == name]
            for quant, ckpt, b, t, held_out in todo:
                label = f"{name} {quant} ckpt={'on' if ckpt else 'off'} {b}x{t}"
                common.log(f"{label} ...")
                pred = _predict(_shape(base), quant, ckpt, b, t, args.allocator)
                runs = []
                for i in range(args.repeats):
                    meas = common.run_worker("bench.memory_plan", [
                        str(base), quant, "1" if ckpt else "0", str(b), str(t),
                        str(args.steps)], label, malloc=args.allocator)
                    err = _error(pred["predicted_bytes"], meas["measured_bytes"])
                    common.log(f"{label} run {i + 1}/{args.repeats}: predicted "
                               f"{pred['predicted_bytes'] / 2**20:.0f} MiB, measured "
                               f"{meas['measured_bytes'] / 2**20:.0f} MiB, error {err:+.1%}")
                    runs.append(meas)
                results.append(_row(name, quant, ckpt, b, t, held_out, pred, runs))
    _write(results, args)


def _row(name: str, quant: str, ckpt: bool, batch: int, length: int, held_out: bool,
         pred: dict, runs: list[dict]) -> dict:
    """One measured row: the run the plan is furthest from stands for it (every run is a
    measurement the goal holds the plan to); `runs_bytes` keeps every run's peak and `spread`
    how far the same row's peaks lie apart (largest / smallest - 1)."""
    peaks = [m["measured_bytes"] for m in runs]
    worst = runs[peaks.index(_worst(pred["predicted_bytes"], peaks))]
    return {"model": name, "quantization": quant, "gradient_checkpointing": ckpt,
            "batch_size": batch, "max_length": length, "held_out": held_out, **pred, **worst,
            "runs_bytes": peaks, "spread": max(peaks) / min(peaks) - 1,
            "error": _error(pred["predicted_bytes"], worst["measured_bytes"])}


def _error(predicted: int, measured: int) -> float:
    return predicted / measured - 1


def _worst(predicted: int, peaks: list[int]) -> int:
    """The measured peak the plan is furthest from."""
    return max(peaks, key=lambda b: abs(_error(predicted, b)))


def _write(results: list[dict], args, kept: dict | None = None) -> None:
    mib = 2**20
    worst = max(abs(r["error"]) for r in results)
    misses = [r for r in results if abs(r["error"]) > TARGET]
    rows = [[r["model"], r["quantization"], "on" if r["gradient_checkpointing"] else "off",
             f"{r['batch_size']} x {r['max_length']}", "yes" if r.get("held_out") else "no",
             f"{r['predicted_bytes'] / mib:.0f}",
             " / ".join(f"{b / mib:.0f}" for b in r["runs_bytes"]),
             f"{r['error']:+.1%}"] for r in results]
    repeated = [r for r in results if len(r["runs_bytes"]) > 1]
    spread = max((r["spread"] for r in repeated), default=None)
    held = [abs(r["error"]) for r in results if r.get("held_out")]
    from lorastack.train.autobatch import cpu_margin

    # batch_size: auto holds a CPU plan to a share of the budget (by allocator): would a run
    # whose plan used the whole allowance have fitted? (measured <= plan / margin, every row)
    margin = cpu_margin(args.allocator)
    headroom = max(r["measured_bytes"] / (r["predicted_bytes"] / margin) for r in results)
    runtime = sorted(r["runtime_bytes"] for r in results)[len(results) // 2] / mib
    summary = (f"The memory plan, from the model config alone, against the measured peak "
               f"resident memory of {len(results)} training rows ({args.repeats} fresh "
               f"process{'es' if args.repeats > 1 else ''} a row, {args.steps} steps each): "
               f"worst error {worst:.1%}, "
               f"{len(results) - len(misses)} of {len(results)} rows within "
               f"{TARGET:.0%}" + (f"; on the {len(held)} held-out rows (batch shapes the "
                                  f"plan's constants were not fitted on) worst "
                                  f"{max(held):.1%}" if held else "") +
               f". Runtime measured before loading: median {runtime:.0f} MiB." +
               (f" Each row ran {args.repeats} times: the same row's peaks lie up to "
                f"{spread:.1%} apart, and the error shown is the run furthest from the plan."
                if spread is not None else "") +
               f" Allocator: {common.MALLOC_NAMES[args.allocator]}.")
    payload = {
        "title": "Memory plan vs measured", "summary": summary,
        "tables": [common.table(f"Predicted vs measured peak (MiB, whole process, CPU, "
                                f"{common.MALLOC_NAMES[args.allocator]})",
                                ["model", "base", "checkpointing", "batch", "held out",
                                 "predicted", "measured (each run)", "error (worst run)"],
                                rows)],
        "goals": [common.goal("plan error within 15% on every measured row", worst, TARGET,
                              at_least=False, shown=f"worst {worst:.1%}",
                              note="; ".join(f"miss: {r['model']} {r['quantization']} "
                                             f"ckpt={r['gradient_checkpointing']} "
                                             f"{r['error']:+.1%}" for r in misses)),
                  common.goal("batch_size: auto fits on every measured row (measured peak "
                              "within the budget its plan was held to)", headroom, 1.0,
                              at_least=False, shown=f"worst row at {headroom:.0%} of the "
                              f"budget (plans held to {margin:.0%} of it on CPU)")],
        "figure": "memory_plan.png", "rows": results,
        "settings": {"steps": args.steps, "target": TARGET, "repeats": args.repeats,
                     "spread": spread, "allocator": args.allocator},
        "gpu": None,
        "notes": [("GPU rows (an 8B-shaped model, 4-bit QLoRA vs bf16 LoRA) not measured here: "
                  "no GPU measurement was made by this script.")],
    }
    # the peaks are the workers', so the record names their allocator, not this process's
    common.write_result("memory_plan", {**payload, **(kept or {})}, args.out,
                        setting="tiny" if args.tiny else "full", allocator=args.allocator)
    _plot(results, args.out)


def _plot(results: list[dict], out) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['model']}\n{r['quantization']}{' ckpt' if r['gradient_checkpointing'] else ''}"
              for r in results]
    x = range(len(results))
    ax.bar([i - 0.2 for i in x], [r["predicted_bytes"] / 2**30 for r in results], 0.4,
           label="predicted (plan)", color="#36c")
    ax.bar([i + 0.2 for i in x], [r["measured_bytes"] / 2**30 for r in results], 0.4,
           label="measured (peak RSS)", color="#d62")
    for i, r in enumerate(results):
        ax.text(i, max(r["predicted_bytes"], r["measured_bytes"]) / 2**30 * 1.02,
                f"{r['error']:+.0%}", ha="center", fontsize=7)
    ax.set_xticks(list(x), labels, fontsize=6)
    ax.set_ylabel("peak memory, GiB")
    ax.set_title("Memory plan vs measured training peak (CPU, whole process)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, "memory_plan", out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama, two rows")
    p.add_argument("--out", help="results directory (default bench/results)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per row")
    p.add_argument("--repeats", type=int, default=2,
                   help="fresh processes per row (glibc's heap makes the same row's peak vary)")
    p.add_argument("--models", help="comma-separated subset of " + ", ".join(MODELS))
    p.add_argument("--no-held-out", action="store_true", help="skip the HELD_OUT rows")
    p.add_argument("--rebuild", action="store_true",
                   help="re-plan the stored measurements (nothing re-measured)")
    common.add_allocator_arg(p)
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        base, quant, ckpt, batch, length, steps = args.worker
        sys.stdout.write(json.dumps(worker(base, quant, ckpt == "1", int(batch), int(length),
                                           int(steps))) + "\n")
        return
    if args.rebuild:
        rebuild(args)
        return
    if args.tiny:
        args.steps = min(args.steps, 2)
        args.repeats = 1
    run(args)


if __name__ == "__main__":
    main()
