"""Decode from the prefill's KV cache: greedy output equals transformers' generate."""

from __future__ import annotations

import pytest
import torch

from dwdp.decode import DecodeEngine, DecodeRequest
from dwdp.sampling import SamplingParams, make_stream, sample
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
    g = make_stream(0)
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
    """A tiny temperature or top_p used to give NaN probabilities (a crash)."""
    logits = torch.tensor([0.3, 2.0, -1.0, 1.9])
    g = make_stream(1)
    for p in (SamplingParams(temperature=1e-300), SamplingParams(temperature=1.0, top_p=1e-300),
              SamplingParams(temperature=5e-324, top_k=2)):
        assert {sample(logits, p, g) for _ in range(20)} == {1}  # greedy, never NaN
    for seed in (2 ** 63, 2 ** 64 - 1, -(2 ** 63), -1):  # every 64-bit seed, signed or not
        a = [sample(logits, SamplingParams(temperature=1.0), make_stream(seed)) for _ in range(3)]
        assert a == [sample(logits, SamplingParams(temperature=1.0), make_stream(seed)) for _ in range(3)]
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




def _decode_reqs(ref, prompts, params, max_num_tokens=16):
    res = PrefillEngine(ref.ours(), max_num_tokens=max_num_tokens, keep_kv=True).run(
        [Request(i, p) for i, p in enumerate(prompts)])
    return [DecodeRequest(r.id, r.kv, r.next_token, params, r.prompt_len) for r in sorted(res, key=lambda r: r.id)]


def _hf_greedy(ref, prompt, n):
    return ref.hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_requests_joining_mid_flight_equal_transformers_generate(ref_cases, family):
    """Continuous batching: requests join a running batch between steps, take the slots
    finished ones leave, and each still decodes exactly what transformers' generate does."""
    ref = ref_cases[family]
    prompts = [[5, 9, 2, 7, 1, 3], list(range(40, 77)), [11], [3, 3, 8, 1]]
    lengths = [9, 4, 7, 6]
    reqs = [r for r in _decode_reqs(ref, prompts, SamplingParams())]
    for r, n in zip(reqs, lengths):
        r.params = SamplingParams(max_tokens=n)
    dec = DecodeEngine(ref.ours(), max_batch=2, max_context=64)
    ptrs = [t.data_ptr() for kv in dec.cache.layers for t in kv]
    dec.add(reqs[0])
    out = {}
    for step in range(40):
        if step == 2:
            dec.add(reqs[1])  # joins while request 0 runs
        if step == 3:
            dec.add(reqs[2])  # waits for a free slot (max_batch 2)
            dec.add(reqs[3])
        out.update({r.id: r for r in dec.step()})
        if not dec.has_work and step > 3:
            break
    assert sorted(out) == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        assert out[i].tokens == _hf_greedy(ref, p, lengths[i]), f"request {i}"
    assert [t.data_ptr() for kv in dec.cache.layers for t in kv] == ptrs  # written in place, never reallocated
    assert sorted(dec._free) == [0, 1]  # every slot came back


@pytest.mark.parametrize("overlap", [True, False])
def test_cache_slot_holds_the_whole_sequence(ref_cases, overlap):
    """After some steps a slot holds exactly the KV that prefilling prompt + generated
    tokens produces (the prefill's own cache is checked against transformers elsewhere).
    Overlapped, a step is in flight: it has written the newest token's KV, and its own
    token is not read yet."""
    for family in ("qwen3_moe", "deepseek_v3"):
        ref = ref_cases[family]
        prompt = [4, 8, 15, 16, 23, 42, 7]
        (req,) = _decode_reqs(ref, [prompt], SamplingParams(max_tokens=20))
        dec = DecodeEngine(ref.ours(), max_batch=3, max_context=40, overlap=overlap)
        dec.add(req)
        for _ in range(5):
            dec.step()
        a = dec.active[0]
        assert a.pending == int(overlap) and len(a.tokens) == 5 + int(not overlap)
        seq = prompt + (a.tokens if overlap else a.tokens[:-1])  # without a step in flight the newest has no KV yet
        assert a.length == len(seq)
        full = PrefillEngine(ref.ours(), max_num_tokens=64, keep_kv=True).run([Request(0, seq)])[0]
        for (k, v), (k2, v2) in zip(dec.cache.read_prompt(a.slot, a.length), full.kv):
            torch.testing.assert_close(k, k2, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v, v2, rtol=1e-4, atol=1e-5)


