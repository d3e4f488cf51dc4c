"""Hot swap: how soon an adapter written to the store answers, and whether a steady load notices
adapters being loaded, unloaded and replaced.

    .venv/bin/python -m bench.hotswap             # full: 20 trials, 20 cycles
    .venv/bin/python -m bench.hotswap --tiny --out /tmp/b

Writes bench/results/hotswap.json and hotswap.png. `lorastack serve` runs as a user runs it
(its defaults: the store polled every 0.5 s, capacity 8, max-loras 4) on a temporary store of 4
adapters (copies of reviews-classify and reviews-condition; tiny: 2).

1. Trials (idle server): a new adapter is written to the store (atomically, as the trainer
   does); the clock starts when the write has landed, and stops at the first successful answer
   to a one-token completion for it, asked every 20 ms (404 until the gateway serves it). The
   adapter is then removed and the next trial waits until it is gone.
2. Cycles, under a steady closed-loop load (classification requests for the classification
   adapters, 8-token completions for the others and for the base model): each cycle
   loads a new adapter (written to the store, waited for until it answers), replaces a served
   adapter that the load is using (other weights under the same name; waited for until the
   gateway serves the new version) and unloads the new adapter (removed from the store, waited
   for until the gateway no longer lists it). Every request of the load that does not succeed
   is a failure: none is expected, since the load never asks for the adapter that comes and goes.
Goals (the issue): p50 of the trials under 1 s; zero failed requests.
"""

from __future__ import annotations

import argparse
import shutil
import time

import httpx

from bench.common import goal, log, percentile, pyplot, save_figure, spread, table, write_result
from bench.load import SteadyLoad
from bench.serving_setup import (
    CLS,
    GEN,
    Reviews,
    base_name,
    build_store,
    gateway_metric,
    served_adapters,
    servers,
    source_store,
    spread_names,
    start_gateway,
    work_dir,
    write_variant,
)
from bench.serving_setup import add_common_args as _common

PROBE_EVERY_S = 0.02
WAIT_S = 120.0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common(parser)
    parser.add_argument("--trials", type=int, help="swap-time trials (20; tiny 2)")
    parser.add_argument("--cycles", type=int, help="load/replace/unload cycles (20; tiny 2)")
    parser.add_argument("--adapters", type=int, help="adapters served under load (4; tiny 2)")
    parser.add_argument("--load-concurrency", type=int, help="steady-load workers (4; tiny 2)")
    return parser.parse_args()


def first_answer(url: str, name: str, client: httpx.Client) -> tuple[float, int, list[str]]:
    """Ask for `name` every 20 ms until it answers; (seconds, probes, unexpected answers)."""
    start = time.perf_counter()
    probes, odd = 0, []
    while True:
        probes += 1
        r = client.post(url + "/v1/completions",
                        json={"model": name, "prompt": "Hi", "max_tokens": 1, "temperature": 0})
        if r.status_code == 200:
            return time.perf_counter() - start, probes, odd
        if r.status_code != 404 and len(odd) < 5:
            odd.append(f"{r.status_code} {r.text[:200]}")
        if time.perf_counter() - start > WAIT_S:
            raise RuntimeError(f"{name} did not answer within {WAIT_S:.0f} s of landing in the "
                               f"store; last answer {r.status_code} {r.text[:300]}")
        time.sleep(PROBE_EVERY_S)


def wait_gone(url: str, name: str) -> float:
    """Seconds until the gateway no longer lists `name`."""
    return wait_until(lambda: name not in served_adapters(url), f"{name} to go")


def wait_new_version(url: str, name: str, before: str) -> float:
    """Seconds until the gateway serves `name` under an identity other than `before`."""
    return wait_until(lambda: served_adapters(url)[name]["identity"] != before,
                      f"the new version of {name}")


