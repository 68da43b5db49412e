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


def test_sampling_degenerate_parameters_are_well_defined():
    """Issue 14: a tiny temperature or top_p used to give NaN probabilities (a crash)."""
    from dwdp.decode import make_generator

    logits = torch.tensor([0.3, 2.0, -1.0, 1.9])
    g = make_generator(1)
    for p in (SamplingParams(temperature=1e-300), SamplingParams(temperature=1.0, top_p=1e-300),
              SamplingParams(temperature=5e-324, top_k=2)):
        assert {sample(logits, p, g) for _ in range(20)} == {1}  # greedy, never NaN
    for seed in (2 ** 63, 2 ** 64 - 1, -(2 ** 63), -1):  # every 64-bit seed, signed or not
        a = [sample(logits, SamplingParams(temperature=1.0), make_generator(seed)) for _ in range(3)]
        assert a == [sample(logits, SamplingParams(temperature=1.0), make_generator(seed)) for _ in range(3)]
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingParams(temperature=float("nan")).validate(4)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2 ** 64).validate(4)


def test_unseeded_requests_do_not_share_a_stream(ref_cases):
    """Without a seed each request draws fresh entropy (it used to be seed 0 for all)."""
    ref = ref_cases["qwen3_moe"]
    p = SamplingParams(max_tokens=8, temperature=1.0)
    outs = {tuple(r.tokens) for r in _prefill_then_decode(ref.ours(), [PROMPTS[0]] * 4, p)[0].values()}
    assert len(outs) > 1


def test_a_sampling_failure_ends_that_request_only(ref_cases):
    ref = ref_cases["qwen3_moe"]
    res = PrefillEngine(ref.ours(), 16, keep_kv=True).run([Request(i, p) for i, p in enumerate(PROMPTS[:2])])
    dec = DecodeEngine(ref.ours(), 4)
    bad = object()  # not a generator: multinomial raises for this request only
    reqs = [DecodeRequest(0, res[0].kv, res[0].next_token, SamplingParams(max_tokens=4, temperature=1.0), 0, bad),
            DecodeRequest(1, res[1].kv, res[1].next_token, SamplingParams(max_tokens=4), 0)]
    out = {r.id: r for r in dec.run(reqs)}
    assert out[0].finish_reason == "error" and "sampling failed" in out[0].error
    assert out[1].finish_reason == "length" and len(out[1].tokens) == 4
