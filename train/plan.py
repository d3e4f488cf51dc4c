"""Memory plan of a training run, before any weights load: from the base model's config alone.

    lorastack plan reviews-classify --device cpu | cuda | cuda:24GB [--set k=v ...]

One model of memory for every base of the Llama family (and any config with the same fields),
each row a term with its reason beside it, validated against measured peaks in
bench/memory_plan.py. What a training step holds at its peak (the start of backward):

- the runtime: Python, torch, transformers, peft, bitsandbytes and the data, before any model
  (CPU: measured resident memory of that process here; CUDA: the CUDA context and workspaces);
- base weights: float (float32 on CPU, bf16 on CUDA, what train/model.py's compute_dtype picks),
  8-bit (int8 + a float32 scale per output row) or 4-bit NF4 with double quantization (half a
  byte per weight, an 8-bit absmax per 64 weights, a float32 absmax per 256 of those);
  embeddings, the output head and the norms stay float32 when quantized (peft's
  prepare_model_for_kbit_training upcasts them);
- on CPU, a quantized (or dtype-converted) load reads every checkpoint tensor through the
  safetensors memory map, and those file pages stay resident while the map is open;
- LoRA: float32 parameters, their gradients and AdamW's two moments (16 bytes a parameter);
- activations: what autograd keeps per token and layer (listed in _layer_elements), for the
  layers backward reaches; with gradient checkpointing only each layer's input plus one layer
  recomputed; the output head runs only at answer positions (train/model.py answer_loss);
- backward's transients and the allocator's slack (freed memory the allocator keeps);
- with training.cache_frozen_layers, the frozen layers' kept output (train/frozen.py): one float
  per training token and hidden unit, held in the process's RAM for the whole run (on a GPU
  run too, so a CUDA plan leaves it out); `lorastack plan` counts the tokens of the training
  split (it tokenizes the data), a plan without `kept_tokens` leaves the row out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lorastack.adapters import allocator
from lorastack.train.config import ConfigError, parse_memory

MiB, GiB = 2**20, 2**30

# CPU: resident memory of a process that has imported torch, transformers, peft,
# bitsandbytes and lorastack.train and loaded the tokenizer, before any model: measured
# 661-663 MiB in each of bench/memory_plan.py's 12 processes here (the bench records it).
# CUDA: context, cuBLAS workspace and kernels, not measured here (no GPU): an estimate.
# Under tcmalloc the same processes measured 666-669 MiB (2026-12-07).
RUNTIME_BYTES = {"system": 660 * MiB, "tcmalloc": 667 * MiB, "cuda": 600 * MiB}
# Freed memory the allocator keeps. CPU under tcmalloc (what the `lorastack` command runs
# under, adapters/allocator.py): none. bench/memory_plan.py's 16 rows (135M, 0.5B, 1B, float and
# 4-bit, checkpointing on and off, 2 runs each) peaked within 1.8% of the plan without any
# slack, and each row's two runs within 0.4%; a second run the same day, 2.0% and 0.6%
# (2026-12-07; README, Memory plan vs measured).
TCMALLOC_SLACK = 0.0
# CPU under glibc's malloc (a process that imports lorastack as a library, or
# LORASTACK_ALLOCATOR=system): glibc's heap keeps the holes that forward's temporaries
# (and, with checkpointing, backward's recomputation of each layer) leave between live
# tensors; both scale with the full stack of layer activations, A (what no
# checkpointing saves). Measured on the six float32 rows of bench/memory_plan.py's first run
# (135M, 0.5B, 1B): 0.58-0.76 A without checkpointing, 0.51-0.59 A with it; their means are
# used for every row (the bench's HELD_OUT rows, other batch shapes, were not used to set
# them). CUDA: the caching allocator's fragmentation, 15% of the activations
# (an estimate, not measured here). The share is not fixed: the same row run twice in fresh
# processes peaks up to 27% apart, and it runs larger at 1000-1800 tokens (0.8-1.0 A, where
# the plan then runs up to 23% low; README, Memory plan vs measured). With glibc's dynamic
# mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=131072) it vanishes: SmolLM2 8 x 224 float32
# peaked at 4851 MiB vs 4914 planned without slack (7379-8177 MiB with glibc's default), but
# 6-step runs ran 18-60% slower.
CPU_SLACK = {False: 0.68, True: 0.56}
CUDA_SLACK = 0.15
# CPU, quantized base: every linear weight is dequantized to a float32 copy for its matmul and
# freed after, in forward and again in backward; what the heap keeps of that churn, as a share
# of all the linear weights in float32: 0.31, the mean over the six 4-bit rows of the same run
# (after the activation term; the rows spread 0-0.6: quantized loads are the noisiest part).
DEQUANT_HOLES = 0.3
# torch's CPU dropout keeps a float keep-mask and the dropped copy of each adapted module's
# input (2 x d_in); 1.5 x d_in stays resident (measured: 2 vs 4 layers of SmolLM2's shape).
# CUDA's fused dropout keeps the copy and a one-byte mask.
DROPOUT_CPU_FACTOR = 1.5
# NF4 with double quantization: 4 bits a weight; absmax per 64 weights quantized to 8 bits;
# a float32 absmax (and offset) per 256 of those; a 16-entry code and a 256-entry code per tensor.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_BYTES_PER_TENSOR = 16 * 4 + 256 * 4 + 64
# Answer tokens per example for the output head, when the config does not bound them:
# classification answers a label word (1-3 tokens) and the end of turn.
CLASSIFICATION_ANSWER_TOKENS = 4
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


class PlanError(ConfigError):
    """Input the plan cannot work from (a device string, a base without a config)."""


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a decoder-only transformer config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True
    checkpoint_bytes: int = 4  # bytes per weight in the checkpoint files
    max_positions: int = 2048

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        c = getattr(config, "text_config", None) or config
        try:
            hidden, heads = int(c.hidden_size), int(c.num_attention_heads)
            dtype = str(getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
                        or "float32").replace("torch.", "")
            return cls(hidden=hidden, intermediate=int(c.intermediate_size),
                       layers=int(c.num_hidden_layers), heads=heads,
                       kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
                       head_dim=int(getattr(c, "head_dim", None) or hidden // heads),
                       vocab=int(c.vocab_size),
                       tied=bool(getattr(config, "tie_word_embeddings", True)),
                       checkpoint_bytes=DTYPE_BYTES.get(dtype, 4),
                       max_positions=int(getattr(c, "max_position_embeddings", 2048) or 2048))
        except (AttributeError, TypeError) as exc:
            raise PlanError(f"the base model's config lacks a field the plan needs ({exc}); "
                            "the plan knows decoder-only (Llama-family) configs") from None

    @classmethod
    def from_base(cls, base: str) -> Shape:
        """The shape of a catalog alias, hub id or directory: reads config.json only."""
        from transformers import AutoConfig

        from lorastack.adapters.models import resolve_base

        return cls.from_config(AutoConfig.from_pretrained(resolve_base(base).path))

    def linear(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one transformer block."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, \
            self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def float_params(self) -> int:
        """Embedding, output head (when untied) and norms: float in every precision."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + \
            (2 * self.layers + 1) * self.hidden


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda"
    total_bytes: int
    label: str