def wait_until(check, what: str) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > WAIT_S:
            raise RuntimeError(f"gave up waiting {WAIT_S:.0f} s for {what}")
        time.sleep(PROBE_EVERY_S)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    tiny = args.tiny
    trials = args.trials or (2 if tiny else 20)
    cycles = args.cycles or (2 if tiny else 20)
    n = args.adapters or (2 if tiny else 4)
    concurrency = args.load_concurrency or (2 if tiny else 4)
    work = work_dir(args, "hotswap")
    with servers(args, work) as started:
        src = source_store(args, work)
        names = spread_names("steady", n)
        store = build_store(src, work / "store", names)
        manifests = {name: store.resolve(name).manifest for name in names}
        reviews = Reviews(manifests)
        gateway = start_gateway(store, work, capacity=8, max_loras=4)
        started.append(gateway)
        startup = gateway.wait_ready()
        url = gateway.url
        client = httpx.Client(timeout=300)

        log(f"{trials} swap trials on the idle server")
        trial_rows = []
        for i in range(trials):
            name, source = f"hot-{i}", (GEN, CLS)[i % 2]
            t = time.perf_counter()
            src.copy(source, name, into=store)
            write_s = time.perf_counter() - t
            seconds, probes, odd = first_answer(url, name, client)
            store.remove(name)
            gone_s = wait_gone(url, name)
            trial_rows.append({"adapter": name, "source": source, "write_s": write_s,
                               "first_answer_s": seconds, "probes": probes,
                               "unexpected_answers": odd, "removed_after_s": gone_s})
            log(f"trial {i + 1}/{trials}: {name} answered {seconds:.2f} s after landing "
                f"({probes} probes)")

        classifiers = [m for m, s in names.items() if s == CLS]
        generators = [m for m, s in names.items() if s == GEN]
        targets = [*names, base_name()]

        def make(i: int):
            model = targets[i % len(targets)]
            record = reviews.take()
            if model in classifiers:
                return url + "/v1/classify", {"model": model, "input": [record]}
            prompt = reviews.prompt(model if model in names else generators[0], record)
            return url + "/v1/completions", {"model": model, "prompt": prompt,
                                             "max_tokens": 8, "temperature": 0}

        log("warming up: one request of each kind of the load")
        for i in range(len(targets)):
            target_url, body = make(i)
            client.post(target_url, json=body)
        events_before = gateway_metric(url, "lorastack_adapter_events_total")
        log(f"{cycles} load/replace/unload cycles under a steady load of {concurrency} workers")
        cycle_rows, marks = [], []
        with SteadyLoad(make, concurrency) as load:
            time.sleep(2.0)  # the load is running before the first swap
            for i in range(cycles):
                row = {"cycle": i}
                name, source = f"cycle-{i}", (GEN, CLS)[i % 2]
                marks.append(("load", time.perf_counter() - load.run.t0))
                src.copy(source, name, into=store)
                row["load_s"], row["load_probes"], row["load_unexpected"] = \
                    first_answer(url, name, client)
                victim = (classifiers or generators)[0] if i % 2 == 0 else \
                    (generators or classifiers)[0]
                before = served_adapters(url)[victim]["identity"]
                marks.append(("replace", time.perf_counter() - load.run.t0))
                _, folder = write_variant(src, names[victim], store, victim, 1 + 0.01 * (i + 1),
                                          work)
                row["replaced"] = victim
                row["replace_s"] = wait_new_version(url, victim, before)
                shutil.rmtree(folder, ignore_errors=True)
                marks.append(("unload", time.perf_counter() - load.run.t0))
                store.remove(name)
                row["unload_s"] = wait_gone(url, name)
                cycle_rows.append(row)
                log(f"cycle {i + 1}/{cycles}: load {row['load_s']:.2f} s, replace "
                    f"{row['replace_s']:.2f} s, unload {row['unload_s']:.2f} s; load so far: "
                    f"{load.run.ok} ok, {load.run.failed} failed")
            time.sleep(2.0)  # requests on the last version finish on it
        events_after = gateway_metric(url, "lorastack_adapter_events_total")
        client.close()
        events = {k.split('"')[1]: events_after[k] - events_before.get(k, 0)
                  for k in events_after}
        report = analyse(trial_rows, cycle_rows, load.run, marks, events,
                         {"trials": trials, "cycles": cycles, "adapters_under_load": names,
                          "load_concurrency": concurrency, "poll_interval_s": 0.5,
                          "capacity": 8, "max_loras": 4, "probe_every_s": PROBE_EVERY_S,
                          "vllm_start_s": round(startup, 1), "prompts": reviews.describe()})
        plot(report, args.out)
        write_result("hotswap", report, args.out, setting="tiny" if tiny else "full")


