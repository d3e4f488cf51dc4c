"""The frozen layers below the first adapted one, run once (`training.cache_frozen_layers`).

When LoRA adapts only the top layers (`lora.layers`, `lora.top_layers`), every layer below the
first adapted one is frozen and sees the same input in every epoch: its output for a training
example never changes. So they run once, before the first step, for every training example,
and the hidden state that enters the first adapted layer is kept in memory (one float per
token and hidden unit: 155 MiB for SmolLM2-135M's 510 drug reviews). Each training step then
starts there: the layers below are replaced, for that forward pass only, by modules that hand
the kept state on. Backward never reached them anyway (nothing below is trained).

What the step computes is what it computed before (the body's masks and position embeddings are
still built by the model's own forward); `build` proves it on a batch before any training
rests on it, and trains every layer as before when the two differ. Evaluation still runs every
layer: label scoring reuses the prompt's KV cache, which the skipped layers would not fill.

Not used (and said why) when: nothing below is frozen, the data are augmented afresh every
epoch (the inputs change), several processes train (--nproc), the frozen layers have dropout,
the embeddings are trained, or the kept states would pass `MAX_BYTES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lorastack.train.batching import collate
from lorastack.train.examples import Example
from lorastack.train.model import answer_loss, causal_lm

MAX_BYTES = 4 * 2**30  # the kept states' ceiling; above it every step runs every layer
TOLERANCE = 1e-4  # the proof's relative gap on the loss
# States built in this process, by (base, first layer, examples), the latest REUSED of them:
# `lorastack tune` runs its trials in one process on one base and one train split, so a trial
# whose first adapted layer an earlier trial had starts from that trial's states (still proven).
REUSED = 2
_built: dict[tuple, list[torch.Tensor]] = {}


class _Stop(Exception):
    """Raised by the capture hook: nothing above the frozen layers runs while building."""


class _Handover(nn.Module):
    """Stands in for a frozen layer during one forward pass: the last one hands over the kept
    hidden state of the batch, the others pass their input on untouched (nothing is
    computed)."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states if self.value is None else self.value


