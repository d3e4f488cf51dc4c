"""Engine deaths under odd but valid requests: a seeded random mix of /v1/classify and
completions against one gateway, counting 5xx answers and vLLM restarts.

    .venv/bin/python -m bench.fuzz                  # 80 requests at concurrency 8
    .venv/bin/python -m bench.fuzz --tiny --out /tmp/b

Writes bench/results/fuzz.json and fuzz.png. The gateway serves copies of reviews-classify under
three label sets (one token per label; several tokens per label, "Sci/Tech"-like; labels that
are prefixes of each other, scored with the end-of-turn token), reviews-condition and the base
model. Requests draw: classify on one adapter or an ensemble of up to three, 1-32 inputs;
completions and chat on the base or any adapter, with n, logprobs, prompt_logprobs (the request
that killed vLLM 0.32's CPU engine before lorastack's plugin), echo, stop, sampling.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

from bench.common import goal, log, pyplot, save_figure, table, write_result
from bench.load import closed_loop
from bench.serving_setup import (
    CLS,
    GEN,
    Reviews,
    base_name,
    gateway_metric,
    servers,
    source_store,
    start_gateway,
    work_dir,
)
from bench.serving_setup import add_common_args as _common
from lorastack.adapters.store import AdapterStore

LABEL_SETS = {  # adapter -> (label words, score the end-of-turn token too)
    "cls-single": ({}, False),
    "cls-multi": ({"positive": "Sci/Tech", "negative": "World News",
                   "neutral": "Business & Finance"}, False),
    "cls-prefix": ({"positive": "good/positive", "negative": "good/negative",
                    "neutral": "good"}, True),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common(parser)
    parser.add_argument("--requests", type=int, help="requests sent (80; tiny 12)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build(src: AdapterStore, root) -> AdapterStore:
    store = AdapterStore(root)
    cls = src.resolve(CLS)
    for name, (words, end) in LABEL_SETS.items():
        manifest = cls.manifest.replace(name=name, label_words=words, score_end_of_turn=end)
        store.write(name, cls.path, manifest)
    src.copy(GEN, "gen", into=store)
    return store


def requests(reviews: Reviews, url: str, rng: random.Random):
    models = [base_name(), "gen", *LABEL_SETS]

    def make(i: int):
        kind = rng.choice(["classify", "classify", "completions", "chat"])
        if kind == "classify":
            members = rng.sample(list(LABEL_SETS), rng.choice([1, 1, 2, 3]))
            n = rng.choice([1, 2, 4, 8, 16, 32])
            return url + "/v1/classify", {"model": members if len(members) > 1 else members[0],
                                          "input": [reviews.take() for _ in range(n)]}
        model = rng.choice(models)
        fmt = model if model in reviews.manifests else "gen"
        body = {"model": model, "max_tokens": rng.randint(1, 16),
                "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 99)}
        if rng.random() < 0.3:
            body["n"] = 2
        if rng.random() < 0.3:
            body["stop"] = ["."]
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": reviews.take()["text"][:600]}]
            if rng.random() < 0.5:
                body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
            return url + "/v1/chat/completions", body
        prompts = [reviews.prompt(fmt, reviews.take()) for _ in range(rng.choice([1, 1, 2, 4]))]
        body["prompt"] = prompts if len(prompts) > 1 else prompts[0]
        if rng.random() < 0.4:
            body["prompt_logprobs"] = rng.choice([0, 1, 3])
        if rng.random() < 0.4:
            body["logprobs"] = rng.randint(0, 5)
        if rng.random() < 0.2:
            body["echo"] = True
        return url + "/v1/completions", body

    return make


def main() -> None:
    args = parse_args()
    total = args.requests or (12 if args.tiny else 80)
    concurrency = 4 if args.tiny else 8
    work = work_dir(args, "fuzz")
    with servers(args, work) as started:
        store = build(source_store(args, work), work / "store")
        manifests = {n: store.resolve(n).manifest for n in ["gen", *LABEL_SETS]}
        reviews = Reviews(manifests)
        gateway = start_gateway(store, work, capacity=8, max_loras=4)
        started.append(gateway)
        gateway.wait_ready()
        restarts_before = gateway_metric(gateway.url, "lorastack_vllm_restarts_total")
        rng = random.Random(args.seed)
        run = closed_loop("fuzz", requests(reviews, gateway.url, rng), total, concurrency)
        restarts = sum(gateway_metric(gateway.url, "lorastack_vllm_restarts_total").values()) - \
            sum(restarts_before.values())
        log(f"{run.ok} ok, {run.failed} not 200 ({dict(run.statuses)}); vLLM restarts: "
            f"{restarts:.0f}")
        report = analyse(run, restarts, {"requests": total, "concurrency": concurrency,
                                         "seed": args.seed, "label_sets": {
                                             k: v[0] or "the labels themselves"
                                             for k, v in LABEL_SETS.items()}})
        if restarts or report["server_errors"]:  # what died, for whoever reads the result
            report["engine_log"] = engine_errors(work / "gateway" / "vllm.log")
            report["gateway_log"] = engine_errors(work / "gateway.log", ("died", "blamed"))
        plot(report, args.out)
        write_result("fuzz", report, args.out, setting="tiny" if args.tiny else "full")


def engine_errors(path, words=("Error", "Traceback", "fatal", "File \"")) -> list[str]:
    """The lines of a server's log that tell why an engine died (the last 60 of them)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return [f"(no log: {exc})"]
    return [line[-400:] for line in lines if any(w in line for w in words)][-60:]


def analyse(run, restarts: float, settings: dict) -> dict:
    statuses = Counter({int(k): v for k, v in run.statuses.items()})
    kinds = Counter(e[3] for e in run.events)
    server_errors = sum(v for k, v in statuses.items() if k >= 500 or k == 0)
    text = (f"{sum(statuses.values())} fuzzed requests at concurrency {settings['concurrency']}: "
            f"{statuses.get(200, 0)} answered 200, {server_errors} with a 5xx or no answer; "
            f"vLLM's engine died {restarts:.0f} time(s).")
    return {"title": "Fuzz: engine deaths", "settings": settings, "summary": text,
            "statuses": dict(statuses), "restarts": restarts, "server_errors": server_errors,
            "failures": run.failures[:10],
            "goals": [goal("zero engine deaths in a fuzz of classify and completions", restarts,
                           0, at_least=False, shown=f"{restarts:.0f} deaths"),
                      goal("zero 5xx answers", server_errors, 0, at_least=False,
                           shown=f"{server_errors} of {sum(statuses.values())}")],
            "tables": [table("Answers by HTTP status", ["status", "requests"],
                             [[k, v] for k, v in sorted(statuses.items())]),
                       table("Requests by model", ["model", "requests"],
                             [[k, v] for k, v in sorted(kinds.items())])],
            "notes": [("4xx answers are expected: some drawn requests are refused by the "
                       "gateway or vLLM with a clear message (e.g. echo with "
                       "prompt_logprobs).")],
            "figure": "fuzz.png"}


def plot(report: dict, out) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    items = sorted(report["statuses"].items())
    ax.bar([str(k) for k, _ in items], [v for _, v in items],
           color=["#4a4" if k == 200 else "#c44" if k >= 500 or k == 0 else "#cc4"
                  for k, _ in items])
    ax.set_xlabel("HTTP status")
    ax.set_ylabel("requests")
    ax.set_title(f"Fuzz: {report['restarts']:.0f} engine deaths")
    fig.tight_layout()
    save_figure(fig, "fuzz", out)


if __name__ == "__main__":
    main()