def parse_device(text: str) -> Device:
    """`cpu` (this machine's RAM), `cuda` (the GPU's memory), or either with a size:
    `cuda:24GB`, `cpu:16GiB`, `cuda:80000MB`."""
    m = re.fullmatch(r"\s*(cpu|cuda)(?::(\d+(?:\.\d+)?)\s*(gb|gib|mb|mib))?\s*", text or "",
                     re.IGNORECASE)
    if not m:
        raise PlanError(f"device {text!r}: use cpu, cuda, or a size such as cuda:24GB or "
                        f"cpu:16GB")
    kind = m.group(1).lower()
    if m.group(2):  # the sizes training.memory_budget takes: GB = 10^9 bytes, GiB = 2^30
        size = int(parse_memory(m.group(2) + m.group(3))[1]) if float(m.group(2)) > 0 else 0
        if size <= 0:
            raise PlanError(f"device {text!r}: the size must be above zero")
        return Device(kind, size, f"{kind} ({size / GiB:.1f} GiB given)")
    if kind == "cpu":
        return Device("cpu", _ram_bytes(), f"cpu ({_ram_bytes() / GiB:.1f} GiB RAM)")
    import torch

    if not torch.cuda.is_available():
        raise PlanError("device cuda: no CUDA GPU is visible to torch here; give its size "
                        "instead, e.g. --device cuda:24GB")
    props = torch.cuda.get_device_properties(0)
    return Device("cuda", int(props.total_memory),
                  f"cuda ({props.name}, {props.total_memory / GiB:.1f} GiB)")


def _ram_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    raise PlanError("cannot read this machine's memory size: give it, e.g. --device cpu:16GB")


