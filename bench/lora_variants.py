"""LoRA+ and PiSSA against plain LoRA on the drug reviews: the same config, one change each.

    .venv/bin/python -m bench.lora_variants                 # ~5 min a run on 2 cores
    .venv/bin/python -m bench.lora_variants --seeds 0 1     # two seeds a variant
    .venv/bin/python -m bench.lora_variants --tiny --out /tmp/b

Every run trains the shipped reviews-classify config on the float base (PiSSA needs one; the
4-bit base would make plain LoRA and LoRA+ three times slower here) into a temporary store:
- lora: the config as shipped;
- lora+: training.loraplus_lr_ratio=16 (B learns at 16x lr, the LoRA+ paper's default);
- pissa: lora.init=pissa (A, B from the top-16 singular vectors; stored as a rank-32 LoRA).
The figures are the trainer's own evaluation of the stored adapter on the 379 test reviews
(the float base as served, calibrated on validation): accuracy, macro-F1, neutral F1, ECE,
and the training time. Nothing here selects on test; validation macro-F1 is shown beside it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench import common

CONFIG = "reviews-classify"
VARIANTS = {
    "lora": {},
    "lora+": {"training": {"loraplus_lr_ratio": 16.0}},
    "pissa": {"lora": {"init": "pissa", "serving_rank": 32}},
}


def _config(variant: str, seed: int, root: Path, tiny: bool) -> dict:
    from lorastack.train import load_config

    cfg = load_config(CONFIG).model_dump(mode="json", exclude={"search"})
    cfg.update(name=f"{CONFIG}-{variant.replace('+', 'plus')}-s{seed}", quantization="none",
               store=str(root / "store"), runs_dir=str(root / "runs"))
    for section, values in VARIANTS[variant].items():
        cfg[section].update(values)
    cfg["training"]["seed"] = seed
    if tiny:
        cfg["data"].update(limit_train=8, limit_eval=4)
        cfg["training"].update(max_steps=1, eval_every=1, save_every=1)
    return cfg


def _neutral(metrics: dict) -> float:
    return float(metrics.get("per_class", {}).get("neutral", {}).get("f1", 0.0))


def run(args) -> None:
    from lorastack.train import train

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-lora-variants-") as tmp:
        for seed in args.seeds:
            for variant in args.variants:
                common.log(f"training {variant}, seed {seed} ...")
                result = train(_config(variant, seed, Path(tmp), args.tiny))
                test, val = result.metrics["test"], result.metrics["validation"]
                runs.append({
                    "variant": variant, "seed": seed, "settings": VARIANTS[variant],
                    "test": {k: test[k] for k in ("n", "accuracy", "macro_f1", "ece")}
                    | {"neutral_f1": _neutral(test)},
                    "validation_macro_f1": val["macro_f1"],
                    "rank_stored": _stored_rank(Path(result.adapter_dir)),
                    "train_seconds": result.summary["train_seconds"],
                    "best_step": result.summary["best_step"],
                    "steps": result.summary["steps"]})
    rows, means = [], {}
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]
        mean = {k: sum(r["test"][k] for r in mine) / len(mine)
                for k in ("accuracy", "macro_f1", "neutral_f1", "ece")}
        means[variant] = mean
        for r in mine:
            rows.append([variant, r["seed"], f"{r['validation_macro_f1']:.3f}",
                         f"{r['test']['accuracy']:.3f}", f"{r['test']['macro_f1']:.3f}",
                         f"{r['test']['neutral_f1']:.3f}", f"{r['test']['ece']:.3f}",
                         r["rank_stored"], f"{r['train_seconds'] / 60:.1f} min"])
    n = runs[0]["test"]["n"]
    base = means.get("lora")
    deltas = {v: m["macro_f1"] - base["macro_f1"] for v, m in means.items()
              if base and v != "lora"}
    summary = (f"Test macro-F1 over {len(args.seeds)} seed(s) on {n} test reviews: "
               + ", ".join(f"{v} {m['macro_f1']:.3f}" for v, m in means.items())
               + (" (" + ", ".join(f"{v} {d:+.3f} vs lora" for v, d in deltas.items()) + ")"
                  if deltas else "") + ".")
    payload = {
        "title": "LoRA+ and PiSSA", "summary": summary,
        "tables": [common.table(
            f"reviews-classify on the float base, one change a row; {n} test reviews "
            f"(validation macro-F1: what selection saw).",
            ["variant", "seed", "val macro-F1", "accuracy", "macro-F1", "neutral F1", "ECE",
             "stored rank", "training"], rows)],
        "goals": [], "figure": "lora_variants.png", "runs": runs, "means": means,
        "settings": {"seeds": args.seeds, "variants": VARIANTS, "config": CONFIG},
    }
    common.write_result("lora_variants", payload, args.out,
                        setting="tiny" if args.tiny else "full")
    _plot(runs, args.variants, args.out)


def _stored_rank(adapter_dir: Path) -> int:
    from peft import LoraConfig

    return int(LoraConfig.from_pretrained(adapter_dir).r)


def _plot(runs: list[dict], variants: list[str], out) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    metrics = [("macro_f1", "macro-F1"), ("neutral_f1", "neutral F1"), ("accuracy", "accuracy")]
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        mine = [r for r in runs if r["variant"] == variant]
        for j, (key, _) in enumerate(metrics):
            values = [r["test"][key] for r in mine]
            x = j + (i - (len(variants) - 1) / 2) * width
            ax.bar(x, sum(values) / len(values), width * 0.9, color=f"C{i}",
                   label=variant if j == 0 else None)
            ax.plot([x] * len(values), values, "k.", markersize=4)  # each seed
    ax.set_xticks(range(len(metrics)), [m[1] for m in metrics])
    ax.set_ylim(0, 1)
    ax.set_title("reviews-classify, test reviews (bars: mean over seeds, dots: each seed)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, "lora_variants", out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="1-step runs on 8 reviews, evaluated on 4 (the test suite)")
    p.add_argument("--out", help="results directory (default bench/results)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
