"""Classification: /v1/classify against the naive server scoring labels with transformers + peft.

    .venv/bin/python -m bench.classify            # full: 4 adapters, concurrency 1/4/16, 3 rounds
    .venv/bin/python -m bench.classify --tiny --out /tmp/b

Writes bench/results/classify.json and classify.png. Both servers hold the same 4 copies of
reviews-classify (tiny: 2 trained on the spot) and get the same kind of request: one drug review
(text, drug, condition) per request, requests spread round robin over the adapters, each review
used once. lorastack: `lorastack serve` as a user runs it (defaults: capacity 8, max-loras 4),
which scores a single-token label set with one forward pass per review inside vLLM. Naive:
bench/naive_server.py, one forward pass per label, one request at a time. Both render the prompt
with the adapter's manifest and tokenize it alike; a few reviews are scored by both at the end and
the largest difference of their probabilities is recorded.
Every round runs both at every concurrency back to back (the order alternates per round); the
ratio of requests/s is paired by round. Goal (the issue): lorastack >= 5x the naive server at
concurrency 16.
"""

from __future__ import annotations

import argparse
import itertools

import httpx

from bench.common import (
    fmt_ratio,
    goal,
    log,
    ratio,
    spread,
    table,
    write_result,
)
from bench.load import by_target, closed_loop, measure_rounds, paired, plot_load
from bench.serving_setup import (
    CLS,
    Reviews,
    build_store,
    concurrency_levels,
    servers,
    source_store,
    spread_names,
    start_gateway,
    start_naive,
    work_dir,
)
from bench.serving_setup import add_common_args as _common