@dataclass(frozen=True)
class Row:
    name: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    """The rows of a training step's peak and of serving the same base, with a verdict."""

    device: Device
    quantization: str
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    rows: list[Row]
    serving: list[Row] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def serving_total(self) -> int:
        return sum(r.bytes for r in self.serving)

    @property
    def fits(self) -> bool:
        return self.total <= self.device.total_bytes

    @property
    def verdict(self) -> str:
        need, have = self.total / GiB, self.device.total_bytes / GiB
        if self.fits:
            return (f"fits: a training step needs {need:.2f} GiB of {have:.1f} GiB on "
                    f"{self.device.label} ({have - need:.2f} GiB to spare)")
        return (f"does not fit: a training step needs {need:.2f} GiB, {self.device.label} has "
                f"{have:.1f} GiB; try a smaller training.batch_size, "
                f"training.gradient_checkpointing=true or quantization=4bit")


def plan_memory(cfg, device: str | Device = "cpu", *, shape: Shape | None = None,
                batch_size: int | None = None, checkpointing: bool | None = None,
                answer_tokens: int | None = None, serve_concurrency: int = 8,
                serve_max_loras: int = 4, serve_max_model_len: int = 1024,
                processes: int = 1, malloc: str | None = None,
                kept_tokens: int | None = None) -> MemoryPlan:
    """The memory plan of `cfg` (a TrainConfig) on `device`, from the base's config only.

    `batch_size` and `checkpointing` override the config's (what train/autobatch.py tries);
    `answer_tokens` bounds the answer length per example (default: 4 for classification,
    task.max_new_tokens for generation). The serving defaults are `lorastack serve`'s.
    With `training.fsdp` over `processes` GPUs, the weights are one process's share.
    `malloc`: the CPU allocator the run's process uses, "tcmalloc" or "system" (default: this
    process's; the `lorastack` command runs under tcmalloc, adapters/allocator.py).
    `kept_tokens`: the training split's tokens, for training.cache_frozen_layers' kept states.
    """
    dev = device if isinstance(device, Device) else parse_device(device)
    shape = shape or Shape.from_base(cfg.base)
    quant = cfg.quantization
    ckpt = _checkpointing(cfg) if checkpointing is None else checkpointing
    batch = batch_size or cfg.training.batch_size
    length = cfg.data.max_length
    tokens = batch * length
    compute = 4 if dev.kind == "cpu" else 2  # train/model.py compute_dtype
    act = compute if quant == "none" else 4  # quantized: the stream is float32 (upcast)
    malloc = (malloc or allocator.active()) if dev.kind == "cpu" else None
    rows = [Row("runtime", RUNTIME_BYTES[malloc or dev.kind],
                "measured: python + torch + transformers + peft + data" if dev.kind == "cpu"
                else "estimate: CUDA context and workspaces")]
    rows += _weight_rows(shape, quant, compute, dev.kind)
    if cfg.training.fsdp and processes > 1 and dev.kind == "cuda":
        rows = _fsdp_rows(rows, shape, quant, compute, processes)
    adapted, n_lora = _lora(cfg, shape)
    rows.append(Row("LoRA params + grads + AdamW", 16 * n_lora,
                    f"{n_lora / 1e6:.2f}M float32 parameters x (param, grad, 2 moments)"))
    # Layers backward reaches: from the lowest adapted one up; float + checkpointing also
    # makes the embedding output require grad (train/model.py), so every layer saves there.
    lowest = min(adapted) if adapted else shape.layers
    kept = keeps_states(cfg, shape, processes)  # a step then never runs the frozen layers
    saving = shape.layers if (ckpt and quant == "none" and not kept) else shape.layers - lowest
    full = sum(_layer_elements(shape, cfg, i in adapted, dev.kind, act)
               for i in range(lowest, shape.layers))
    per_layer = full / max(len(range(lowest, shape.layers)), 1)
    if ckpt:
        activations = tokens * act * (saving * shape.hidden + per_layer)
        note = (f"{batch} x {length} tokens: each of {saving} layers' input, one layer "
                f"recomputed in backward")
    else:
        activations = tokens * act * full
        note = f"{batch} x {length} tokens x {shape.layers - lowest} layers, no checkpointing"
    activations += tokens * act * 3 * shape.hidden  # embedding output, final norm
    rows.append(Row("activations", int(activations), note))
    answers = answer_tokens or _answer_tokens(cfg)
    positions = batch * min(answers, length)
    rows.append(Row("answer logits", positions * shape.vocab * 4 * 3,
                    f"{positions} answer positions x {shape.vocab} vocab, float32: logits, "
                    f"log-softmax, its gradient"))
    transient = tokens * act * (2 * shape.intermediate + 4 * shape.hidden)
    if quant != "none":  # a quantized matmul dequantizes its weight (forward and backward)
        transient += 2 * compute * max(a * b for a, b in shape.linear().values())
    rows.append(Row("backward transients", int(transient),
                    "gradients of one layer's largest tensors in flight"))
    if malloc == "tcmalloc":
        slack = TCMALLOC_SLACK * activations
        note = "none: tcmalloc returns what a step frees (measured)"
    elif malloc == "system":
        stack = tokens * act * full  # A: the whole stack of layer activations
        slack = CPU_SLACK[ckpt] * stack
        note = f"{CPU_SLACK[ckpt]:.2f} x the activation stack without checkpointing"
        if quant != "none":  # see DEQUANT_HOLES
            slack += DEQUANT_HOLES * compute * shape.layers * sum(
                a * b for a, b in shape.linear().values())
            note += f" + {DEQUANT_HOLES:.1f} x the linear weights dequantized"
        note += " (glibc's malloc)"
    else:
        slack = CUDA_SLACK * activations
        note = f"{CUDA_SLACK:.2f} x activations (caching allocator)"
    rows.append(Row("allocator slack", int(slack), note))
    if kept and kept_tokens and dev.kind == "cpu":
        rows.append(Row("kept frozen-layer output", kept_tokens * shape.hidden * compute,
                        f"{kept_tokens:,} training tokens x {shape.hidden} hidden x {compute} "
                        f"bytes: layers 0-{lowest - 1} run once (training.cache_frozen_layers)"))
    serving = _serving_rows(shape, cfg, dev, serve_concurrency, serve_max_loras,
                            serve_max_model_len)
    return MemoryPlan(dev, quant, batch, length, ckpt, rows, serving)