def decoder_layers(model) -> nn.ModuleList | None:
    """The causal LM's stack of decoder layers (config.num_hidden_layers long), or None."""
    lm = causal_lm(model)
    n = getattr(lm.config.get_text_config(), "num_hidden_layers", None)
    body = getattr(lm, "base_model", lm)
    layers = getattr(body, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == n:
        return layers
    return next((m for m in body.modules() if isinstance(m, nn.ModuleList) and len(m) == n),
                None)


def first_trained_layer(model, layers: nn.ModuleList) -> int:
    """Index of the lowest layer with a trained parameter (len(layers) if none has one)."""
    return next((i for i, layer in enumerate(layers)
                 if any(p.requires_grad for p in layer.parameters())), len(layers))


class FrozenPrefix:
    """The kept hidden states entering layer `first` for each training example, by index."""

    def __init__(self, layers: nn.ModuleList, first: int, states: list[torch.Tensor]) -> None:
        self.layers, self.first, self.states = layers, first, states
        self.nbytes = sum(s.numel() * s.element_size() for s in states)

    @contextlib.contextmanager
    def replaying(self, indices: Sequence[int], width: int) -> Iterator[None]:
        """Within: the model's forward starts at layer `first`, from the kept states of the
        examples `indices` (a batch right-padded to `width`, as collate pads it)."""
        device = next(self.layers[self.first].parameters()).device
        rows = [self.states[i] for i in indices]
        value = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
        for j, row in enumerate(rows):
            value[j, :row.shape[0]] = row
        passers = [_Handover() for _ in range(self.first)]
        passers[-1].value = value.to(device)
        kept = [self.layers[i] for i in range(self.first)]
        try:
            for i, stand_in in enumerate(passers):
                self.layers[i] = stand_in
            yield
        finally:
            for i, layer in enumerate(kept):
                self.layers[i] = layer


def settings_refusal(cfg, first: int | None, layers: int | None,
                     several: bool) -> str | None:
    """Why the run's settings rule the kept states out (None: they allow them), for the lowest
    adapted layer `first` of `layers` decoder layers (None: not found) and `several` training
    processes. why_not asks it first, and `lorastack plan` (train/plan.py) before it counts
    the states."""
    if cfg.data.augment != "none":
        return "the data are augmented afresh every epoch"
    if several:
        return "several processes train"
    if layers is None or first is None:
        return "lorastack does not find this model's stack of decoder layers"
    if first == 0:
        return "the lowest layer is adapted: no layer below it is frozen"
    if first == layers:
        return "no decoder layer is adapted"
    return None


def why_not(cfg, model, dist_active: bool) -> str | None:
    """Why the frozen layers cannot be run once for this run (None: they can)."""
    layers = decoder_layers(model)
    first = None if layers is None else first_trained_layer(model, layers)
    reason = settings_refusal(cfg, first, None if layers is None else len(layers), dist_active)
    if reason is not None:  # else layers and first were found
        return reason
    embeddings = causal_lm(model).get_input_embeddings()
    if any(p.requires_grad for p in embeddings.parameters()):
        return "the embeddings are trained"
    config = causal_lm(model).config.get_text_config()
    if any(isinstance(m, nn.Dropout) and m.p > 0 for layer in layers[:first]
           for m in layer.modules()) or (getattr(config, "attention_dropout", 0) or 0) > 0:
        return "the frozen layers have dropout, so their output is not fixed"
    return None


@torch.no_grad()
def build(model, examples: Sequence[Example], pad_id: int, batch_size: int = 8, *,
          base_key: tuple | None = None) -> tuple[FrozenPrefix | None, str]:
    """Run the frozen layers once over `examples`; the prefix (None when it cannot be used or
    its proof failed) and a line saying what happened. `base_key` names the frozen weights
    (base model, quantization): states built for the same key, layer and examples are reused."""
    layers = decoder_layers(model)
    first = first_trained_layer(model, layers)
    key = None if base_key is None else (
        base_key, first, hash(tuple(tuple(ex.input_ids) for ex in examples)))
    if key in _built:
        prefix = FrozenPrefix(layers, first, _built[key])
        return _proven(model, prefix, examples, pad_id, batch_size, key,
                       "reused from an earlier run in this process")
    hidden = causal_lm(model).config.get_text_config().hidden_size
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    estimate = sum(len(ex.input_ids) for ex in examples) * hidden * torch.finfo(dtype).bits // 8
    if estimate > MAX_BYTES:
        return None, (f"frozen layers: every step runs all of them: their kept output would "
                      f"take {estimate / 2**30:.1f} GiB (more than {MAX_BYTES / 2**30:.0f})")
    captured: dict[str, torch.Tensor] = {}

    def capture(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    was_training = model.training
    model.eval()
    states: list[torch.Tensor | None] = [None] * len(examples)
    handle = layers[first - 1].register_forward_hook(capture)
    try:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        body = causal_lm(model).base_model
        device = param.device
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([examples[i] for i in idx], pad_id)
            with contextlib.suppress(_Stop):
                body(input_ids=batch["input_ids"].to(device),
                     attention_mask=batch["attention_mask"].to(device))
            for j, i in enumerate(idx):
                states[i] = captured["h"][j, :len(examples[i].input_ids)].to("cpu").clone()
    finally:
        handle.remove()
        model.train(was_training)
    prefix = FrozenPrefix(layers, first, states)  # type: ignore[arg-type]
    return _proven(model, prefix, examples, pad_id, batch_size, key,
                   f"ran once over the {len(examples)} training examples")


def _proven(model, prefix: FrozenPrefix, examples: Sequence[Example], pad_id: int,
            batch_size: int, key: tuple | None, how: str) -> tuple[FrozenPrefix | None, str]:
    """The prefix once a batch of the longest examples has the same loss from the kept states
    as through every layer (else None), and the line that says so."""
    idx = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))[-batch_size:]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
    was_training = model.training
    model.eval()
    try:
        full, _ = answer_loss(model, batch)
        with prefix.replaying(idx, batch["input_ids"].shape[1]):
            replayed, _ = answer_loss(model, batch)
    finally:
        model.train(was_training)
    gap = float((full - replayed).abs() / full.abs().clamp_min(1e-6))
    if gap > TOLERANCE:
        _built.pop(key, None)
        return None, (f"frozen layers: every step runs all of them: starting from their kept "
                      f"output changed the loss by {gap:.2g} (relative) on this model")
    if key is not None:
        _built.pop(key, None)
        _built[key] = prefix.states
        while len(_built) > REUSED:
            _built.pop(next(iter(_built)))
    n = len(prefix.layers)
    return prefix, (f"frozen layers 0-{prefix.first - 1} {how} ({prefix.nbytes / 2**20:.0f} "
                    f"MiB kept): each step runs layers {prefix.first}-{n - 1}")
