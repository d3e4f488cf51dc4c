"""What the serving benchmarks (serving, hotswap, classify) share.

- the adapters: the user's `reviews-classify` and `reviews-condition` (trained by `make
  quickstart`), or, with --tiny, two adapters trained on the spot in two steps under those names;
  copied under new names into a temporary store that the servers read;
- the prompts: real drug reviews, rendered with each adapter's own manifest (chat_format around
  prompt_template, as the trainer and the gateway render them), each request a review of its own
  so that vLLM's prefix cache never holds a whole earlier prompt;
- the servers: `lorastack serve` and the naive server (bench/naive_server.py), each a process of
  its own as a user would run it, started and stopped here;
- the load generator: a closed loop at a given concurrency (asyncio + httpx), one latency per
  request, completion tokens from each answer's `usage`.

    .venv/bin/python -m bench.serving_setup --train-tiny DIR   # the tiny adapters, into DIR/store
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from bench.common import REPO, log, percentile, pyplot, save_figure, spread
from lorastack.adapters.store import AdapterStore
from lorastack.serve.vllm_proc import ChildProcess, free_port

CLS, GEN = "reviews-classify", "reviews-condition"  # the quickstart's adapters
SOURCES = (CLS, GEN)


# -- arguments shared by the three scripts ----------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true",
                        help="a few requests, 2 adapters trained on the spot, one repeat (tests)")
    parser.add_argument("--out", help="results directory (default: $LORASTACK_BENCH_RESULTS, "
                        "else bench/results)")
    parser.add_argument("--source-store", help="store holding reviews-classify and "
                        "reviews-condition (default: the user's store; with --tiny: train them)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds of every comparison")
    parser.add_argument("--concurrency", help="comma-separated concurrency levels")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (servers' logs, store)")


def concurrency_levels(args, full: tuple[int, ...], tiny: tuple[int, ...]) -> list[int]:
    if args.concurrency:
        return [int(c) for c in args.concurrency.split(",")]
    return list(tiny if args.tiny else full)


# -- adapters -----------------------------------------------------------------------------------

TINY_DATA = {"source": "drug-reviews", "limit_train": 16, "limit_eval": 8, "max_length": 160}
TINY_LORA = {"r": 8, "alpha": 16, "layers": [27, 28, 29]}
TINY_TASKS = {
    CLS: {"type": "classification", "prompt": "{text}", "system": "Classify the sentiment.",
          "labels": ["positive", "negative", "neutral"]},
    GEN: {"type": "generation", "prompt": "{text}", "target_field": "condition",
          "system": "Name the condition treated.", "max_new_tokens": 4},
}


def train_tiny_adapters(root: Path) -> AdapterStore:
    """reviews-classify and reviews-condition, two training steps each, in root/store."""
    from lorastack.train import train

    store = AdapterStore(root / "store")
    for name, task in TINY_TASKS.items():
        if store.exists(name):
            continue
        log(f"training a tiny {name} (2 steps) into {store.root}")
        train({"name": name, "base": "smollm2-135m", "store": str(store.root),
               "runs_dir": str(root / "runs"), "quantization": "none", "task": task,
               "data": {**TINY_DATA, "limit_eval": 8 if name == CLS else 3}, "lora": TINY_LORA,
               "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2,
                            "save_every": 2}})
    return store


def source_store(args, work: Path) -> AdapterStore:
    """Where the adapters to copy come from; exits with the fix when they are missing."""
    if args.source_store:
        store = AdapterStore(args.source_store)
    elif args.tiny:
        store = train_tiny_adapters(work / "trained")
    else:
        store = AdapterStore()
    missing = [name for name in SOURCES if not store.exists(name)]
    if missing:
        sys.exit(f"bench: the store {store.root} lacks {', '.join(missing)}. Run `make "
                 f"quickstart` first (it trains both), pass --source-store DIR, or use --tiny.")
    return store


def build_store(src: AdapterStore, root: Path, names: dict[str, str]) -> AdapterStore:
    """A fresh store holding `names` ({new name: source name}) copied from `src`."""
    store = AdapterStore(root)
    for new_name, source in names.items():
        src.copy(source, new_name, into=store)
    return store


def write_variant(src: AdapterStore, name: str, dst: AdapterStore, new_name: str,
                  scale: float, tmp: Path):
    """`name`'s adapter with its lora_B weights scaled by `scale`, written (or replacing) as
    `new_name`: other bytes, so the gateway serves it as a new version."""
    from safetensors.numpy import load_file, save_file

    adapter = src.resolve(name)
    weights = load_file(str(adapter.path / "adapter_model.safetensors"))
    scaled = {k: (v * scale).astype(v.dtype) if "lora_B" in k else v for k, v in weights.items()}
    folder = Path(tempfile.mkdtemp(prefix="variant-", dir=tmp))
    save_file(scaled, str(folder / "adapter_model.safetensors"))
    source = {"adapter_config.json": adapter.path / "adapter_config.json",
              "adapter_model.safetensors": folder / "adapter_model.safetensors"}
    written = dst.write(new_name, source, adapter.manifest.replace(name=new_name), replace=True)
    return written, folder


def spread_names(prefix: str, n: int, sources: tuple[str, ...] = SOURCES) -> dict[str, str]:
    """n adapter names, `<prefix>-0..n-1`, alternating over `sources`."""
    return {f"{prefix}-{i}": sources[i % len(sources)] for i in range(n)}


# -- prompts ------------------------------------------------------------------------------------

def load_tokenizer():
    from transformers import AutoTokenizer

    from lorastack.adapters.models import resolve_base

    return AutoTokenizer.from_pretrained(str(resolve_base("smollm2-135m").path))


class Reviews:
    """Drug reviews (test split, then train), handed out one per request, never twice in a run
    while there are enough; kept to prompts of `min_tokens`..`max_tokens` tokens so that every
    request asks about the same amount of work."""

    def __init__(self, manifests: dict, min_tokens: int = 96, max_tokens: int = 256) -> None:
        from lorastack.adapters.labels import render_prompt
        from lorastack.train.data import load_records

        tok = load_tokenizer()
        records = load_records("drug-reviews", "test") + load_records("drug-reviews", "train")
        self.manifests = manifests
        self.records, self.lengths = [], []
        probe = next(iter(manifests.values()))  # lengths measured with one adapter's format
        for r in records:
            record = {k: r.get(k) or "" for k in ("text", "drug", "condition")}
            text = render_prompt(probe.chat_format, probe.prompt_template, record)
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            if min_tokens <= n <= max_tokens:
                self.records.append(record)
                self.lengths.append(n)
        if not self.records:
            raise RuntimeError("no drug review fits the prompt length window")
        self.next = 0
        self.lock = threading.Lock()

    def take(self) -> dict:
        with self.lock:
            record = self.records[self.next % len(self.records)]
            self.next += 1
        return record

    def prompt(self, adapter: str, record: dict) -> str:
        from lorastack.adapters.labels import render_prompt

        m = self.manifests[adapter]
        return render_prompt(m.chat_format, m.prompt_template, record)

    def describe(self) -> dict:
        return {"source": "drug-reviews test then train splits", "kept": len(self.records),
                "prompt_tokens": spread(self.lengths)}


# -- server processes ---------------------------------------------------------------------------

class ServerProcess(ChildProcess):
    """A server started as a process of its own, its output in a log file, ready on /health
    (the gateway's own supervision of its vLLM child, serve/vllm_proc.py)."""

    def start(self) -> Self:
        super().start()
        log(f"starting {self.name} (pid {self.pid}, log {self.log_file})")
        return self

    def wait_ready(self, timeout_s: float = 900) -> float:
        seconds = asyncio.run(self.wait_healthy(timeout_s))
        log(f"{self.name} is ready at {self.url} ({seconds:.0f} s)")
        return seconds

    def stop(self, grace_s: float = 60) -> None:
        """SIGTERM (the gateway then stops its vLLM child), then SIGKILL what is left of its
        process group and of the processes it started in sessions of their own (its vLLM)."""
        import psutil

        try:
            family = psutil.Process(self.pid).children(recursive=True) if self.pid else []
        except psutil.Error:
            family = []
        super().stop(grace_s)
        for child in family:
            try:
                child.wait(10)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.Error:
                pass


def start_gateway(store: AdapterStore, work: Path, *, capacity: int = 8, max_loras: int = 8,
                  poll_interval_s: float | None = None,
                  env: dict[str, str] | None = None) -> ServerProcess:
    """`lorastack serve` on the store, as a user runs it; ServeSettings' defaults otherwise
    (float32, VLLM_CPU_KVCACHE_SPACE from kv_cache_gb), `env` added to its environment (and so
    to its vLLM child's). Call .wait_ready() next."""
    port = free_port()
    env = dict(env or {})
    if poll_interval_s is not None:
        env["LORASTACK_POLL_INTERVAL_S"] = str(poll_interval_s)
    command = [sys.executable, "-m", "lorastack", "serve", "--store", str(store.root),
               "--port", str(port), "--capacity", str(capacity), "--max-loras", str(max_loras),
               "--work-dir", str(work / "gateway"), "--log-level", "warning"]
    return ServerProcess("the gateway (lorastack serve)", port, work / "gateway.log", command,
                         env=env, cwd=REPO).start()


def start_naive(store: AdapterStore, work: Path) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "bench.naive_server", "--store", str(store.root),
               "--port", str(port)]
    return ServerProcess("the naive server (transformers + peft)", port, work / "naive.log",
                         command, cwd=REPO).start()


