"""Quality of the shipped adapters on the held-out test reviews, against what a user would try.

    .venv/bin/python -m bench.quality             # seconds (minutes with --reevaluate)
    .venv/bin/python -m bench.quality --tiny --out /tmp/b

- sentiment (reviews-classify, 379 test reviews): the adapter's accuracy and macro-F1 vs the
  base model zero-shot (same prompt, same label scoring) and TF-IDF + logistic regression
  (bench/baselines.py: the default recipe and one tuned on the validation split);
- condition (reviews-condition, generation): exact match and token F1 vs zero-shot;
- each with the training time it took.

The adapters' figures are the trainer's own evaluation, recorded in each adapter's manifest
when it was written to the store (the float base, as served); --reevaluate computes them again
from the stored weights. Training time comes from the run's summary.json (runs/<name>/) when
that run is the one whose adapter is in the store (same test metrics). Zero-shot figures are
computed once (`lorastack eval <config> --zero-shot` gives the same) and kept in
bench/results/zeroshot-<config>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench import common

CONFIGS = {"classification": "reviews-classify", "generation": "reviews-condition"}
TINY_LIMIT = 4  # test reviews evaluated by --tiny


def _train_tiny(root: Path) -> Path:
    """Two 1-step adapters (one per task) in a temporary store, for --tiny."""
    from lorastack.train import load_config, train

    store = root / "store"
    for config in CONFIGS.values():
        cfg = load_config(config).model_dump(mode="json")
        cfg.update(store=str(store), runs_dir=str(root / "runs"), quantization="none",
                   evaluate_test=False)
        cfg["data"].update(limit_train=8, limit_eval=TINY_LIMIT)
        cfg["training"].update(max_steps=1, eval_every=1, save_every=1, batch_size=8)
        if cfg["task"]["type"] == "generation":
            cfg["task"]["max_new_tokens"] = 4
        train(cfg)
    return store


def _run_summary(runs_dir: Path, name: str, test: dict) -> dict | None:
    """The summary.json of the run that produced the stored adapter (matching test metrics)."""
    path = runs_dir / name / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    ran = summary.get("metrics", {}).get("test", {})
    keys = [k for k in ("accuracy", "macro_f1", "exact_match", "token_f1") if k in test]
    if keys and all(abs(float(ran.get(k, -1)) - float(test[k])) < 1e-9 for k in keys):
        return summary
    return None


def _search_summary(runs_dir: Path, name: str, test: dict) -> dict | None:
    """runs/<name>-tune/summary.json when the stored adapter is that search's best trial."""
    path = runs_dir / f"{name}-tune" / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    ran = summary.get("best", {}).get("test", {})
    if ran and abs(float(ran.get("macro_f1", -1)) - float(test.get("macro_f1", -2))) < 1e-9:
        return summary
    return None


def _neutral_f1(metrics: dict) -> float | None:
    if "f1_neutral" in metrics:
        return float(metrics["f1_neutral"])
    row = (metrics.get("per_class") or {}).get("neutral")
    return None if row is None else float(row["f1"])


def _zero_shot(config: str, limit: int | None, tiny: bool) -> dict:
    from lorastack.train.assess import evaluate_zero_shot

    cached = common.RESULTS / f"zeroshot-{config}.json"
    if not tiny and cached.exists():
        return json.loads(cached.read_text())
    common.log(f"zero-shot {config} ...")
    metrics = evaluate_zero_shot(config, limit=limit)
    if not tiny:
        from lorastack.adapters.fsutil import atomic_write_json

        atomic_write_json(cached, metrics)
    return metrics


