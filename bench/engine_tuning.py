"""vLLM-on-CPU settings for lorastack's workload, each measured: the numbers behind `lorastack
serve`'s defaults for the process layout, thread binding, batched tokens and the KV block size.

    .venv/bin/python -m bench.engine_tuning              # every configuration below, 2 rounds
    .venv/bin/python -m bench.engine_tuning --only all-cores,worker-process
    .venv/bin/python -m bench.engine_tuning --tiny --out /tmp/b    # tests: the default only

Writes bench/results/engine_tuning.json and engine_tuning.png. Each configuration starts its
own `lorastack serve` (the vLLM child inherits the environment and LORASTACK_VLLM_ARGS) and
gets three closed-loop loads at concurrency 16: generation on 8 adapters, generation on the
base model (16 tokens each, one drug review per request), and /v1/classify on 4 classifiers (one
review per request). Everything is reported against vLLM's own defaults on the same run, with
each start's time to ready and, after its loads, the memory the gateway and its engine hold (the
proportional set size of the whole process tree, with the 2 GiB KV cache and every adapter).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil

from bench.common import goal, log, pyplot, save_figure, spread, table, write_result
from bench.load import closed_loop
from bench.serving_setup import (
    CLS,
    Reviews,
    base_name,
    build_store,
    source_store,
    spread_names,
    start_gateway,
    work_dir,
)
from bench.serving_setup import add_common_args as _common

_CORES = sorted(os.sched_getaffinity(0))
# name -> (what it is, environment of `lorastack serve` and so of its vLLM child)
# LORASTACK_VLLM_THREADS=vllm keeps vLLM's own thread placement and process layout (lorastack's
# default overrides both; see serve/vllm_proc.py and ServeSettings.vllm_threads).
CONFIGS = {
    "vllm-default": ("vLLM's own: a worker process, 1 core reserved, 1 OpenMP thread",
                     {"LORASTACK_VLLM_THREADS": "vllm"}),
    "all-cores": ("both cores, none reserved, the model inside the engine-core process",
                  {"LORASTACK_VLLM_THREADS": "all"}),
    "all-cores-bound": ("all-cores + its OpenMP threads bound to the cores",
                        {"LORASTACK_VLLM_THREADS": "all", "OMP_NUM_THREADS": str(len(_CORES)),
                         "OMP_PLACES": "{" + ",".join(map(str, _CORES)) + "}",
                         "OMP_PROC_BIND": "true"}),
    "worker-process": ("both cores bound to a worker process, none reserved (the old default)",
                       {"LORASTACK_VLLM_THREADS": "all", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}),
    "worker-process-unbound": ("worker-process, its OpenMP threads not bound",
                               {"LORASTACK_VLLM_THREADS": "all",
                                "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                                "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                "OMP_NUM_THREADS": str(len(_CORES))}),
    "batched-512": ("all-cores + --max-num-batched-tokens 512",
                    {"LORASTACK_VLLM_THREADS": "all",
                     "LORASTACK_VLLM_ARGS": json.dumps(["--max-num-batched-tokens", "512"])}),
    "batched-4096": ("all-cores + --max-num-batched-tokens 4096",
                     {"LORASTACK_VLLM_THREADS": "all",
                      "LORASTACK_VLLM_ARGS": json.dumps(["--max-num-batched-tokens", "4096"])}),
    "block-32": ("all-cores + --block-size 32 (finer prefix caching)",
                 {"LORASTACK_VLLM_THREADS": "all",
                  "LORASTACK_VLLM_ARGS": json.dumps(["--block-size", "32"])}),
    "no-prefix-cache": ("all-cores + --no-enable-prefix-caching",
                        {"LORASTACK_VLLM_THREADS": "all",
                         "LORASTACK_VLLM_ARGS": json.dumps(["--no-enable-prefix-caching"])}),
    "max-loras-8": ("all-cores + --max-loras 8: all 8 adapters in one batch",
                    {"LORASTACK_VLLM_THREADS": "all"}),
}
MAX_LORAS = {"max-loras-8": 8}  # the others: 4
DEFAULT = "all-cores"  # what `lorastack serve` does without LORASTACK_VLLM_* settings
LOADS = ("adapters", "base", "classify")
UNITS = {"adapters": "tokens_per_s", "base": "tokens_per_s", "classify": "requests_per_s"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common(parser)
    parser.add_argument("--only", help="comma-separated configurations (default: all)")
    parser.add_argument("--requests", type=int, help="requests per load (32; tiny 4)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tiny = args.tiny
    names = args.only.split(",") if args.only else (
        [DEFAULT] if tiny else list(CONFIGS))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    repeats = args.repeats or (1 if tiny else 2)
    total = args.requests or (4 if tiny else 32)
    c = 4 if tiny else 16
    work = work_dir(args, "engine-tuning")
    try:
        src = source_store(args, work)
        gen_names = spread_names("gen", 2 if tiny else 8)
        cls_names = spread_names("cls", 2 if tiny else 4, (CLS,))
        store = build_store(src, work / "store", {**gen_names, **cls_names})
        manifests = {n: store.resolve(n).manifest for n in [*gen_names, *cls_names]}
        reviews = Reviews(manifests)
        runs = []
        for rnd in range(repeats):
            for name in (names if rnd % 2 == 0 else names[::-1]):
                runs += measure(name, rnd, store, work, reviews, gen_names, cls_names, total, c)
        report = analyse(runs, names, {"concurrency": c, "requests_per_load": total,
                                       "rounds": repeats, "prompts": reviews.describe()})
        plot(report, args.out)
        write_result("engine_tuning", report, args.out, setting="tiny" if tiny else "full")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(name, rnd, store, work, reviews, gen_names, cls_names, total, c) -> list[dict]:
    env = CONFIGS[name][1]
    gateway = start_gateway(store, work / f"{name}-{rnd}", capacity=12,
                            max_loras=MAX_LORAS.get(name, 4), env=env)
    try:
        startup = gateway.wait_ready()
        url = gateway.url
        gen, cls = list(gen_names), list(cls_names)
        turn = itertools.count()

        def completion(model_of):
            def make(i):
                model = model_of(i)
                fmt = model if model in reviews.manifests else gen[0]  # base: gen's format
                prompt = reviews.prompt(fmt, reviews.take())
                return (url + "/v1/completions",
                        {"model": model, "prompt": prompt, "max_tokens": 16, "min_tokens": 16,
                         "temperature": 0})
            return make

        makers = {
            "adapters": completion(lambda i: gen[next(turn) % len(gen)]),
            "base": completion(lambda i: base_name()),
            "classify": lambda i: (url + "/v1/classify", {"model": cls[next(turn) % len(cls)],
                                                          "input": [reviews.take()]}),
        }
        for load in LOADS:  # warm: every adapter loaded, every code path run once
            closed_loop(load, makers[load], len(gen) if load != "classify" else len(cls), 1)
        out = []
        for load in LOADS:
            run = closed_loop(load, makers[load], total, c).summary()
            out.append({"config": name, "round": rnd, "load": load, "vllm_start_s": startup,
                        **{k: v for k, v in run.items() if k != "latencies_s"}})
            log(f"{name} round {rnd + 1} {load}: {run[UNITS[load]]:.2f} "
                f"{UNITS[load].replace('_per_s', '/s')} ({run['failed']} failed)")
        memory = gateway.memory_gib()  # after the loads: KV cache, LoRA slots, every adapter
        log(f"{name} round {rnd + 1}: the gateway and its engine hold {memory:.2f} GiB (PSS)")
        return [{**r, "memory_gib": memory} for r in out]
    finally:
        gateway.stop()


def analyse(runs: list[dict], names: list[str], settings: dict) -> dict:
    values = {(n, load): [r[UNITS[load]] for r in runs if r["config"] == n and r["load"] == load
                          and r[UNITS[load]]] for n in names for load in LOADS}
    base = names[0]
    ref = {load: spread(values[(base, load)])["median"] for load in LOADS}
    results = {}
    for n in names:
        per = {load: spread(values[(n, load)]) for load in LOADS}
        rel = {load: per[load]["median"] / ref[load] for load in LOADS}
        first = [r for r in runs if r["config"] == n and r["load"] == LOADS[0]]  # one a start
        ready = spread([r["vllm_start_s"] for r in first])
        memory = spread([r["memory_gib"] for r in first])
        results[n] = {"what": CONFIGS[n][0], "env": CONFIGS[n][1], **per, "ready_s": ready,
                      "memory_gib": memory,
                      "vs_first": rel, "score": math.exp(sum(map(math.log, rel.values())) / 3),
                      "failed": sum(r["failed"] for r in runs if r["config"] == n)}
    best = max(names, key=lambda n: results[n]["score"])
    rows = [[n, results[n]["what"], *(f"{results[n][load]['median']:.2f}" for load in LOADS),
             f"{results[n]['score']:.2f}x", f"{results[n]['ready_s']['median']:.0f}",
             f"{results[n]['memory_gib']['median']:.2f}"]
            for n in names]
    default = DEFAULT if DEFAULT in results else None
    text = (f"Best of {len(names)} configurations: {best} ({results[best]['what']}), "
            f"{results[best]['score']:.2f}x {base} on the geometric mean of the three loads. "
            f"`lorastack serve` runs {DEFAULT} by default.")
    chosen = results[default]["score"] / results[best]["score"] if default else None
    return {"title": "vLLM settings on CPU", "settings": settings, "configs": results,
            "best": best, "default": DEFAULT, "runs": runs, "summary": text,
            "goals": [goal(f"lorastack serve's default ({DEFAULT}) within 5% of the best "
                           f"configuration measured", chosen, 0.95,
                           shown=f"{chosen:.2f}x the best ({best})" if chosen else None)],
            "tables": [table(f"Concurrency {settings['concurrency']}: generation tokens/s (8 "
                             f"adapters, base) and classify requests/s, median of rounds",
                             ["configuration", "what", "8 adapters tok/s", "base tok/s",
                              "classify req/s", f"vs {base}", "ready (s)", "memory (GiB)"],
                             rows)],
            "figure": "engine_tuning.png"}


def plot(report: dict, out) -> None:
    plt = pyplot()
    names = list(report["configs"])
    fig, axes = plt.subplots(1, 5, figsize=(20, 4), sharey=True)
    for ax, load in zip(axes, (*LOADS, "ready_s", "memory_gib")):
        meds = [report["configs"][n][load]["median"] for n in names]
        ax.barh(names, meds, color=["#c44" if n == report["best"] else "#48a" for n in names])
        ax.set_title({"adapters": "generation, 8 adapters (tok/s)", "base": "generation, "
                      "base (tok/s)", "classify": "/v1/classify (req/s)",
                      "ready_s": "gateway ready after (s, lower is better)",
                      "memory_gib": "memory (GiB PSS, lower is better)"}[load])
    axes[0].invert_yaxis()
    fig.suptitle("vLLM on CPU: settings for lorastack's workload (higher is better)")
    fig.tight_layout()
    save_figure(fig, "engine_tuning", out)


if __name__ == "__main__":
    main()
