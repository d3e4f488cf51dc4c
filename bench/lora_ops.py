"""The CPU LoRA ops alone: vLLM 0.32's per-token fallback against lorastack's grouped and dense
forms (serve/vllm_plugin), on the default base model's linear layers.

    .venv/bin/python -m bench.lora_ops           # rows 16 (a decode step) to 2624 (a prefill)
    .venv/bin/python -m bench.lora_ops --tiny --out /tmp/b

Writes bench/results/lora_ops.json and lora_ops.png. One "layer" is SmolLM2-135M's four adapted
linear layers (q/k/v fused, o, gate/up fused, down) at rank 16, 4 adapter slots, rows spread
over the slots round robin (the worst case: every row's neighbour has another adapter) or in
runs (requests are contiguous in a prefill). Times are per layer, median of repeats; the base
model's own matmuls for the same rows are the yardstick. Ops run in this process with vLLM's
wrapper classes, without an engine.
"""

from __future__ import annotations

import argparse
import time

from bench.common import goal, log, pyplot, save_figure, spread, table, write_result

SLOTS, RANK = 4, 16
MODULES = {"qkv": (576, (576, 192, 192)), "o": (576, (576,)), "gate_up": (576, (1536, 1536)),
           "down": (1536, (576,))}


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return spread(times)["median"]


def measure(rows: int, layout: str, repeats: int) -> dict:
    import torch
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from lorastack.serve.vllm_plugin import punica

    slots = [i % SLOTS for i in range(rows)]
    if layout == "runs":
        slots = sorted(slots)
    mapping = LoRAMapping(tuple(s + 1 for s in slots), tuple(s + 1 for s in slots),
                          is_prefill=True)
    g = torch.Generator().manual_seed(0)
    layers = {k: (tuple(torch.randn(SLOTS, 1, RANK, i, generator=g) for _ in o),
                  tuple(torch.randn(SLOTS, 1, n, RANK, generator=g) for n in o), o,
                  torch.randn(sum(o), i, generator=g), torch.randn(rows, i, generator=g))
              for k, (i, o) in MODULES.items()}
    out = {}
    wrappers = {"vllm": PunicaWrapperCPU, "lorastack": punica.GroupedPunicaWrapperCPU}
    for name, cls in wrappers.items():
        w = cls(8192, max(256, rows), device="cpu")
        w.update_metadata(mapping, list(range(1, SLOTS + 1)), SLOTS, 49152)

        def lora(w=w):
            for a, b, o, _, x in layers.values():
                w.add_lora_linear(torch.zeros(rows, sum(o)), x, a, b, 1.0, o)
        out[name] = timed(lora, repeats)
    saved = punica.DENSE_MAX_ROWS
    for label, limit in (("lorastack, dense", 10**9), ("lorastack, per adapter", 0)):
        punica.DENSE_MAX_ROWS = limit  # the two forms lorastack chooses between, each forced
        w = punica.GroupedPunicaWrapperCPU(8192, max(256, rows), device="cpu")
        w.update_metadata(mapping, list(range(1, SLOTS + 1)), SLOTS, 49152)
        out[label] = timed(lambda w=w: [w.add_lora_linear(torch.zeros(rows, sum(o)), x, a, b,
                                                          1.0, o)
                                        for a, b, o, _, x in layers.values()], repeats)
    punica.DENSE_MAX_ROWS = saved
    out["base matmuls"] = timed(lambda: [x @ weight.t() for _, _, _, weight, x in
                                         layers.values()], repeats)
    return {"rows": rows, "layout": layout, "seconds": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    sizes = (16, 64) if args.tiny else (16, 32, 64, 128, 256, 2624)
    repeats = 3 if args.tiny else 15
    results = []
    for rows in sizes:
        for layout in ("round robin", "runs"):
            r = measure(rows, layout, repeats)
            results.append(r)
            log(f"{rows} rows, {layout}: " + ", ".join(f"{k} {v * 1000:.2f} ms"
                                                       for k, v in r["seconds"].items()))
    decode = next(r for r in results if r["rows"] == 16 and r["layout"] == "round robin")
    prefill = next(r for r in results if r["rows"] == max(sizes) and r["layout"] == "runs")
    speedup = {k: r["seconds"]["vllm"] / r["seconds"]["lorastack"]
               for k, r in (("decode", decode), ("prefill", prefill))}
    overhead = decode["seconds"]["lorastack"] / decode["seconds"]["base matmuls"]
    rows = [[r["rows"], r["layout"], *(f"{r['seconds'][k] * 1000:.2f}" for k in
                                        ("base matmuls", "vllm", "lorastack", "lorastack, dense",
                                         "lorastack, per adapter")),
             f"{r['seconds']['vllm'] / r['seconds']['lorastack']:.1f}x"] for r in results]
    report = {
        "title": "CPU LoRA ops",
        "summary": (f"Per layer of the default base model (rank 16, {SLOTS} adapters): "
                    f"lorastack's ops are {speedup['decode']:.1f}x faster than vLLM 0.32's CPU "
                    f"fallback on a {decode['rows']}-row decode step and {speedup['prefill']:.1f}x "
                    f"on a {prefill['rows']}-row prefill; on the decode step they cost "
                    f"{overhead:.2f}x the base model's own matmuls."),
        "goals": [goal("grouped ops at least 5x vLLM's CPU fallback on a 2,624-row prefill",
                       speedup["prefill"], 5, shown=f"{speedup['prefill']:.1f}x")],
        "tables": [table("Milliseconds per layer (q/k/v, o, gate/up, down), median of "
                         f"{repeats} repeats; lorastack picks dense up to 64 rows",
                         ["rows", "adapters over rows", "base matmuls", "vLLM 0.32", "lorastack",
                          "dense form", "per-adapter form", "vLLM / lorastack"], rows)],
        "notes": [("vLLM's fallback gathers a (rank x width) matrix per row, then an einsum; "
                   "lorastack runs one matmul pair per adapter present (per-adapter form) or, "
                   "for a few rows, every adapter on every row with a mask (dense form).")],
        "results": results, "figure": "lora_ops.png"}
    plot(results, args.out)
    write_result("lora_ops", report, args.out, setting="tiny" if args.tiny else "full")


def plot(results: list[dict], out) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, layout in zip(axes, ("round robin", "runs")):
        rs = [r for r in results if r["layout"] == layout]
        for key, color in (("base matmuls", "#999"), ("vllm", "#c44"), ("lorastack", "#2a7")):
            ax.plot([r["rows"] for r in rs], [r["seconds"][key] * 1000 for r in rs], "o-",
                    color=color, label={"vllm": "vLLM 0.32 CPU LoRA", "lorastack":
                                        "lorastack LoRA"}.get(key, key))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows in the step")
        ax.set_title(f"adapters {layout}")
    axes[0].set_ylabel("ms per layer")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, "lora_ops", out)


if __name__ == "__main__":
    main()