def _checkpointing(cfg) -> bool:
    ckpt = cfg.training.gradient_checkpointing
    return cfg.quantization == "4bit" if ckpt is None else ckpt  # train/model.py attach_lora


def _answer_tokens(cfg) -> int:
    if cfg.task.type == "classification":
        return CLASSIFICATION_ANSWER_TOKENS
    return cfg.task.max_new_tokens + 1


def _weight_rows(shape: Shape, quant: str, compute: int, kind: str) -> list[Row]:
    linear = shape.linear()
    n_linear = shape.layers * sum(a * b for a, b in linear.values())
    n_float = shape.float_params()
    tensors = shape.layers * len(linear)
    if quant == "none":
        rows = [Row("base weights (float)", (n_linear + n_float) * compute,
                    f"{(n_linear + n_float) / 1e6:.0f}M parameters x {compute} bytes")]
        converted = (n_linear + n_float) if compute != shape.checkpoint_bytes else 0
    else:
        if quant == "8bit":
            qbytes = n_linear + 4 * shape.layers * sum(b for _, b in linear.values())
            what = "int8 + a float32 scale per output row"
        else:
            qbytes = int(n_linear * NF4_BYTES_PER_WEIGHT) + tensors * NF4_BYTES_PER_TENSOR
            what = "NF4 + double-quantized absmax per 64"
        rows = [Row(f"base weights ({quant})", qbytes,
                    f"{n_linear / 1e6:.0f}M linear weights, {what}"),
                Row("embeddings, head, norms (float32)", n_float * 4,
                    f"{n_float / 1e6:.1f}M parameters stay float32 (upcast by peft)")]
        converted = n_linear + (n_float if shape.checkpoint_bytes != 4 else 0)
    if kind == "cpu" and converted:
        rows.append(Row("checkpoint map (CPU load)", converted * shape.checkpoint_bytes,
                        "file pages read while converting stay resident (page cache)"))
    return rows


