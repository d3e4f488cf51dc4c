"""The machine's own ceilings, and how close training and decoding come to them.

    .venv/bin/python -m bench.ceilings            # ~1 min; bench/results/ceilings.*
    .venv/bin/python -m bench.ceilings --tiny --out /tmp/b

Measured here, with torch on all its threads:
- float32 matrix multiply GFLOP/s (square matmuls, the best size of a few, median of repeats);
- memory bandwidth: read (sum over a 512 MB float32 tensor) and copy (read + write) GB/s.

Then, from the other results (when present in the same results directory):
- the trainer's achieved FLOP/s: lorastack's real tokens/s (training.json) x the FLOPs one
  token costs: forward through every layer's linear weights (2 x params) plus backward through
  the adapted layers' weights for the input gradients (2 x params); the output head runs at the
  answer tokens only and the LoRA matmuls are small, so both are left out;
- decode's bytes/s: base-model tokens/s at concurrency 1 (serving.json) x the weight bytes one
  decode step reads (every weight once; vLLM serves float32 here), against read bandwidth. The
  rate is end to end (prefill and HTTP included), so decode itself does at least this well.
"""

from __future__ import annotations

import argparse
import json
import time

from bench import common


def matmul_gflops(sizes: tuple[int, ...], repeats: int) -> dict:
    import torch

    by_size = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t)
        by_size[n] = [2 * n**3 / s / 1e9 for s in times]
        common.log(f"matmul {n}x{n}: {common.spread(by_size[n])['median']:.1f} GFLOP/s")
    best = max(by_size, key=lambda n: common.spread(by_size[n])["median"])
    return {"by_size": {str(n): common.spread(v) for n, v in by_size.items()}, "best_size": best,
            "gflops": common.spread(by_size[best])}


