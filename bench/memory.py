"""Memory of one training step: LoRA on the float32 base vs 8-bit and 4-bit QLoRA.

    .venv/bin/python -m bench.memory              # ~3 min on 2 cores; bench/results/memory.*
    .venv/bin/python -m bench.memory --tiny --out /tmp/b

Each variant runs in a fresh process (rounds interleaved, then reversed): float32 LoRA, 8-bit
and 4-bit QLoRA with lorastack's defaults (gradient checkpointing on for 4-bit, as in the
QLoRA recipe, off otherwise), and 4-bit without checkpointing (the reviews-classify config,
which trades memory for 1.3x speed). The processes run under the allocator `lorastack train`
runs under: tcmalloc, or glibc's malloc with --allocator system (it keeps a varying share of
what a step frees; adapters/allocator.py).

Each process imports the libraries, notes the resident memory (the runtime's own), loads
SmolLM2-135M-Instruct as `lorastack train` does for that `quantization` and attaches the
reviews-classify LoRA, copies float weights out of the checkpoint's memory map and gives freed
memory back to the kernel (allocator.release_free_memory), so that page cache and allocator
leftovers from loading are not counted, notes the resident memory again, resets the kernel's
peak counter (/proc/self/clear_refs), runs one optimizer step (forward, backward, AdamW) on the
8 longest training reviews (the worst batch the config allows), and reads the peak (VmHWM). The
weight footprint is what transformers reports for the loaded model (get_memory_footprint:
parameters and buffers).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

from bench import common
from lorastack.adapters import allocator

# variant -> (quantization, gradient checkpointing); None: lorastack's default for that
# quantization (on for 4-bit, as in the QLoRA recipe; off otherwise)
VARIANTS = {"none": ("none", None), "8bit": ("8bit", None), "4bit": ("4bit", None),
            "4bit-fast": ("4bit", False)}
PRECISIONS = tuple(VARIANTS)
NAMES = {"none": "LoRA, float32 base", "8bit": "QLoRA, 8-bit base (LLM.int8)",
         "4bit": "QLoRA, 4-bit base (NF4, double quant) + checkpointing",
         "4bit-fast": "QLoRA, 4-bit, no checkpointing (reviews-classify)"}


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _off_the_checkpoint_map(model) -> None:
    """Copy float tensors still backed by the checkpoint's memory map into ordinary memory.

    transformers maps the safetensors file; float32 weights (and the 4/8-bit model's float
    embedding and norms) can stay views of that map, whose touched pages count as resident
    (RssFile) though they are page cache the kernel can drop. Copying them out, and letting the
    map go, makes every precision count exactly the memory the step needs.
    """
    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dtype.is_floating_point:
                t.data = t.data.clone()
    gc.collect()


def worker(precision: str, batch_size: int, limit_train: int) -> dict:
    import torch

    from lorastack.adapters.models import resolve_base
    from lorastack.train.batching import collate
    from lorastack.train.config import load_config
    from lorastack.train.examples import PromptFormat, encode_records
    from lorastack.train.model import (
        answer_loss,
        attach_lora,
        load_base,
        load_tokenizer,
        pick_device,
        trainable_parameters,
    )
    from lorastack.train.run import config_splits

    quant, ckpt = VARIANTS[precision]
    cfg = load_config("reviews-classify")
    cfg = cfg.model_copy(update={"quantization": quant, "training": cfg.training.model_copy(
        update={"gradient_checkpointing": ckpt})})
    torch.manual_seed(0)
    base = resolve_base(cfg.base)
    tok = load_tokenizer(base.path)
    splits = config_splits(cfg)
    train = splits.train[:limit_train] if limit_train else splits.train
    fmt = PromptFormat(tok, cfg, list(cfg.task.labels))
    examples = encode_records(fmt, train, "train").examples
    batch_ex = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)[:batch_size]
    gc.collect()
    allocator.release_free_memory()
    runtime_mb = _status_mb("VmRSS")

    device = pick_device()
    model = attach_lora(cfg, load_base(cfg, base.path, device))
    _off_the_checkpoint_map(model)
    footprint_mb = model.get_memory_footprint() / 2**20
    trainable, total = trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.training.lr)
    batch = {k: v.to(device) for k, v in collate(batch_ex, fmt.pad_id).items()}
    gc.collect()
    allocator.release_free_memory()
    loaded_mb = _status_mb("VmRSS")
    reset = _reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    t0 = time.perf_counter()
    loss, _ = answer_loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t0
    peak_mb = _status_mb("VmHWM")
    file_mb = _status_mb("RssFile")
    return {"rss_file_mb": file_mb, "precision": precision, "quantization": quant,
            "gradient_checkpointing": ckpt if ckpt is not None else quant == "4bit",
            "runtime_mb": runtime_mb, "loaded_mb": loaded_mb,
            "step_peak_mb": peak_mb, "peak_reset": reset,
            "step_extra_mb": peak_mb - loaded_mb, "above_runtime_mb": peak_mb - runtime_mb,
            "weights_mb": footprint_mb, "step_seconds": step_s, "loss": float(loss.detach()),
            "batch": [len(batch_ex), max(len(e.input_ids) for e in batch_ex)],
            "trainable_params": trainable, "total_params": total,
            "allocator": allocator.active(),
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20
            if device.type == "cuda" else None}


def _spawn(precision: str, args) -> dict:
    common.log(f"{NAMES[precision]} ...")
    r = common.run_worker("bench.memory", [precision, "--batch-size", str(args.batch_size),
                                           "--limit-train", str(args.limit_train)], precision,
                          malloc=args.allocator)
    common.log(f"{NAMES[precision]}: step peak {r['step_peak_mb']:.0f} MB, weights "
               f"{r['weights_mb']:.0f} MB, step {r['step_seconds']:.1f} s")
    return r


def run(args) -> None:
    setting = "tiny" if args.tiny else "full"
    if args.rebuild:  # re-render the stored runs (presentation changes)
        old = common.read_result("memory", args.out)
        if old is None:
            raise SystemExit("bench.memory --rebuild: no memory.json to rebuild from")
        runs, setting = old["runs"], old["setting"]
        kept = common.measurement_record(old)
        args.repeats, args.batch_size = old["settings"]["repeats"], old["settings"]["batch_size"]
        args.limit_train = old["settings"]["limit_train"]
        args.allocator = old["settings"].get("allocator", "system")  # before it was recorded
    else:
        kept = {}
        runs = {p: [] for p in PRECISIONS}
        for i in range(args.repeats):
            for p in (PRECISIONS if i % 2 == 0 else tuple(reversed(PRECISIONS))):
                runs[p].append(_spawn(p, args))
    med = {p: {k: common.spread(r[k] for r in runs[p])["median"]
               for k in ("runtime_mb", "loaded_mb", "step_peak_mb", "above_runtime_mb",
                         "weights_mb", "step_seconds")} for p in PRECISIONS}
    ratio = common.ratio([r["step_peak_mb"] for r in runs["4bit"]],
                         [r["step_peak_mb"] for r in runs["none"]])
    ratio_model = common.ratio([r["above_runtime_mb"] for r in runs["4bit"]],
                               [r["above_runtime_mb"] for r in runs["none"]])
    rows = [[NAMES[p], f"{med[p]['weights_mb']:.0f}", f"{med[p]['step_peak_mb']:.0f}",
             f"{med[p]['above_runtime_mb']:.0f}",
             f"{med[p]['step_peak_mb'] / med['none']['step_peak_mb']:.2f}",
             f"{med[p]['step_seconds']:.1f}"] for p in PRECISIONS]
    rows.append(["Llama-8B-shaped, GPU (4-bit vs bf16)", "not measured", "not measured",
                 "not measured", "-", "no GPU lent to this session"])
    batch = runs["none"][0]["batch"]
    share = med["none"]["weights_mb"] / med["none"]["step_peak_mb"]
    summary = (f"One training step on the {batch[0]} longest reviews ({batch[1]} tokens): "
               f"4-bit QLoRA's peak is {common.fmt_ratio(ratio)} of float32 LoRA's "
               f"({med['4bit']['step_peak_mb']:.0f} vs {med['none']['step_peak_mb']:.0f} MB; "
               f"{med['4bit-fast']['step_peak_mb']:.0f} MB without checkpointing); "
               f"above the {med['none']['runtime_mb']:.0f} MB the Python/torch runtime holds "
               f"before any model is loaded, {common.fmt_ratio(ratio_model)}. Weights: "
               f"{med['none']['weights_mb']:.0f} MB float32, {med['8bit']['weights_mb']:.0f} MB "
               f"8-bit, {med['4bit']['weights_mb']:.0f} MB 4-bit (the tied 49k x 576 embedding "
               f"stays float32 in all three).")
    payload = {
        "title": "Training memory", "summary": summary,
        "tables": [common.table(
            "Resident memory (MB) of one training step, each precision in a fresh process "
            f"under {common.MALLOC_NAMES[args.allocator]}; medians over the rounds.",
            ["base precision", "weights", "step peak (process)", "step peak above runtime",
             "vs float32", "step time, s"], rows)],
        "goals": [common.goal("4-bit QLoRA's training-step peak at most half of float32 "
                              "LoRA's", ratio["median"], 0.5, at_least=False,
                              shown=common.fmt_ratio(ratio) + " of float32 (whole process); "
                              f"{common.fmt_ratio(ratio_model)} above the runtime",
                              note="measured on the CPU; GPU row not measured (no GPU)")],
        "figure": "memory.png",
        "notes": [(f"On this 135M model the weights are {share:.0%} of float32 LoRA's step "
                   "peak; the rest is activations (float32, the whole batch) and the runtime, "
                   "which quantization does not shrink. 4-bit cuts the weights "
                   f"{med['none']['weights_mb'] / med['4bit']['weights_mb']:.1f}x"
                   + ("; gradient checkpointing (on by default with 4-bit) keeps only each "
                      "layer's input and recomputes the rest in backward: at this size most of "
                      "the saving is that." if ratio["median"] <= 0.5 else
                      ", so the goal (set with 7-8B models in mind, where weights dominate) "
                      "cannot be met at this size.")),
                  ("GPU (Llama-8B-shaped, random weights): not measured: no GPU was lent to "
                   "the session that produced these results.")],
        "settings": {"repeats": args.repeats, "batch_size": args.batch_size,
                     "limit_train": args.limit_train, "allocator": args.allocator},
        "medians": med, "ratio_4bit_to_float32": ratio,
        "ratio_4bit_to_float32_above_runtime": ratio_model, "runs": runs, "gpu": None,
    }
    # the peaks are the workers', so the record names their allocator, not this process's
    common.write_result("memory", {**payload, **kept}, args.out, setting=setting,
                        allocator=args.allocator)
    _plot(med, args.out)


def _plot(med: dict, out) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    names = [NAMES[p] for p in PRECISIONS][::-1]
    parts = [("runtime (torch, libraries)", [med[p]["runtime_mb"] for p in PRECISIONS], "#ccc"),
             ("model + LoRA + batch", [med[p]["loaded_mb"] - med[p]["runtime_mb"]
                                      for p in PRECISIONS], "#36c"),
             ("step (activations, grads, AdamW)", [med[p]["step_peak_mb"] - med[p]["loaded_mb"]
                                                  for p in PRECISIONS], "#d62")]
    left = [0.0] * len(PRECISIONS)
    for label, values, color in parts:
        values = [max(v, 0.0) for v in values]
        ax.barh(names, values[::-1], left=left[::-1], color=color, label=label)
        left = [a + b for a, b in zip(left, values)]
    for y, p in enumerate(PRECISIONS[::-1]):
        ax.text(med[p]["step_peak_mb"] + 30, y, f"{med[p]['step_peak_mb']:.0f} MB "
                f"(weights {med[p]['weights_mb']:.0f})", va="center", fontsize=8)
    ax.set_xlim(0, max(med[p]["step_peak_mb"] for p in PRECISIONS) * 1.35)
    ax.set_xlabel("resident memory at the step's peak, MB")
    ax.set_title("One LoRA training step, SmolLM2-135M, CPU")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.4, -0.2), ncol=3)
    fig.tight_layout()
    common.save_figure(fig, "memory", out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="1 round, a batch of 2")
    p.add_argument("--out", help="results directory (default bench/results)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit-train", type=int, default=0)
    p.add_argument("--rebuild", action="store_true",
                   help="re-render memory.json and the figure from its stored runs")
    common.add_allocator_arg(p)
    p.add_argument("--worker", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.repeats, args.batch_size, args.limit_train = 1, 2, args.limit_train or 16
    if args.worker:
        sys.stdout.write(json.dumps(worker(args.worker, args.batch_size, args.limit_train))
                         + "\n")
        return
    run(args)


if __name__ == "__main__":
    main()