def _fsdp_rows(rows: list[Row], shape: Shape, quant: str, compute: int, n: int) -> list[Row]:
    """FSDP over n GPUs (train/distributed.shard_base): each keeps 1/n of the base's weights,
    plus what is gathered at a time: the root unit (embeddings, head, norms) from forward to
    backward, and a decoder layer with the next one prefetched. Not on CPU: there each process
    loads the whole base before sharding it, so the peak stays the unsharded one."""
    weights = ("base weights", "embeddings, head, norms")
    out = [Row(f"{r.name}, 1/{n} (fsdp)", r.bytes // n, r.note) if r.name.startswith(weights)
           else r for r in rows]
    linear = next(r.bytes for r in rows if r.name.startswith("base weights"))
    float_bytes = shape.float_params() * (compute if quant == "none" else 4)
    per_layer = (linear - (float_bytes if quant == "none" else 0)) / shape.layers
    out.append(Row("fsdp: gathered weights", int(float_bytes + 2 * per_layer),
                   "the root unit (embeddings, head, norms) and 2 decoder layers, whole"))
    return out


def _lora(cfg, shape: Shape) -> tuple[set[int], int]:
    """The adapted layers and the number of LoRA parameters."""
    lora = cfg.lora
    layers = set(range(shape.layers)) if lora.layers is None else \
        {i for i in lora.layers if i < shape.layers}
    per_layer = sum(lora.r * (a + b) for name, (a, b) in shape.linear().items()
                    if _adapted(cfg, name))
    return layers, per_layer * len(layers)


def _adapted(cfg, module: str) -> bool:
    targets = cfg.lora.target_modules
    return targets == "all-linear" or module in targets


def _layer_elements(shape: Shape, cfg, adapted: bool, kind: str, act: int) -> float:
    """Elements autograd keeps per token in one transformer block (Llama, sdpa attention):
    - the two RMSNorms: their inputs and outputs (3 h: the block's input is the stream) and a
      reciprocal root each;
    - attention: q and k after RoPE, v, the attention output and its reshaped copy that
      o_proj reads, the log-sum-exp per head (flash / memory-efficient sdpa: no T x T);
    - MLP: gate and up outputs, silu(gate), their product (4 x intermediate);
    - LoRA, per adapted module: A's output (r) and the dropout's mask and copy of the input.
    """
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, \
        shape.kv_heads * shape.head_dim, shape.intermediate
    n = 3 * h + 2 + 3 * q + 2 * kv + shape.heads + 4 * i
    if adapted:
        drop = cfg.lora.dropout > 0
        factor = DROPOUT_CPU_FACTOR if kind == "cpu" else 1 + 1 / act
        for name, (d_in, _) in shape.linear().items():
            if _adapted(cfg, name):
                n += cfg.lora.r + (factor * d_in if drop else 0)
    return n


def _serving_rows(shape: Shape, cfg, dev: Device, concurrency: int, max_loras: int,
                  max_len: int) -> list[Row]:
    """vLLM serving the same base: float weights, LoRA slots, KV cache (lorastack serve's
    defaults: float32 on CPU, bf16 on GPUs)."""
    b = 4 if dev.kind == "cpu" else 2
    linear = shape.linear()
    n = shape.layers * sum(x * y for x, y in linear.values()) + shape.float_params()
    rank = cfg.lora.serving_rank
    slot = shape.layers * sum(rank * (x + y) for x, y in linear.values()) * b
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * b * max_len * concurrency
    return [Row("serve: base weights", n * b, f"{n / 1e6:.0f}M parameters x {b} bytes"),
            Row("serve: LoRA slots", slot * max_loras,
                f"{max_loras} slots x rank {rank} on every linear layer"),
            Row("serve: KV cache", kv, f"{max_len} tokens x {concurrency} sequences "
                f"(on CPU vLLM takes VLLM_CPU_KVCACHE_SPACE instead)")]


def keeps_states(cfg, shape: Shape, processes: int = 1) -> bool:
    """Whether the run keeps the frozen layers' output (training.cache_frozen_layers), as far
    as its settings and the base's shape tell: train/frozen.py's settings_refusal, asked
    with the lowest adapted layer. The loaded model's own checks come at training time."""
    if not cfg.training.cache_frozen_layers:
        return False
    from lorastack.train.frozen import settings_refusal

    adapted, _ = _lora(cfg, shape)
    lowest = min(adapted) if adapted else shape.layers
    return settings_refusal(cfg, lowest, shape.layers, processes > 1) is None


def kept_tokens(cfg, processes: int = 1, shape: Shape | None = None) -> int | None:
    """The training split's tokens when the run keeps frozen states (a plan's `kept_tokens`);
    None, without reading the data, when it does not (keeps_states)."""
    keeps = keeps_states(cfg, shape or Shape.from_base(cfg.base), processes)
    return training_tokens(cfg) if keeps else None


def training_tokens(cfg) -> int:
    """Tokens of the run's training examples, as the trainer encodes them (the tokenizer
    and the data are read; no weights)."""
    from lorastack.adapters.models import resolve_base
    from lorastack.train.examples import encode_records
    from lorastack.train.model import load_tokenizer
    from lorastack.train.run import prompt_format, trained_splits

    splits = trained_splits(cfg)
    fmt = prompt_format(cfg, load_tokenizer(resolve_base(cfg.base).path), splits.train)
    return sum(len(ex.input_ids) for ex in encode_records(fmt, splits.train, "train").examples)