def test_decode_attention_reference_against_float64():
    from dwdp.models.attention import decode_attention

    g = torch.Generator().manual_seed(0)
    S, L, Hkv, G, D = 5, 24, 2, 3, 16
    kc, vc = torch.randn(S, L, Hkv, D, generator=g), torch.randn(S, L, Hkv, D, generator=g)
    slots, lens = torch.tensor([3, 0, 4]), torch.tensor([1, 24, 9], dtype=torch.int32)
    q = torch.randn(3, Hkv * G, D, generator=g)
    got = decode_attention(q, kc, vc, slots, lens, 0.25)
    for b in range(3):
        for h in range(Hkv * G):
            k, v = kc[slots[b], :lens[b], h // G].double(), vc[slots[b], :lens[b], h // G].double()
            p = torch.softmax(k @ q[b, h].double() * 0.25, 0)
            torch.testing.assert_close(got[b, h].double(), p @ v, rtol=1e-5, atol=1e-6)


def test_seeded_request_samples_the_same_alone_or_in_a_batch(ref_cases):
    """Counter-based streams: a seeded request's tokens do not depend on its batch."""
    ref = ref_cases["qwen3_moe"]
    p = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, seed=123)
    alone = DecodeEngine(ref.ours(), 4).run(_decode_reqs(ref, [PROMPTS[1]], p))[0].tokens
    others = SamplingParams(max_tokens=10, temperature=1.3, top_p=0.8)
    reqs = _decode_reqs(ref, [PROMPTS[0], PROMPTS[1], PROMPTS[2]], others)
    reqs[1].params = p
    mixed = {r.id: r.tokens for r in DecodeEngine(ref.ours(), 4).run(reqs)}
    assert mixed[1] == alone


def test_uniform_noise_is_uniform_and_keyed():
    from dwdp.sampling import uniform_noise

    u = uniform_noise(torch.tensor([7, 7, -3]), torch.tensor([0, 1, 0]), 100_000)
    assert bool(((u > 0) & (u < 1)).all())
    for row in u:  # each row's histogram over 10 bins is flat (about 10,000 each)
        counts = torch.histc(row.float(), bins=10, min=0, max=1)
        assert float((counts - 10_000).abs().max()) < 500
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert torch.equal(u[0], uniform_noise(torch.tensor([7]), torch.tensor([0]), 100_000)[0])


def test_max_context_is_enforced_with_the_fix_named(ref_cases):
    ref = ref_cases["qwen3_moe"]
    (req,) = _decode_reqs(ref, [PROMPTS[1]], SamplingParams(max_tokens=30))
    with pytest.raises(ValueError, match="max-context"):
        DecodeEngine(ref.ours(), 2, max_context=48).add(req)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        DecodeEngine(ref.ours(), 2, max_context=10_000)


def test_cancel_frees_the_slot(ref_cases):
    ref = ref_cases["qwen3_moe"]
    reqs = _decode_reqs(ref, PROMPTS, SamplingParams(max_tokens=6))
    dec = DecodeEngine(ref.ours(), 2, max_context=64)
    for r in reqs:
        dec.add(r)
    dec.step()
    assert len(dec.active) == 2 and not dec._free
    dec.cancel([dec.active[0].req.id])
    out = {r.id: r for r in dec.run([])}
    assert len(out) == 2 and all(r.finish_reason == "length" for r in out.values())
    assert sorted(dec._free) == [0, 1]


