"""The grouped CPU LoRA ops of serve/vllm_plugin against a float64 per-token reference.

Shapes as vLLM's LoRA layers hand them over: stacked weights (slots, 1, out, in), per-token slot
indices with -1 for "no adapter", several slices (q/k/v), logits over a whole vocabulary, and the
prompt-logprob case where the logits rows are one request's slice of the step's hidden states.
"""

from __future__ import annotations

import pytest
import torch

from lorastack.serve.vllm_plugin.grouped_ops import group_rows

vllm = pytest.importorskip("vllm")

SLOTS, RANK = 4, 8


def stacked(out: int, inp: int, zero_slots=(), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SLOTS, 1, out, inp, generator=g) * 0.1
    for s in zero_slots:
        w[s] = 0
    return w


def reference(y, x, a, b, idx, scale=1.0, offset=0):
    """y[t, offset:] + scale * x[t] @ A[s].T @ B[s].T per token, in float64; -1: unchanged."""
    out = y.double().clone()
    for t, s in enumerate(idx.tolist()):
        if s < 0:
            continue
        delta = (x[t].double() @ a[s, 0].double().t()) * scale @ b[s, 0].double().t()
        out[t, offset:offset + delta.shape[0]] += delta
    return out


def wrapper(token_slots: list[int], sampled_slots: list[int]):
    from vllm.lora.layers import LoRAMapping

    from lorastack.serve.vllm_plugin.punica import GroupedPunicaWrapperCPU

    w = GroupedPunicaWrapperCPU(8192, 256, device="cpu")
    ids = [None] * SLOTS
    for s in range(SLOTS):
        ids[s] = 10 + s  # slot s holds LoRA id 10 + s
    to_id = [10 + s if s >= 0 else 0 for s in token_slots]
    sampled = [10 + s if s >= 0 else 0 for s in sampled_slots]
    w.update_metadata(LoRAMapping(tuple(to_id), tuple(sampled), is_prefill=True), ids, SLOTS,
                      49152)
    return w


def runs(*spec) -> list[int]:
    """[(slot, length), ...] -> per-token slots."""
    return [s for s, n in spec for _ in range(n)]


CASES = {
    "mixed prefill with base rows": runs((0, 37), (-1, 20), (2, 50), (1, 3), (-1, 1), (3, 64)),
    "interleaved decode (one token each)": [0, 1, -1, 2, 0, 3, 1, -1, 2, 3, 0, 0, -1, 1],
    "one-token decode": [2],
    "long prefill, two adapters": runs((1, 1500), (3, 900)),
    "base only": runs((-1, 40)),
    "same slot in separate runs": runs((1, 5), (2, 7), (1, 9), (-1, 4), (2, 3)),
}


@pytest.mark.parametrize("case", CASES)
def test_linear_matches_reference(case):
    token_slots = CASES[case]
    n, hidden, slices = len(token_slots), 96, (64, 32, 32)  # q, k, v
    w = wrapper(token_slots, token_slots)
    x = torch.randn(n, hidden)
    a = [stacked(RANK, hidden, seed=i) for i in range(3)]
    b = [stacked(size, RANK, zero_slots=(1,) if i == 2 else (), seed=10 + i)
         for i, size in enumerate(slices)]
    y = torch.randn(n, sum(slices))
    expected = y.double().clone()
    idx = torch.tensor(token_slots)
    offset = 0
    for ai, bi, size in zip(a, b, slices):
        part = reference(y[:, offset:offset + size], x, ai, bi, idx, scale=0.5)
        expected[:, offset:offset + size] = part
        offset += size
    w.add_lora_linear(y, x, tuple(a), tuple(b), 0.5, slices)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [12, 300])  # the dense form (a decode step) and per adapter
