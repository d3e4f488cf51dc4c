"""The serving benchmarks' load generator and summaries: a closed loop at a given concurrency
(asyncio + httpx), one latency per request and completion tokens from each answer's `usage`;
rounds over targets with their order rotated; spreads by target and concurrency; the
throughput/latency figure. The servers and adapters they run against: bench/serving_setup.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import httpx

from bench.common import log, percentile, pyplot, save_figure, spread

# -- load generator -------------------------------------------------------------------------------

# A request: (url, JSON body). `make(i)` builds the i-th request of a run.
Request = tuple[str, dict]


@dataclass
class Run:
    """One closed-loop run: `requests` requests sent by `concurrency` workers."""

    target: str
    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # successful requests, in order done
    completion_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # the first few, for the reader
    failed: int = 0
    t0: float = 0.0  # perf_counter when the first request went out
    events: list[tuple[float, float, int, str]] = field(default_factory=list)
    # (start offset s, latency s, status, model) of every request, for timelines

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies or [float("nan")]
        tokens = sum(self.completion_tokens)
        prompt = sum(self.prompt_tokens)
        return {"target": self.target, "concurrency": self.concurrency,
                "seconds": round(self.seconds, 4), "requests": self.ok, "failed": self.failed,
                "completion_tokens": tokens,
                "tokens_per_s": tokens / self.seconds if self.seconds else None,
                "prompt_tokens_per_s": prompt / self.seconds if self.seconds else None,
                "requests_per_s": self.ok / self.seconds if self.seconds else None,
                "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
                "mean_s": sum(lat) / len(lat), "statuses": dict(self.statuses),
                "failures": self.failures[:5],
                "latencies_s": [round(x, 5) for x in self.latencies]}


async def _drive(run: Run, make: Callable[[int], Request], total: int | None,
                 stop: threading.Event | None, timeout_s: float) -> None:
    counter = iter(range(10**12))
    limits = httpx.Limits(max_connections=run.concurrency + 4,
                          max_keepalive_connections=run.concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = run.t0 = time.perf_counter()

        async def worker() -> None:
            while stop is None or not stop.is_set():
                i = next(counter)
                if total is not None and i >= total:
                    return
                url, body = make(i)
                start = time.perf_counter()
                try:
                    response = await client.post(url, json=body)
                    status, text = response.status_code, response.text
                except httpx.HTTPError as exc:
                    status, text = 0, f"{type(exc).__name__}: {exc}"
                latency = time.perf_counter() - start
                run.statuses[status] += 1
                run.events.append((start - t0, latency, status, str(body.get("model"))))
                if status == 200:
                    run.latencies.append(latency)
                    usage = response.json().get("usage") or {}
                    run.completion_tokens.append(int(usage.get("completion_tokens") or 0))
                    run.prompt_tokens.append(int(usage.get("prompt_tokens") or 0))
                else:
                    run.failed += 1
                    if len(run.failures) < 20:
                        run.failures.append(f"{body.get('model')}: {status} {text[:300]}")

        await asyncio.gather(*(worker() for _ in range(run.concurrency)))
        run.seconds = time.perf_counter() - t0


def closed_loop(target: str, make: Callable[[int], Request], total: int, concurrency: int,
                timeout_s: float = 900) -> Run:
    """Send `total` requests, `concurrency` at a time (each worker sends its next request when
    its previous one is answered); time from the first send to the last answer."""
    run = Run(target, concurrency)
    asyncio.run(_drive(run, make, total, None, timeout_s))
    return run


class SteadyLoad:
    """A closed loop on a thread of its own until the `with` block ends (hot-swap cycles)."""

    def __init__(self, make: Callable[[int], Request], concurrency: int) -> None:
        self.run = Run("steady", concurrency)
        self.make, self.stop = make, threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(
            _drive(self.run, self.make, None, self.stop, 300)), daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(600)


# -- summaries -------------------------------------------------------------------------------------

def by_target(runs: list[dict], metric: str) -> dict[str, dict[int, dict[str, Any]]]:
    """target -> concurrency -> the spread over rounds of `metric`, p50 and p99 latency, and
    the p50/p99 of every latency of every round pooled."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["target"], {}).setdefault(r["concurrency"], []).append(r)
    summary: dict[str, dict[int, dict[str, Any]]] = {}
    for target, levels in out.items():
        for c, rs in levels.items():
            pooled = [x for r in rs for x in r["latencies_s"]] or [float("nan")]
            summary.setdefault(target, {})[c] = {
                metric: spread(r[metric] for r in rs),
                "p50_s": spread(r["p50_s"] for r in rs), "p99_s": spread(r["p99_s"] for r in rs),
                "pooled_p50_s": percentile(pooled, 50), "pooled_p99_s": percentile(pooled, 99),
                "requests_per_round": rs[0]["requests"] + rs[0]["failed"], "rounds": len(rs)}
    return summary


def paired(runs: list[dict], metric: str, num: str, den: str, c: int) -> list[tuple[float, float]]:
    """(num, den) values of `metric` at concurrency c, paired by round."""
    rounds: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["concurrency"] == c:
            rounds.setdefault(r["round"], {})[r["target"]] = r[metric]
    return [(v[num], v[den]) for _, v in sorted(rounds.items()) if num in v and den in v]


def measure_rounds(targets: tuple[str, ...], levels: list[int], repeats: int,
                   maker: Callable[[str], Callable[[int], Request]],
                   total: Callable[[str, int], int], metric: str, unit: str,
                   on_run: Callable[[Run], None] | None = None) -> list[dict]:
    """Closed-loop runs of every target at every concurrency level, `repeats` rounds, the
    targets' order rotated each round (none always runs first): one summary row per run, each
    logged with its `metric` in `unit`."""
    runs = []
    for rnd in range(repeats):
        k = rnd % len(targets)
        for c in levels:
            for target in targets[k:] + targets[:k]:
                run = closed_loop(target, maker(target), total(target, c), c)
                if on_run is not None:
                    on_run(run)
                runs.append(r := {"round": rnd, **run.summary()})
                log(f"round {rnd + 1}/{repeats} c={c} {target}: {r[metric]:.2f} {unit}, p50 "
                    f"{r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s ({r['requests']} ok, "
                    f"{r['failed']} failed)")
    return runs


def plot_load(report: dict, levels: list[int], labels: dict[str, str], metric: str,
              ylabel: str, title: str, name: str, out) -> None:
    """<name>.png: each target's `metric` (median, min-max over rounds) and its p50/p99
    latency, by concurrency."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target, label in labels.items():
        rows = [report["per_target"][target][str(c)] for c in levels]
        values = [r[metric] for r in rows]
        med = [v["median"] for v in values]
        bars = ax1.errorbar(levels, med, yerr=[[m - v["min"] for m, v in zip(med, values)],
                                               [v["max"] - m for m, v in zip(med, values)]],
                            marker="o", capsize=3, label=label)
        color = bars[0].get_color()
        ax2.plot(levels, [r["p50_s"]["median"] for r in rows], marker="o", color=color)
        ax2.plot(levels, [r["p99_s"]["median"] for r in rows], marker="x", linestyle=":",
                 color=color)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
    ax1.set_ylabel(ylabel)
    ax1.set_title("throughput (median, min-max over rounds)")
    ax1.legend(fontsize=8)
    log_seconds(ax2)
    ax2.set_ylabel("latency per request (s)")
    ax2.set_title("latency: p50 (solid), p99 (dotted)")
    fig.suptitle(title)
    save_figure(fig, name, out)
    plt.close(fig)



def log_seconds(ax) -> None:
    """A log-scale axis of seconds with plain numbers on it."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
