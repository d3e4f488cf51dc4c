"""Grouped multi-LoRA ops for CPU: one GEMM per adapter present in the batch.

vLLM's CPU fallback for the punica ops (`vllm/lora/ops/torch_ops/lora_ops.py`) gathers a whole
LoRA matrix per token (`lora_b_weights[indices]`, then an einsum). That copies rank x width
floats for every token of every adapted module, and index -1 ("no LoRA") selects the last slot
instead of nothing. Here the rows of a batch are grouped by adapter slot once per step
(`group_rows`); each op then runs one matmul per slot present, on a contiguous slice where the
slot's tokens form one run (the usual case: requests are contiguous) or on gathered rows where
they do not, and leaves rows with index -1 untouched. Slots whose weights are all zero (a module
the adapter does not target) are skipped, which is exact.

Pure torch, no vLLM import: tests compare these ops with a float64 per-token reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Rows = slice | torch.Tensor  # a run of rows, or the (sorted) row numbers of several runs


@dataclass(frozen=True)
class Groups:
    """The rows of a batch, by adapter slot: `slots[i]` owns `rows[i]`; -1 rows are `base`."""

    indices: torch.Tensor  # the slot of every row
    slots: tuple[int, ...]
    rows: tuple[Rows, ...]
    base: Rows | None

    @property
    def n(self) -> int:
        return int(self.indices.numel())


def group_rows(indices: torch.Tensor) -> Groups:
    """Group row numbers by their adapter slot (-1: no adapter)."""
    indices = indices.reshape(-1)
    runs: dict[int, list[tuple[int, int]]] = {}
    if indices.numel():
        values, counts = torch.unique_consecutive(indices, return_counts=True)
        start = 0
        for value, count in zip(values.tolist(), counts.tolist()):
            runs.setdefault(value, []).append((start, start + count))
            start += count
    rows = {slot: _rows(spans) for slot, spans in runs.items()}
    base = rows.pop(-1, None)
    slots = tuple(sorted(rows))
    return Groups(indices, slots, tuple(rows[s] for s in slots), base)


def _rows(spans: list[tuple[int, int]]) -> Rows:
    if len(spans) == 1:
        return slice(*spans[0])
    return torch.cat([torch.arange(a, b) for a, b in spans])


class NonZeroSlots:
    """Which slots of a stacked LoRA weight hold anything but zeros, recomputed only when the
    tensor was written (torch bumps `_version` on every in-place write: set_lora, reset_lora)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[int, torch.Tensor, list[bool]]] = {}

    def __call__(self, stacked: torch.Tensor) -> list[bool]:
        key = id(stacked)
        version = stacked._version
        hit = self._seen.get(key)
        if hit is not None and hit[0] == version and hit[1] is stacked:
            return hit[2]
        flags = stacked.reshape(stacked.shape[0], -1).ne(0).any(dim=1).tolist()
        self._seen[key] = (version, stacked, flags)
        return flags


def _weight(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    """One slot's matrix, (out, in), from vLLM's (slots, 1, out, in) or (slots, out, in)."""
    w = stacked[slot]
    return w[0] if w.dim() == 3 else w


def shrink(y: torch.Tensor, x: torch.Tensor, stacked: torch.Tensor, groups: Groups,
           scale: float, nonzero: list[bool]) -> None:
    """y[rows] = scale * x[rows] @ A[slot].T per slot; other rows of y are set to zero."""
    if groups.base is not None:
        y[groups.base] = 0
    for slot, rows in zip(groups.slots, groups.rows):
        if not nonzero[slot]:
            y[rows] = 0
            continue
        w = _weight(stacked, slot)
        out = x[rows].to(y.dtype) @ w.to(y.dtype).t()
        if scale != 1.0:
            out.mul_(scale)
        y[rows, :out.shape[1]] = out


def expand(y: torch.Tensor, x: torch.Tensor, stacked: torch.Tensor, groups: Groups,
           offset: int, size: int, add_inputs: bool, nonzero: list[bool]) -> None:
    """y[rows, offset:offset+size] (+)= x[rows] @ B[slot].T per slot; -1 rows untouched when
    adding, zero otherwise."""
    target = y.narrow(1, offset, size)
    if not add_inputs and groups.base is not None:
        target[groups.base] = 0
    for slot, rows in zip(groups.slots, groups.rows):
        if not nonzero[slot]:
            if not add_inputs:
                target[rows] = 0
            continue
        w = _weight(stacked, slot)
        width = min(w.shape[0], size)
        out = x[rows].to(y.dtype) @ w[:width].to(y.dtype).t()
        if isinstance(rows, slice):
            if add_inputs:
                target[rows, :width].add_(out)
            else:
                target[rows, :width] = out
        elif add_inputs:
            target[:, :width].index_add_(0, rows, out)
        else:
            target[rows, :width] = out
