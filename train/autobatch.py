"""training.batch_size: auto and training.memory_budget: the run's batch, checkpointing and base
precision chosen from the memory plan (train/plan.py) before the model loads.

- `batch_size: auto`: the largest forward batch (up to AUTO_MAX) whose plan fits the budget;
  grad_accum stays as configured.
- a number with a `memory_budget`: when it does not fit, it is split into smaller forward
  passes with more grad_accum, so that the effective batch (batch_size x grad_accum) is kept.
- either way, gradient checkpointing is switched on only when no batch fits without it, and
  a lower base precision (8-bit, then 4-bit) only when nothing fits even with it.

The budget is `memory_budget` (a size, or a share of the device), else 90% of the device.
With training.cache_frozen_layers the frozen layers' kept output (a plan row, sized by the
training split's tokens) is reserved from it before the batch is chosen.
On CPU the plan is held to a share of it, by allocator (CPU_MARGIN): bench/memory_plan.py
measured CPU peaks within 1.02x the plan under tcmalloc (what the `lorastack` command runs
under), so plans get 90% of the budget; under glibc's malloc, which keeps freed memory, peaks
reached 1.30x the plan at large batches, so plans there get 75%.
With N processes on one machine each has its own copy of the base: on CPU the budget is
shared by N; on GPUs each process has its own device. The plan sizes one process's share of
the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

from lorastack.train.config import TrainConfig, parse_memory

AUTO_MAX = 32  # auto never picks a larger forward batch: beyond it LoRA gains nothing per step
DEFAULT_SHARE = 0.9  # of the device, when batch_size is auto and no memory_budget is given
# The share of the budget a CPU plan is held to, by the allocator the run is under, so that
# the worst peak bench/memory_plan.py measured still fits: 1.02x the plan under tcmalloc
# (1.02 x 0.9 < 1, with room for rows not measured), 1.30x under glibc (1.30 x 0.75 < 1)
CPU_MARGIN = {"tcmalloc": 0.9, "system": 0.75}
_LOWER = {"none": ("8bit", "4bit"), "8bit": ("4bit",), "4bit": ()}


def cpu_margin(malloc: str | None = None) -> float:
    """CPU_MARGIN for `malloc` (default: this process's allocator, adapters/allocator.py)."""
    from lorastack.adapters import allocator

    return CPU_MARGIN[malloc or allocator.active()]


def fit_to_memory(cfg: TrainConfig, world: int = 1, device: str | None = None,
                  kept_tokens: int | Callable[[], int | None] | None = None,
                  ) -> tuple[TrainConfig, str | None]:
    """`cfg` with batch_size, grad_accum, gradient_checkpointing and quantization set so that
    the plan fits the budget, and a sentence saying what was chosen and why (None when the
    config asks for nothing: a number without a memory_budget). Raises PlanError when nothing
    fits. `kept_tokens`: the training split's tokens (plan.kept_tokens), so that the plan
    reserves training.cache_frozen_layers' kept states; a function is called only when the
    config asks for fitting (counting them tokenizes the data)."""
    from lorastack.train.model import pick_device
    from lorastack.train.plan import GiB, PlanError, Shape, parse_device, plan_memory

    t = cfg.training
    auto = t.batch_size == "auto"
    if not auto and t.memory_budget is None:
        return cfg, None
    if callable(kept_tokens):
        kept_tokens = kept_tokens()
    dev = parse_device(device or pick_device().type)
    kind, value = parse_memory(t.memory_budget) if t.memory_budget else ("share", DEFAULT_SHARE)
    budget = value * dev.total_bytes if kind == "share" else value
    per_process = budget / world if dev.kind == "cpu" else budget
    margin = cpu_margin() if dev.kind == "cpu" else 1.0
    usable = per_process * margin
    shape = Shape.from_base(cfg.base)

    def fits(quant: str, batch: int, ckpt: bool) -> bool:
        trial = cfg.model_copy(update={"quantization": quant})
        plan = plan_memory(trial, dev, shape=shape, batch_size=-(-batch // world),
                           checkpointing=ckpt, processes=world, kept_tokens=kept_tokens)
        return plan.total <= usable

    if auto:
        batches = list(range(AUTO_MAX, 0, -1))
    else:
        effective = int(t.batch_size) * t.grad_accum
        batches = [b for b in range(int(t.batch_size), 0, -1) if effective % b == 0]
    batches = [b for b in batches if b >= world]  # every process needs a share
    wanted = t.gradient_checkpointing
    for quant in (cfg.quantization, *_LOWER[cfg.quantization]):
        # the config's checkpointing, or its default (on for 4-bit, as train/model.py does);
        # switched on when nothing fits without it, never switched off
        default_ckpt = quant == "4bit" if wanted is None else wanted
        for ckpt in [True] if default_ckpt else [False, True] if wanted is None else [False]:
            for b in batches:
                if not fits(quant, b, ckpt):
                    continue
                accum = t.grad_accum if auto else int(t.batch_size) * t.grad_accum // b
                reasons = [f"batch_size {b} x grad_accum {accum} (effective {b * accum}) is "
                           + ("the largest batch" if auto else "the largest split")
                           + f" that fits {usable / GiB:.2f} GiB"
                           + (f" ({margin:.0%} of {per_process / GiB:.2f} GiB: the plan's "
                              "margin on CPU)" if dev.kind == "cpu" else "")]
                if ckpt and not default_ckpt:
                    reasons.append("gradient checkpointing switched on: nothing fits without it")
                if quant != cfg.quantization:
                    reasons.append(f"base quantized to {quant}: nothing fits in "
                                   f"{cfg.quantization}")
                training = t.model_copy(update={"batch_size": b, "grad_accum": accum,
                                                "gradient_checkpointing": ckpt})
                chosen = cfg.model_copy(update={"quantization": quant, "training": training})
                return chosen, "memory plan: " + "; ".join(reasons)
    raise PlanError(f"nothing fits {usable / GiB:.2f} GiB of {dev.label}, not even batch "
                    f"{batches[-1] if batches else 1} with gradient checkpointing and a 4-bit "
                    f"base: shorten data.max_length, adapt fewer layers (lora.layers) or give "
                    f"a larger training.memory_budget")