TARGETS = ("lorastack", "naive")
LABELS = {"lorastack": "lorastack /v1/classify", "naive": "naive transformers + peft"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common(parser)
    parser.add_argument("--adapters", type=int, help="classification adapters (4; tiny 2)")
    parser.add_argument("--requests", type=int, help="requests per run to lorastack, at least "
                        "one per worker (12; tiny 2)")
    parser.add_argument("--naive-requests", type=int, help="requests per run to the naive "
                        "server, at least one per worker (4; tiny 2)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tiny = args.tiny
    n = args.adapters or (2 if tiny else 4)
    levels = concurrency_levels(args, (1, 4, 16), (1, 2))
    repeats = args.repeats or (1 if tiny else 3)
    per_run = {"lorastack": args.requests or (2 if tiny else 12),
               "naive": args.naive_requests or (2 if tiny else 4)}
    work = work_dir(args, "classify")
    with servers(args, work) as started:
        src = source_store(args, work)
        names = spread_names("classifier", n, (CLS,))
        store = build_store(src, work / "store", names)
        manifests = {name: store.resolve(name).manifest for name in names}
        adapters = list(names)
        reviews = Reviews(manifests)
        gateway = start_gateway(store, work, capacity=8, max_loras=min(4, n))
        started.append(gateway)
        naive = start_naive(store, work)
        started.append(naive)
        startup = gateway.wait_ready()
        naive.wait_ready()
        urls = {"lorastack": gateway.url, "naive": naive.url}
        turn = itertools.count()

        def maker(target: str):
            def make(i: int):
                return (urls[target] + "/v1/classify",
                        {"model": adapters[next(turn) % n], "input": [reviews.take()]})
            return make

        log("warming up (each adapter once on both servers)")
        for target in TARGETS:
            warm = closed_loop(target, maker(target), n, 1)
            log(f"  {target}: {warm.ok} requests in {warm.seconds:.1f} s")

        runs = measure_rounds(TARGETS, levels, repeats, maker,
                              lambda target, c: max(per_run[target], c), "requests_per_s",
                              "requests/s")
        agreement = compare(urls, adapters, [reviews.take() for _ in range(2 if tiny else 8)])
        settings = {"adapters": n, "adapter_sources": names, "concurrency": levels,
                    "rounds": repeats, "inputs_per_request": 1, "requests_per_run": per_run,
                    "gateway": {"capacity": 8, "max_loras": min(4, n), "dtype": "float32",
                                "kv_cache_gb": 2},
                    "labels": list(manifests[adapters[0]].labels),
                    "vllm_start_s": round(startup, 1), "prompts": reviews.describe()}
        report = analyse(runs, levels, settings, agreement)
        plot_load(report, levels, LABELS, "requests_per_s", "requests/s (one review each)",
                  f"classification, {n} adapters", "classify", args.out)
        write_result("classify", report, args.out, setting="tiny" if tiny else "full")


def compare(urls: dict[str, str], adapters: list[str], records: list[dict]) -> dict:
    """Both servers score the same reviews: the largest difference of a label probability and
    how many top labels agree (the naive server must compute what lorastack computes)."""
    answers = {}
    for target, url in urls.items():
        answers[target] = []
        for i, record in enumerate(records):
            r = httpx.post(url + "/v1/classify", json={"model": adapters[i % len(adapters)],
                                                       "input": [record]}, timeout=600)
            r.raise_for_status()
            answers[target].append(r.json()["data"][0])
    diffs = [abs(a["probabilities"][lab] - b["probabilities"][lab])
             for a, b in zip(answers["lorastack"], answers["naive"]) for lab in a["probabilities"]]
    same = sum(a["label"] == b["label"] for a, b in zip(answers["lorastack"], answers["naive"]))
    return {"inputs": len(records), "max_abs_probability_difference": max(diffs),
            "same_label": same}


def analyse(runs: list[dict], levels: list[int], settings: dict, agreement: dict) -> dict:
    summary = by_target(runs, "requests_per_s")
    ratios = {}
    for c in levels:
        pairs = paired(runs, "requests_per_s", "lorastack", "naive", c)
        ratios[c] = ratio([a for a, _ in pairs], [b for _, b in pairs])
    top = max(levels)
    failed = sum(r["failed"] for r in runs)
    rows = []
    for target in TARGETS:
        for c in levels:
            s = summary[target][c]
            rps = s["requests_per_s"]
            rows.append([LABELS[target], c, f"{rps['median']:.2f}",
                         f"{rps['min']:.2f}-{rps['max']:.2f}", f"{s['p50_s']['median']:.2f}",
                         f"{s['p99_s']['median']:.2f}", s["requests_per_round"]])
    a, b = summary["lorastack"][top], summary["naive"][top]
    prompt_tps = {c: spread(r["prompt_tokens_per_s"] for r in runs
                            if r["target"] == "lorastack" and r["concurrency"] == c)
                  for c in levels}
    text = (f"At concurrency {top}, /v1/classify answered {a['requests_per_s']['median']:.1f} "
            f"requests/s (p50 {a['p50_s']['median']:.2f} s), {ratios[top]['median']:.1f}x the "
            f"naive transformers + peft server ({b['requests_per_s']['median']:.2f} requests/s, "
            f"p50 {b['p50_s']['median']:.1f} s); both give the same probabilities to within "
            f"{agreement['max_abs_probability_difference']:.1e}. {failed} request(s) failed.")
    return {
        "title": "Classification throughput and latency",
        "summary": text,
        "tables": [
            table(f"/v1/classify, one review per request: requests/s (median and min-max over "
                  f"{settings['rounds']} rounds) and latency (median of the rounds' p50 and p99)",
                  ["server", "concurrency", "requests/s", "min-max", "p50 s", "p99 s",
                   "requests/run"], rows),
            table("Paired ratio of requests/s, lorastack / naive, median (min-max) over rounds",
                  ["concurrency", "lorastack / naive"],
                  [[c, fmt_ratio(ratios[c])] for c in levels])],
        "goals": [goal("classify >= 5x the naive server's requests/s at concurrency 16",
                       ratios[top]["median"], 5, shown=fmt_ratio(ratios[top]),
                       note=f"at concurrency {top}" +
                       ("" if top == 16 else " (16 was not run in this setting)"))],
        "figure": "classify.png",
        "notes": [
            (f"Both servers hold {settings['adapters']} copies of reviews-classify; one review "
            f"per request, each review used once; the gateway runs as `lorastack serve` "
            f"(capacity 8, max-loras {settings['gateway']['max_loras']})."),
            (f"The same {agreement['inputs']} reviews scored by both: largest probability "
            f"difference {agreement['max_abs_probability_difference']:.1e}, same label for "
            f"{agreement['same_label']}."),
            (f"A run sends max({settings['requests_per_run']['lorastack']}, concurrency) "
            f"requests to lorastack and max({settings['requests_per_run']['naive']}, "
            f"concurrency) to the naive server, which answers one at a time.")],
        "settings": settings,
        "per_target": {t: {str(c): v for c, v in lv.items()} for t, lv in summary.items()},
        "ratios": {str(c): v for c, v in ratios.items()},
        "prompt_tokens_per_s": {str(c): v for c, v in prompt_tps.items()},
        "agreement": agreement,
        "failed_requests": failed,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