def analyse(trials: list[dict], cycles: list[dict], run, marks, events, settings) -> dict:
    swap = [t["first_answer_s"] for t in trials]
    under_load = [c["load_s"] for c in cycles]
    summary = run.summary()
    per_model: dict[str, dict[str, int]] = {}
    for _, _, status, model in run.events:
        row = per_model.setdefault(model, {"requests": 0, "failed": 0})
        row["requests"] += 1
        row["failed"] += status != 200
    p50, worst = percentile(swap, 50), max(swap)
    failed = run.failed
    stat = spread(swap)
    cyc = {k: spread(c[k] for c in cycles) for k in ("load_s", "replace_s", "unload_s")}
    text = (f"An adapter written to the store answered its first request after {p50:.2f} s "
            f"(p50; max {worst:.2f} s over {len(swap)} trials). A steady load of "
            f"{run.ok + failed} requests ran through {len(cycles)} load/replace/unload cycles "
            f"with {failed} failed request(s).")
    return {
        "title": "Hot swap",
        "summary": text,
        "tables": [
            table("Time from an adapter landing in the store to its first answer (s)",
                  ["measured", "p50", "max", "min", "n"],
                  [["idle server (trials)", f"{p50:.2f}", f"{worst:.2f}", f"{stat['min']:.2f}",
                    len(swap)],
                   ["under the steady load (cycles)", f"{cyc['load_s']['median']:.2f}",
                    f"{cyc['load_s']['max']:.2f}", f"{cyc['load_s']['min']:.2f}",
                    len(under_load)]]),
            table(f"Steady load through {len(cycles)} cycles: requests per model",
                  ["model", "requests", "failed"],
                  [[m, v["requests"], v["failed"]] for m, v in sorted(per_model.items())] +
                  [["all", run.ok + failed, failed]]),
            table("Cycle steps under load (s, median and max)",
                  ["step", "median", "max"],
                  [[k.removesuffix("_s"), f"{v['median']:.2f}", f"{v['max']:.2f}"]
                   for k, v in cyc.items()])],
        "goals": [
            goal("hot swap p50 under 1 s (store write to first answer)", p50, 1.0,
                 at_least=False, shown=f"{p50:.2f} s (max {worst:.2f} s)",
                 note=f"{len(swap)} trials on the idle server; under load: p50 "
                      f"{cyc['load_s']['median']:.2f} s"),
            goal(f"zero failed requests through {len(cycles)} load/unload/replace cycles",
                 failed, 0, at_least=False, shown=f"{failed} of {run.ok + failed}",
                 note="failures: " + "; ".join(run.failures[:3]) if failed else "")],
        "figure": "hotswap.png",
        "notes": [
            (f"The gateway polls the store every {settings['poll_interval_s']} s (its default), "
            f"so on average half of that is spent waiting for the next poll; the adapter is then "
            f"checked, snapshotted and loaded into vLLM before it answers. Probes every "
            f"{settings['probe_every_s'] * 1000:.0f} ms."),
            ("Under load, the first answer also waits its turn in vLLM behind the load's "
            "requests. The load never asks for the adapter that comes and goes; it does use the "
            "adapters being replaced."),
            "Adapter events the gateway counted during the cycles: " + ", ".join(
                f"{k} {v:g}" for k, v in sorted(events.items())) + "."],
        "settings": settings,
        "swap_s": spread(swap),
        "swap_under_load_s": spread(under_load),
        "trials": trials,
        "cycles": cycles,
        "failed_requests": failed,
        "load": {k: summary[k] for k in ("requests", "failed", "seconds", "p50_s", "p99_s",
                                          "statuses", "failures")},
        "load_per_model": per_model,
        "adapter_events": events,
        "timeline": {"marks": marks,
                     "requests": [[round(a, 3), round(b, 4), s] for a, b, s, _ in run.events]},
    }


def plot(report: dict, out) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=[1, 2])
    swap = [t["first_answer_s"] for t in report["trials"]]
    loaded = [c["load_s"] for c in report["cycles"]]
    ax1.plot([0] * len(swap), swap, "o", alpha=0.6, label="idle (trials)")
    ax1.plot([1] * len(loaded), loaded, "o", alpha=0.6, label="under load (cycles)")
    ax1.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="goal: p50 < 1 s")
    ax1.set_xticks([0, 1], ["idle", "under load"])
    ax1.set_xlim(-0.6, 1.6)
    ax1.set_ylim(bottom=0)
    ax1.set_ylabel("store write to first answer (s)")
    ax1.set_title("time to serve a new adapter")
    ax1.legend(fontsize=8)
    reqs = report["timeline"]["requests"]
    ok = [(a, b) for a, b, s in reqs if s == 200]
    bad = [(a, b) for a, b, s in reqs if s != 200]
    ax2.plot([a for a, _ in ok], [b for _, b in ok], ".", markersize=3, label="request (ok)")
    if bad:
        ax2.plot([a for a, _ in bad], [b for _, b in bad], "rx", label="failed request")
    colors = {"load": "tab:green", "replace": "tab:orange", "unload": "tab:purple"}
    for kind, t in report["timeline"]["marks"]:
        ax2.axvline(t, color=colors[kind], linewidth=0.6, alpha=0.6)
    for kind, color in colors.items():
        ax2.plot([], [], color=color, label=kind)
    ax2.set_xlabel("request sent, seconds since the load started")
    ax2.set_ylabel("latency (s)")
    ax2.set_ylim(bottom=0)
    ax2.set_title(f"steady load through {len(report['cycles'])} cycles: "
                  f"{report['failed_requests']} failed")
    ax2.legend(fontsize=8, loc="upper right")
    save_figure(fig, "hotswap", out)
    plt.close(fig)


if __name__ == "__main__":
    main()