def test_linear_into_a_fresh_output(rows):
    """vLLM's other call (add_inputs=False): the output holds the LoRA delta alone."""
    token_slots = [(-1 if (i // 4) % 5 == 4 else (i // 4) % 3) for i in range(rows)]
    w = wrapper(token_slots, token_slots)
    x = torch.randn(rows, 48)
    a, b = stacked(RANK, 48, seed=11), stacked(24, RANK, seed=12)
    y = torch.full((rows, 24), 7.0)
    w.add_lora_linear(y, x, (a,), (b,), 2.0, (24,), add_inputs=False)
    expected = reference(torch.zeros(rows, 24), x, a, b, torch.tensor(token_slots), scale=2.0)
    adapted = torch.tensor(token_slots) >= 0
    torch.testing.assert_close(y[adapted].double(), expected[adapted], rtol=1e-5, atol=1e-5)


def test_base_rows_are_untouched_bit_for_bit():
    token_slots = runs((0, 10), (-1, 10), (3, 10))
    w = wrapper(token_slots, token_slots)
    x, y = torch.randn(30, 48), torch.randn(30, 40)
    before = y.clone()
    w.add_lora_linear(y, x, (stacked(RANK, 48),), (stacked(40, RANK, seed=1),), 1.0, (40,))
    assert torch.equal(y[10:20], before[10:20])
    assert not torch.equal(y[:10], before[:10]) and not torch.equal(y[20:], before[20:])


def test_row_parallel_shrink_then_expand_with_offset():
    token_slots = runs((2, 6), (-1, 3), (0, 5))
    w = wrapper(token_slots, token_slots)
    x = torch.randn(14, 64)
    a, b = stacked(RANK, 64, seed=3), stacked(40, RANK, seed=4)
    buffer = torch.zeros(1, 14, RANK)
    w.add_shrink(buffer, x, (a,), 1.0)
    y = torch.zeros(14, 80)
    w.add_expand(y, buffer, (b,), (40,), offset_start=40)
    ref = reference(torch.zeros(14, 40), x, a, b, torch.tensor(token_slots))
    torch.testing.assert_close(y[:, 40:].double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, :40], torch.zeros(14, 40))


def test_embedding_expand():
    token_slots = runs((1, 4), (-1, 2), (3, 4))
    w = wrapper(token_slots, token_slots)
    x, y = torch.randn(10, RANK), torch.randn(10, 32)
    b = stacked(32, RANK, seed=5)
    expected = y.double().clone()
    for t, s in enumerate(token_slots):
        if s >= 0:
            expected[t] += x[t].double() @ b[s, 0].double().t()
    w.add_lora_embedding(y, x, b)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_logits_of_sampled_rows():
    sampled = [0, -1, 2, 3, 2]
    token_slots = runs((0, 7), (-1, 5), (2, 1), (3, 9), (2, 1))
    w = wrapper(token_slots, sampled)
    vocab, hidden = 1000, 64
    x, y = torch.randn(5, hidden), torch.randn(5, vocab)
    a, b = stacked(RANK, hidden, seed=6), stacked(vocab, RANK, seed=7)
    expected = reference(y, x, a, b, torch.tensor(sampled))
    w.add_lora_logits(y, x, a, b, 1.0)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_prompt_logprob_rows_are_one_requests_slice():
    """vLLM 0.32's CPU ops crash here (rows != sampler indices): the rows are a request's
    prompt, a slice of the step's hidden states; each row takes its token's slot."""
    token_slots = runs((0, 25), (1, 89), (-1, 12))
    sampled = [0, 1, -1]
    w = wrapper(token_slots, sampled)
    hidden_states = torch.randn(len(token_slots), 64)
    a, b = stacked(RANK, 64, seed=8), stacked(500, RANK, seed=9)
    x = hidden_states[25:25 + 88]  # request 1's prompt rows, as vLLM slices them
    y = torch.randn(88, 500)
    expected = reference(y, x, a, b, torch.tensor(token_slots[25:113]))
    w.add_lora_logits(y, x, a, b, 1.0)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_logits_skip_when_no_adapter_targets_the_head():
    w = wrapper(runs((0, 30), (1, 30)), [0, 1])
    x, y = torch.randn(60, 64), torch.randn(60, 300)  # rows that match nothing: never read
    before = y.clone()
    w.add_lora_logits(y, x, torch.zeros(SLOTS, 1, RANK, 64), stacked(300, RANK), 1.0)
    assert torch.equal(y, before)


def test_zero_slots_are_skipped_and_exact():
    token_slots = runs((0, 10), (1, 10))
    w = wrapper(token_slots, token_slots)
    x, y = torch.randn(20, 32), torch.randn(20, 16)
    a = stacked(RANK, 32, zero_slots=(0,))
    b = stacked(16, RANK, seed=2)
    expected = reference(y, x, a, b, torch.tensor(token_slots))
    w.add_lora_linear(y, x, (a,), (b,), 1.0, (16,))
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:10].double(), expected[:10], rtol=0, atol=0)


def test_weights_written_later_are_seen():
    """The zero-slot cache follows writes (set_lora after a first step)."""
    token_slots = runs((2, 8))
    w = wrapper(token_slots, token_slots)
    a, b = torch.zeros(SLOTS, 1, RANK, 32), stacked(16, RANK)
    x, y = torch.randn(8, 32), torch.zeros(8, 16)
    w.add_lora_linear(y, x, (a,), (b,), 1.0, (16,))
    assert torch.equal(y, torch.zeros(8, 16))
    a[2, 0].copy_(torch.randn(RANK, 32))  # vLLM's set_lora writes in place
    w.add_lora_linear(y, x, (a,), (b,), 1.0, (16,))
    expected = reference(torch.zeros(8, 16), x, a, b, torch.tensor(token_slots))
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_group_rows():
    g = group_rows(torch.tensor([1, 1, -1, 2, 1, -1, -1]))
    assert g.slots == (1, 2)
    assert g.rows[0].tolist() == [0, 1, 4]
    assert g.rows[1] == slice(3, 4)
    assert g.base.tolist() == [2, 5, 6]
    assert g.n == 7


def test_install_respects_the_switch(monkeypatch):
    from vllm.platforms import current_platform

    from lorastack.serve import vllm_plugin

    monkeypatch.setenv("LORASTACK_VLLM_PATCHES", "0")
    assert vllm_plugin.install().startswith("off")
    monkeypatch.setenv("LORASTACK_VLLM_PATCHES", "1")
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    assert "standing aside" in vllm_plugin.install()
    monkeypatch.setattr(vllm, "__version__", vllm_plugin.VERIFIED_VLLM[0])
    platform = type(current_platform)
    monkeypatch.setattr(platform, "get_punica_wrapper",
                        classmethod(lambda cls: vllm_plugin.CPU_WRAPPER))
    assert vllm_plugin.install().startswith("active")
    assert current_platform.get_punica_wrapper() == vllm_plugin.GROUPED_WRAPPER
