"""Seeded sampling under chunked prefill on the CPU: vLLM 0.32 kills its engine there.

When a step schedules only part of a request's prompt (chunked prefill: the step's token budget
ran out), vLLM samples a token for it anyway and discards it. For a request with its own `seed`,
`GPUModelRunner._bookkeeping_sync` then rewinds that request's generator with
`gen.set_offset(gen.get_offset() - 4)`: Philox offsets, a CUDA generator's. A CPU generator
(MT19937) has no offset and raises "CPU Generator does not use offset", and EngineCore dies,
taking every request in flight with it. Any completion with `seed` and a temperature above 0
that arrives while the engine is busy can do it (found by bench/fuzz.py).

The same rewind, for a CPU generator: its state is saved before the step samples and put back
after, for the requests whose token is discarded; `_bookkeeping_sync` does not see those
generators, so it does not call set_offset on them. The discarded sample then leaves the seeded
sequence as it was, which is what the rewind is for on a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_PATCHED = "_lorastack_seeded_patch"


def install() -> str:
    """Patch vLLM's CPU model runner (idempotent); what was done, in words."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner, _PATCHED, False):
        return "seeded sampling under chunked prefill: already patched"
    sample, bookkeeping = CPUModelRunner._sample, CPUModelRunner._bookkeeping_sync

    def _sample(self: Any, *args: Any, **kwargs: Any):
        gens = self.input_batch.generators
        self._lorastack_saved = {i: gens[i].get_state() for i in _discarded(self) if i in gens}
        return sample(self, *args, **kwargs)

    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any):
        gens = self.input_batch.generators
        saved = getattr(self, "_lorastack_saved", {})
        self._lorastack_saved = {}
        held = {i: gens.pop(i) for i in _discarded(self) if i in gens}
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            for i, gen in held.items():
                if i in saved:
                    gen.set_state(saved[i])
                gens[i] = gen

    CPUModelRunner._sample = _sample
    CPUModelRunner._bookkeeping_sync = _bookkeeping_sync
    setattr(CPUModelRunner, _PATCHED, True)
    return "seeded sampling under chunked prefill: patched"


def _discarded(runner: Any) -> list[int]:
    """Batch rows whose sampled token this step throws away (a partial prefill)."""
    n = runner.input_batch.num_reqs
    return [int(i) for i in np.nonzero(runner.discard_request_mask.np[:n])[0]]