def run(args) -> None:
    from lorastack.adapters.store import AdapterStore
    from lorastack.train.assess import evaluate_adapter

    tmp = tempfile.TemporaryDirectory(prefix="bench-quality-") if args.tiny else None
    store_root = _train_tiny(Path(tmp.name)) if tmp else args.store
    runs_dir = Path(tmp.name) / "runs" if tmp else Path(args.runs_dir)
    limit = TINY_LIMIT if args.tiny else None
    store = AdapterStore(store_root)
    found = {}
    for task, config in CONFIGS.items():
        try:
            adapter = store.resolve(config)
        except Exception as exc:  # noqa: BLE001 - the store's own message says what is wrong
            raise SystemExit(f"bench.quality: {exc}\nTrain the shipped adapters first: "
                             "`make quickstart` (or `lorastack train "
                             f"{config} --if-missing`).") from None
        test = dict(adapter.manifest.metrics.test)
        if args.reevaluate or args.tiny:
            common.log(f"evaluating {config} on the test split ...")
            test = evaluate_adapter(config, store=store_root, limit=limit)
        summary = _run_summary(runs_dir, config, dict(adapter.manifest.metrics.test))
        search = _search_summary(runs_dir, config, dict(adapter.manifest.metrics.test))
        if search and "per_class" not in test:  # the search's record keeps every label's F1
            test = {**search["best"]["test"], **test}
        found[task] = {"adapter": config, "test": test, "quantization":
                       adapter.manifest.training.get("quantization"),
                       "temperature": adapter.manifest.temperature,
                       "label_bias": dict(adapter.manifest.label_bias), "search": search,
                       "train_seconds": summary and summary.get("train_seconds"),
                       "wall_seconds": summary and summary.get("wall_seconds"),
                       "machine": summary and summary.get("machine"),
                       "zero_shot": _zero_shot(config, limit, args.tiny)}

    from bench.baselines import tfidf_baselines

    tfidf = tfidf_baselines()
    cls, gen = found["classification"], found["generation"]

    def minutes(entry):
        if entry.get("search"):
            found = entry["search"]
            return (f"search: {found['trials']} trials ({found['pruned']} pruned) in "
                    f"{found['search_seconds'] / 60:.0f} min")
        if not entry.get("wall_seconds"):
            return "not recorded"
        return (f"{entry['wall_seconds'] / 60:.1f} min ({entry['train_seconds'] / 60:.1f} "
                "in the loop)")

    n_cls = int(cls["test"].get("n", 0)) or "?"
    n_gen = int(gen["test"].get("n", 0)) or "?"
    def neutral(metrics):
        value = _neutral_f1(metrics)
        return "-" if value is None else f"{value:.3f}"

    cls_rows = [[f"lorastack adapter ({cls['quantization']} QLoRA)"
                 if cls["quantization"] != "none" else "lorastack adapter (LoRA)",
                 f"{cls['test']['accuracy']:.3f}", f"{cls['test']['macro_f1']:.3f}",
                 neutral(cls["test"]), minutes(cls)],
                ["base model, zero-shot (same prompt and scoring)",
                 f"{cls['zero_shot']['accuracy']:.3f}", f"{cls['zero_shot']['macro_f1']:.3f}",
                 neutral(cls["zero_shot"]), "none"]]
    cls_rows += [[f"TF-IDF + logistic regression, {t['method'].split('(')[1].rstrip(')')}",
                  f"{t['accuracy']:.3f}", f"{t['macro_f1']:.3f}", neutral(t),
                  f"{t['train_seconds']:.1f} s"] for t in tfidf]
    if "macro_f1_unbiased" in cls["test"]:  # the adapter's label bias, fitted on validation
        from lorastack.adapters.labels import describe_bias

        cls_rows[0][0] += f", label bias {describe_bias(cls['label_bias'], digits=2)}"
        cls_rows.insert(1, ["the same adapter without its label bias",
                            f"{cls['test']['accuracy_unbiased']:.3f}",
                            f"{cls['test']['macro_f1_unbiased']:.3f}", "-", ""])
    ensemble = (cls.get("search") or {}).get("ensemble")
    if ensemble and ensemble["metrics"].get("test"):
        ens_test = ensemble["metrics"]["test"]
        weights = ", ".join(f"{w:.2f}" for w in ensemble["weights"].values())
        k = len(ensemble["weights"])
        fitted = {"macro_f1": "macro-F1"}.get(ensemble.get("objective", "nll"), "NLL")
        method = (f"ensemble {ensemble['name']} of the top {k} trials (weights {weights}, "
                  f"fitted for validation {fitted})")
        cls_rows.insert(1, [method, f"{ens_test['accuracy']:.3f}", f"{ens_test['macro_f1']:.3f}",
                            neutral(ens_test), "(the search)"])
    ece, ece_raw = cls["test"].get("ece"), cls["test"].get("ece_uncalibrated")
    calibration_rows = [["expected calibration error (test, 10 bins)",
                         "-" if ece_raw is None else f"{ece_raw:.3f}",
                         "-" if ece is None else f"{ece:.3f}"],
                        ["negative log-likelihood (test)",
                         f"{cls['test']['nll_uncalibrated']:.3f}"
                         if "nll_uncalibrated" in cls["test"] else "-",
                         f"{cls['test']['nll']:.3f}" if "nll" in cls["test"] else "-"]]
    search = cls.get("search")
    goals = [
        common.goal("sentiment macro-F1 >= 0.62 on the test reviews", cls["test"]["macro_f1"],
                    0.62, note=_search_note(search)),
        common.goal("neutral F1 >= 0.30 on the test reviews", _neutral_f1(cls["test"]), 0.30),
        common.goal("expected calibration error <= 0.05 after temperature scaling", ece, 0.05,
                    at_least=False, note="" if ece_raw is None else
                    f"before: {ece_raw:.3f} (temperature {cls['temperature']:.3f})"),
        _ensemble_goal(ensemble),
        common.goal("search time <= 60 min on 2 cores",
                    search and search["search_seconds"] / 60, 60, at_least=False,
                    note="" if search else "the stored adapter is not a search's best trial"),
    ]
    gen_rows = [["lorastack adapter", f"{gen['test']['exact_match']:.3f}",
                 f"{gen['test']['token_f1']:.3f}", minutes(gen)],
                ["base model, zero-shot (same prompt)", f"{gen['zero_shot']['exact_match']:.3f}",
                 f"{gen['zero_shot']['token_f1']:.3f}", "none"]]
    best_tfidf = max(tfidf, key=lambda t: t["macro_f1"])
    summary = (f"On the {n_cls} test reviews the sentiment adapter reaches accuracy "
               f"{cls['test']['accuracy']:.3f} / macro-F1 {cls['test']['macro_f1']:.3f}, vs "
               f"{cls['zero_shot']['accuracy']:.3f} / {cls['zero_shot']['macro_f1']:.3f} "
               f"zero-shot and {best_tfidf['accuracy']:.3f} / {best_tfidf['macro_f1']:.3f} for "
               f"the tuned TF-IDF baseline; the condition adapter names the condition exactly "
               f"for {gen['test']['exact_match']:.1%} of {n_gen} reviews "
               f"(zero-shot {gen['zero_shot']['exact_match']:.1%}).")
    payload = {
        "title": "Quality", "summary": summary,
        "tables": [
            common.table(f"Sentiment (positive / negative / neutral), {n_cls} test reviews.",
                         ["method", "accuracy", "macro-F1", "neutral F1", "training time"],
                         cls_rows),
            common.table(f"Calibration of the sentiment adapter's probabilities on the "
                         f"{n_cls} test reviews: as scored, and after temperature scaling "
                         f"(T={cls['temperature']:.3f}, fitted on validation).",
                         ["measure", "as scored", "calibrated"], calibration_rows),
            common.table(f"Condition named from the review (generation), {n_gen} test reviews.",
                         ["method", "exact match", "token F1", "training time"], gen_rows)],
        "goals": goals, "figure": "quality.png", "adapters": found, "tfidf": tfidf,
        "settings": {"reevaluated": bool(args.reevaluate or args.tiny), "limit": limit},
    }
    common.write_result("quality", payload, args.out, setting="tiny" if args.tiny else "full")
    _plot(cls, gen, tfidf, args.out)
    if tmp:
        tmp.cleanup()


