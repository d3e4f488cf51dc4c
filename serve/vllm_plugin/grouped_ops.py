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
from typing import TypeAlias

import torch

Rows: TypeAlias = slice | torch.Tensor  # a run of rows, or the (sorted) row numbers of several runs


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


class FusedSlices:
    """A linear layer's LoRA slices (q/k/v, gate/up) fused per slot, so that one adapter's rows
    cost two matmuls whatever the number of slices: A stacked along the rank, (slots, n*r, in),
    and B block-diagonal, (slots, out, n*r). Rebuilt only when vLLM wrote the weights
    (`_version`, as in NonZeroSlots); in a decode step of a few tokens per adapter, the call count,
    not the arithmetic, is what costs."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[tuple, Fused]] = {}

    def __call__(self, a_slices, b_slices) -> Fused:
        key = tuple((id(t), t._version) for t in (*a_slices, *b_slices))
        hit = self._seen.get(id(a_slices[0]))
        if hit is not None and hit[0] == key:
            return hit[1]
        a = [t.reshape(t.shape[0], t.shape[-2], t.shape[-1]) for t in a_slices]
        b = [t.reshape(t.shape[0], t.shape[-2], t.shape[-1]) for t in b_slices]
        a_cat = torch.cat(a, dim=1)
        b_bd = a_cat.new_zeros(a_cat.shape[0], sum(t.shape[1] for t in b), a_cat.shape[1],
                               dtype=b[0].dtype)
        row = col = 0
        for ai, bi in zip(a, b):
            b_bd[:, row:row + bi.shape[1], col:col + ai.shape[1]] = bi
            row, col = row + bi.shape[1], col + ai.shape[1]
        slots, rank = a_cat.shape[0], a_cat.shape[1]
        fused = Fused(a_cat, b_bd, a_cat.reshape(slots * rank, -1),
                      b_bd.permute(1, 0, 2).reshape(b_bd.shape[1], slots * rank),
                      a_cat.reshape(slots, -1).ne(0).any(dim=1).tolist())
        self._seen[id(a_slices[0])] = (key, fused)
        return fused


@dataclass(frozen=True)
class Fused:
    a_cat: torch.Tensor  # (slots, rank, in)
    b_bd: torch.Tensor  # (slots, out, rank)
    a_all: torch.Tensor  # (slots * rank, in): every slot's A at once
    b_all: torch.Tensor  # (out, slots * rank)
    nonzero: list[bool]

    @property
    def rank(self) -> int:
        return self.a_cat.shape[1]


def row_mask(groups: Groups, slots: int, rank: int) -> torch.Tensor:
    """(rows, slots * rank): 1 where the column belongs to the row's own slot, else 0."""
    own = groups.indices[:, None] == torch.arange(slots)[None, :]
    return own.repeat_interleave(rank, dim=1).to(torch.float32)


def dense_linear(y: torch.Tensor, x: torch.Tensor, f: Fused, mask: torch.Tensor,
                 scale: float) -> None:
    """y += scale * ((x @ A_all.T) * mask) @ B_all.T: every slot computed for every row and the
    wrong ones masked to zero. Wasteful in arithmetic (x slots), but three calls whatever the mix
    of adapters: the fastest form for a decode step's few rows. -1 rows get + 0."""
    t = x.float() @ f.a_all.float().t()
    t.mul_(mask)
    if scale != 1.0:
        t.mul_(scale)
    y[:, :f.b_all.shape[0]].add_(t.to(y.dtype) @ f.b_all.to(y.dtype).t())


def fused_linear(y: torch.Tensor, x: torch.Tensor, f: Fused, groups: Groups, scale: float,
                 add_inputs: bool) -> None:
    """y[rows] (+)= scale * x[rows] @ A[slot].T @ B[slot].T per slot (all slices at once);
    -1 rows untouched. The shrink runs in float32, the expand in y's dtype, as vLLM's ops do."""
    a_cat, b_bd, nonzero = f.a_cat, f.b_bd, f.nonzero
    width = b_bd.shape[1]
    target = y[:, :width]
    for slot, rows in zip(groups.slots, groups.rows):
        if not nonzero[slot]:
            if not add_inputs:
                target[rows] = 0
            continue
        t = x[rows].float() @ a_cat[slot].float().t()
        if scale != 1.0:
            t.mul_(scale)
        out = t.to(y.dtype) @ b_bd[slot].to(y.dtype).t()
        if not add_inputs:
            target[rows] = out
        elif isinstance(rows, slice):
            target[rows].add_(out)
        else:
            target.index_add_(0, rows, out)
