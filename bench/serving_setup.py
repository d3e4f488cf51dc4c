"""What the serving benchmarks (serving, hotswap, classify) share.

- the adapters: the user's `reviews-classify` and `reviews-condition` (trained by `make
  quickstart`), or, with --tiny, two adapters trained on the spot in two steps under those names;
  copied under new names into a temporary store that the servers read;
- the prompts: real drug reviews, rendered with each adapter's own manifest (chat_format around
  prompt_template, as the trainer and the gateway render them), each request a review of its own
  so that vLLM's prefix cache never holds a whole earlier prompt;
- the servers: `lorastack serve` and the naive server (bench/naive_server.py), each a process of
  its own as a user would run it, started and stopped here;
- the load generator and the summaries: bench/load.py.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import httpx

from bench.common import REPO, log, spread
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

    def memory_gib(self) -> float:
        """The proportional set size of the server and every process below it (its vLLM and
        vLLM's own), in GiB: shared pages counted once across them, as the machine holds them."""
        import psutil

        root = psutil.Process(self.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):  # one that exited holds nothing
                total += p.memory_full_info().pss
        return total / 2**30

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