def test_overlapped_steps_decode_what_sequential_steps_do(ref_cases):
    """Launching each step before reading the last one (the default) changes no output:
    EOS mid-run (the stopped row rides one more step and drops its token), token limits,
    seeded sampling with top-p, logprobs, requests joining mid-flight and a cancel all end
    as with one step at a time, and every slot comes back."""
    ref = ref_cases["qwen3_moe"]
    prompts = PROMPTS + [[3, 3, 8, 1], [2, 2]]
    greedy = {r.id: r for r in DecodeEngine(ref.ours(), 8).run(_decode_reqs(ref, prompts[:1], SamplingParams(max_tokens=8)))}
    eos = greedy[0].tokens[3]
    params = [SamplingParams(max_tokens=8, eos_token_id=eos), SamplingParams(max_tokens=9, temperature=0.8, seed=7, logprobs=2),
              SamplingParams(max_tokens=5), SamplingParams(max_tokens=7, temperature=1.0, top_p=0.9, seed=3),
              SamplingParams(max_tokens=8)]

    def drive(overlap: bool):
        reqs = _decode_reqs(ref, prompts, SamplingParams())
        for r, p in zip(reqs, params):
            r.params = p
        dec = DecodeEngine(ref.ours(), 2, max_context=64, overlap=overlap)
        out, lps = {}, {}

        def add(r):
            dec.add(r)
            lps[r.id] = dec.waiting[-1].logprobs  # the request's per-token logprobs, filled as it decodes

        for r in reqs[:3]:
            add(r)
        for _ in range(2):
            out.update({r.id: r for r in dec.step()})
        add(reqs[3])
        add(reqs[4])
        out.update({r.id: r for r in dec.step()})
        out.update({r.id: r for r in dec.cancel([4])})
        while dec.has_work:
            out.update({r.id: r for r in dec.step()})
        assert sorted(dec._free) == [0, 1] and not dec._draining
        return out, lps

    seq, seq_lp = drive(False)
    ovl, ovl_lp = drive(True)
    assert sorted(seq) == sorted(ovl) == [0, 1, 2, 3, 4]
    assert seq[0].finish_reason == ovl[0].finish_reason == "stop" and ovl[0].tokens[-1] == eos
    assert seq[4].finish_reason == ovl[4].finish_reason == "cancelled"
    for i in range(4):
        assert (ovl[i].tokens, ovl[i].finish_reason) == (seq[i].tokens, seq[i].finish_reason), f"request {i}"
    assert [len(ovl[i].tokens) for i in (1, 2, 3)] == [9, 5, 7]
    assert len(ovl_lp[1]) == len(seq_lp[1]) == 8  # decoded tokens (the first came from prefill without logprobs)
    for (lp_o, top_o), (lp_s, top_s) in zip(ovl_lp[1], seq_lp[1]):
        assert lp_o == pytest.approx(lp_s, abs=1e-5) and [t for t, _ in top_o] == [t for t, _ in top_s]


def test_a_prompt_cache_that_fails_to_load_fails_its_step_and_frees_every_slot(ref_cases):
    """A cache that cannot be written into its slot (a layer missing) raises from the step;
    fail_active then ends every request admitted so far, that one included, and no slot is lost."""
    ref = ref_cases["qwen3_moe"]
    good, bad, later = _decode_reqs(ref, PROMPTS, SamplingParams(max_tokens=4))
    bad.kv = bad.kv[:-1]
    dec = DecodeEngine(ref.ours(), 4, max_context=64)
    for r in (good, bad, later):
        dec.add(r)
    with pytest.raises(ValueError):
        dec.step()
    failed = dec.fail_active("boom")
    assert sorted(r.id for r in failed) == [good.id, bad.id] and all(r.finish_reason == "error" for r in failed)
    assert sorted(dec._free) == [0, 1, 2, 3]
    assert [r.id for r in dec.run([])] == [later.id]  # the one not yet admitted still decodes