def _ensemble_goal(ensemble: dict | None) -> dict:
    """The ensemble's test macro-F1 minus its best member's (the best trial), both measured in
    the same run on the same reviews."""
    what = "ensemble of the top 3 trials: macro-F1 at least the best single trial's"
    if not ensemble or not ensemble["metrics"].get("test"):
        return common.goal(what, None, 0.0, note="no ensemble in the search's record "
                           "(lorastack tune --ensemble 3)")
    best = max(ensemble["members"].values(), key=lambda m: m["validation"]["macro_f1"])
    gap = ensemble["metrics"]["test"]["macro_f1"] - best["test"]["macro_f1"]
    return common.goal(what, gap, 0.0, shown=f"{gap:+.3f}",
                       note=f"ensemble {ensemble['metrics']['test']['macro_f1']:.3f} vs best "
                       f"trial {best['test']['macro_f1']:.3f} on test")


def _search_note(search: dict | None) -> str:
    if not search:
        return "one training run of the shipped config (no search)"
    best = search["best"]
    return (f"best of {search['trials']} search trials ({search['pruned']} pruned), trial "
            f"{best['trial']}, validation macro-F1 {best['value']:.3f}")


def _plot(cls: dict, gen: dict, tfidf: list[dict], out) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 1.4]})
    ax = axes[0]
    methods = [("lorastack adapter", cls["test"], "#2a7"),
               ("zero-shot", cls["zero_shot"], "#bbb")]
    methods += [("TF-IDF " + t["method"].split("(")[1].rstrip(")").replace(" on validation", ""),
                 t, "#999") for t in tfidf]
    x = range(len(methods))
    ax.bar([i - 0.2 for i in x], [m[1]["accuracy"] for m in methods], 0.4,
           color=[m[2] for m in methods], label="accuracy")
    ax.bar([i + 0.2 for i in x], [m[1]["macro_f1"] for m in methods], 0.4,
           color=[m[2] for m in methods], alpha=0.55, hatch="//", label="macro-F1")
    ax.set_xticks(list(x), [m[0] for m in methods], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Sentiment, test reviews (solid: accuracy, hatched: macro-F1)", fontsize=9)
    ax = axes[1]
    ax.bar(["adapter", "zero-shot"], [gen["test"]["exact_match"],
                                      gen["zero_shot"]["exact_match"]], color=["#2a7", "#bbb"])
    ax.set_ylim(0, 1)
    ax.set_title("Condition: exact match", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, "quality", out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="train two 1-step adapters on the spot; evaluate on 4 test reviews")
    p.add_argument("--out", help="results directory (default bench/results)")
    p.add_argument("--store", help="adapter store (default: the user's)")
    p.add_argument("--runs-dir", default="runs", help="where `lorastack train` wrote its runs")
    p.add_argument("--reevaluate", action="store_true",
                   help="evaluate the stored adapters again instead of reading their manifests")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