def served_adapters(gateway_url: str) -> dict[str, dict]:
    """The gateway's GET /v1/adapters: name -> {identity, loaded_on, ...}."""
    data = httpx.get(gateway_url + "/v1/adapters", timeout=30).json()["data"]
    return {a["name"]: a for a in data}


def vllm_target(gateway_url: str, names: list[str]) -> tuple[str, dict[str, str]]:
    """The gateway's vLLM child (its URL) and the name each adapter has there (name@hash)."""
    served = served_adapters(gateway_url)
    missing = [n for n in names if n not in served or not served[n]["loaded_on"]]
    if missing:
        raise RuntimeError(f"the gateway has not loaded {missing} into vLLM; raise --capacity")
    urls = {u for n in names for u in served[n]["loaded_on"]}
    if len(urls) != 1:
        raise RuntimeError(f"expected one vLLM engine, found {sorted(urls)}")
    return urls.pop(), {n: served[n]["identity"] for n in names}


def gateway_metric(gateway_url: str, prefix: str) -> dict[str, float]:
    """Prometheus lines of the gateway's /metrics starting with `prefix`, as {line: value}."""
    out = {}
    for line in httpx.get(gateway_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(prefix):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def base_name() -> str:
    from lorastack.adapters.models import DEFAULT_BASE

    return DEFAULT_BASE


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


@contextlib.contextmanager
def servers(args, work: Path) -> Iterator[list[ServerProcess]]:
    """A list to put the benchmark's servers in: stopped at the end (last started first), and
    the work directory removed unless --keep."""
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        for server in reversed(started):
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def log_seconds(ax) -> None:
    """A log-scale axis of seconds with plain numbers on it."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def work_dir(args, name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"lorastack-bench-{name}-"))
    if args.keep:
        log(f"keeping {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-tiny", metavar="DIR", required=True,
                        help="train the tiny reviews-classify and reviews-condition into DIR/store")
    args = parser.parse_args()
    store = train_tiny_adapters(Path(args.train_tiny))
    print(store.root)


if __name__ == "__main__":
    main()
