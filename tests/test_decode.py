"""Decode from the prefill's KV cache: greedy output equals transformers' generate."""

from __future__ import annotations

import pytest
import torch

from dwdp.decode import DecodeEngine, DecodeRequest, SamplingParams, sample
from dwdp.engine import PrefillEngine, Request

PROMPTS = [[5, 9, 2, 7, 1, 3], list(range(40, 77)), [11]]


def _prefill_then_decode(model, prompts, params, max_num_tokens=16, max_batch=8):
    res = PrefillEngine(model, max_num_tokens=max_num_tokens, keep_kv=True).run(
        [Request(i, p) for i, p in enumerate(prompts)])
    dec = DecodeEngine(model, max_batch=max_batch)
    out = dec.run([DecodeRequest(r.id, r.kv, r.next_token, params, r.prompt_len) for r in res])
    return {r.id: r for r in out}, dec


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_greedy_equals_transformers_generate(ref_cases, family):
    ref = ref_cases[family]
    n = 12
    # Chunked prefill (MNT 16 < 37) and a decode batch smaller than the request count.
    got, dec = _prefill_then_decode(ref.ours(), PROMPTS, SamplingParams(max_tokens=n), max_batch=2)
    for i, p in enumerate(PROMPTS):
        want = ref.hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist()
        assert got[i].tokens == want, f"prompt {i}"
        assert got[i].finish_reason == "length" and len(got[i].itl) == n - 1
    assert dec.steps >= 2 * (n - 1)  # max_batch 2 with 3 requests: two waves


def test_eos_stops_and_limits(ref_cases):
    ref = ref_cases["qwen3_moe"]
    greedy, _ = _prefill_then_decode(ref.ours(), PROMPTS[:1], SamplingParams(max_tokens=8))
    eos = greedy[0].tokens[3]
    stopped, _ = _prefill_then_decode(ref.ours(), PROMPTS[:1], SamplingParams(max_tokens=8, eos_token_id=eos))
    first = greedy[0].tokens.index(eos)
    assert stopped[0].tokens == greedy[0].tokens[:first + 1] and stopped[0].finish_reason == "stop"
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _prefill_then_decode(ref.ours(), PROMPTS[:1], SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0).validate(100)


def test_sampling_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -8.0])
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits, SamplingParams(temperature=1.0), g) for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / len(draws)
    assert torch.allclose(freq, torch.softmax(logits, 0), atol=0.03)
    assert {sample(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(300)} == {0, 1}
    # top_p 0.7: tokens 0 (0.64) and 1 (0.24) form the smallest set reaching 0.7.
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(300)} == {0, 1}
    assert sample(logits, SamplingParams(), None) == 0


def test_seeded_sampling_is_reproducible(ref_cases):
    ref = ref_cases["deepseek_v3"]
    p = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    a, _ = _prefill_then_decode(ref.ours(), PROMPTS, p)
    b, _ = _prefill_then_decode(ref.ours(), PROMPTS, p)
    assert all(a[i].tokens == b[i].tokens for i in a)