def bandwidth(mb: int, repeats: int) -> dict:
    import torch

    n = mb * 2**20 // 4
    a = torch.rand(n)
    b = torch.empty_like(a)
    a.sum()
    b.copy_(a)
    read, copy = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        read.append(n * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        b.copy_(a)
        copy.append(2 * n * 4 / (time.perf_counter() - t) / 1e9)
    common.log(f"memory: read {common.spread(read)['median']:.1f} GB/s, copy "
               f"{common.spread(copy)['median']:.1f} GB/s")
    return {"read_gbs": common.spread(read), "copy_gbs": common.spread(copy), "mb": mb}


def model_shape() -> dict:
    """Linear-layer parameter counts of the default base model, from its config."""
    from lorastack.adapters.models import resolve_base
    from lorastack.train.config import load_config

    cfg = load_config("reviews-classify")
    base = resolve_base(cfg.base)
    c = json.loads((base.path / "config.json").read_text())
    d, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head = c.get("head_dim") or d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter
    adapted = len(cfg.lora.layers) if cfg.lora.layers else layers
    weights = sum(f.stat().st_size for f in base.path.glob("*.safetensors"))
    return {"per_layer_linear_params": per_layer, "layers": layers, "adapted_layers": adapted,
            "flops_per_token": 2 * per_layer * layers + 2 * per_layer * adapted,
            "weight_bytes": weights, "dtype": c.get("torch_dtype") or c.get("dtype")}


def run(args) -> None:
    sizes = (256, 512) if args.tiny else (1024, 2048, 3072)
    mm = matmul_gflops(sizes, 2 if args.tiny else 5)
    bw = bandwidth(32 if args.tiny else 512, 2 if args.tiny else 7)
    shape = model_shape()
    peak_flops = mm["gflops"]["median"] * 1e9
    read_bw = bw["read_gbs"]["median"] * 1e9
    rows = [["float32 matmul", f"{mm['gflops']['median']:.1f} GFLOP/s",
             f"best of sizes {', '.join(map(str, sizes))} (n = {mm['best_size']})"],
            ["memory read", f"{bw['read_gbs']['median']:.1f} GB/s", f"sum over {bw['mb']} MB"],
            ["memory copy", f"{bw['copy_gbs']['median']:.1f} GB/s", "read + write"]]
    fractions: dict = {}
    training = common.read_result("training", args.out)
    if training:
        tok_s = training["tokens_per_s"]["lorastack"]["median"]
        achieved = tok_s * shape["flops_per_token"]
        fractions["trainer"] = {"tokens_per_s": tok_s, "gflops": achieved / 1e9,
                                "fraction": achieved / peak_flops}
        rows.append(["lorastack trainer", f"{achieved / 1e9:.1f} GFLOP/s",
                     (f"{achieved / peak_flops:.0%} of matmul peak ({tok_s:.0f} tok/s x "
                     f"{shape['flops_per_token'] / 1e6:.0f} MFLOP/token)")])
    serving = common.read_result("serving", args.out)
    decode_tok_s = _decode_rate(serving) if serving else None
    if decode_tok_s:
        bps = decode_tok_s * shape["weight_bytes"]
        fractions["decode"] = {"tokens_per_s": decode_tok_s, "gbs": bps / 1e9,
                               "fraction": bps / read_bw}
        rows.append(["vLLM decode, concurrency 1", f"{bps / 1e9:.1f} GB/s",
                     (f"{bps / read_bw:.0%} of read bandwidth ({decode_tok_s:.1f} tok/s x "
                     f"{shape['weight_bytes'] / 1e6:.0f} MB of weights)")])
    classify = common.read_result("classify", args.out)
    goals = []
    if classify and classify.get("prompt_tokens_per_s"):
        # a classify request is prompt work only: a forward pass, no backward
        c = max(classify["prompt_tokens_per_s"], key=int)
        tok_s = classify["prompt_tokens_per_s"][c]["median"]
        achieved = tok_s * 2 * shape["per_layer_linear_params"] * shape["layers"]
        fractions["classify"] = {"tokens_per_s": tok_s, "gflops": achieved / 1e9,
                                 "fraction": achieved / peak_flops, "concurrency": int(c)}
        rows.append([f"served /v1/classify, concurrency {c}", f"{achieved / 1e9:.1f} GFLOP/s",
                     (f"{achieved / peak_flops:.0%} of matmul peak ({tok_s:.0f} prompt tok/s "
                      f"x {2 * shape['per_layer_linear_params'] * shape['layers'] / 1e6:.0f} "
                      f"MFLOP/token)")])
        goals.append(common.goal("served classify prompt tokens/s >= 50% of the matmul "
                                 "ceiling", achieved / peak_flops, 0.5,
                                 shown=f"{achieved / peak_flops:.0%} ({tok_s:.0f} tokens/s)",
                                 note=f"concurrency {c}"))
    summary = (f"This machine: {mm['gflops']['median']:.0f} GFLOP/s float32 matmul, "
               f"{bw['read_gbs']['median']:.1f} GB/s memory read.")
    if "trainer" in fractions:
        summary += (f" lorastack's trainer runs at {fractions['trainer']['fraction']:.0%} of the "
                    f"matmul ceiling")
        summary += (f"; decode at concurrency 1 moves weights at "
                    f"{fractions['decode']['fraction']:.0%} of read bandwidth."
                    if "decode" in fractions else ".")
    if "classify" in fractions:
        summary += (f" Served /v1/classify runs the model at "
                    f"{fractions['classify']['fraction']:.0%} of it.")
    payload = {"title": "Machine ceilings", "summary": summary,
               "tables": [common.table("Measured by bench/ceilings.py on this machine.",
                                       ["what", "rate", "how"], rows)],
               "goals": goals, "figure": "ceilings.png", "matmul": mm, "bandwidth": bw,
               "model": shape, "fractions": fractions}
    common.write_result("ceilings", payload, args.out, setting="tiny" if args.tiny else "full")
    _plot(mm, bw, fractions, args.out)


def _decode_rate(serving: dict) -> float | None:
    """Base-model generated tokens/s at concurrency 1 from serving.json (None if not there).

    End to end (the prompt's prefill and HTTP included), so decode's own rate, and the
    bandwidth it reaches, are at least this.
    """
    try:
        return float(serving["per_target"]["base"]["1"]["tokens_per_s"]["median"])
    except (KeyError, TypeError, ValueError):
        return None


def _plot(mm: dict, bw: dict, fractions: dict, out) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    ax = axes[0]
    bars = [("matmul peak", mm["gflops"]["median"], "#bbb")]
    if "trainer" in fractions:
        bars.append(("lorastack trainer", fractions["trainer"]["gflops"], "#2a7"))
    if "classify" in fractions:
        bars.append(("served classify", fractions["classify"]["gflops"], "#27a"))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_ylabel("GFLOP/s (float32)")
    ax.set_title("Compute")
    ax = axes[1]
    bars = [("read", bw["read_gbs"]["median"], "#bbb"), ("copy", bw["copy_gbs"]["median"], "#ccc")]
    if "decode" in fractions:
        bars.append(("vLLM decode", fractions["decode"]["gbs"], "#2a7"))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_ylabel("GB/s")
    ax.set_title("Memory")
    fig.tight_layout()
    common.save_figure(fig, "ceilings", out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small sizes, 2 repeats")
    p.add_argument("--out", help="results directory (default bench/results)")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
