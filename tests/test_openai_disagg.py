"""The OpenAI sampling fields on the disaggregated path: prompts prefilled by a prefill
group in other processes (the first token is sampled from their logits), decoded by an
expert-parallel decode group in other processes (the sampling parameters and the prompt
travel with each request). Penalties, logit_bias and min_tokens must give what the float64
reference computes from transformers' logits, as on the local path; echo's prompt logprobs
equal transformers' forward."""

from __future__ import annotations

import torch

from dwdp.sampling import SamplingParams
from dwdp.serve.decode_pool import DecodePool, DecodePoolSpec
from dwdp.serve.disagg import DisaggServingWorker, PrefillPool, PrefillPoolSpec
from dwdp.serve.worker import ServeRequest
from test_openai_client import _reference


def _collect(req: ServeRequest, timeout=120):
    tokens = []
    while (ev := req.events.get(timeout=timeout))[0] == "token":
        tokens.append(ev[1])
    return tokens, ev


def test_penalties_and_echo_on_remote_prefill_and_decode_groups(ref_cases):
    ref = ref_cases["qwen3_moe"]
    prefill = PrefillPool(PrefillPoolSpec(str(ref.path), "dp", 1, max_num_tokens=24), ready_timeout_s=120)
    decode = DecodePool(DecodePoolSpec(str(ref.path), 2, max_batch=2, max_context=128), ready_timeout_s=120)
    worker = DisaggServingWorker(ref.ours(), prefill, max_batch=2, decode=decode)
    worker.start()
    prompt = [5, 9, 2, 7, 5, 9]
    cases = [  # (sampling fields, the float64 reference's spelling of them)
        (dict(presence_penalty=1.5, frequency_penalty=0.7, logit_bias={17: 2.5}),
         dict(presence=1.5, frequency=0.7, bias={17: 2.5})),
        (dict(repetition_penalty=1.8), dict(repetition=1.8)),
        (dict(eos_token_id=_reference(ref, prompt, 2)[1], min_tokens=4),
         dict(eos=_reference(ref, prompt, 2)[1], min_tokens=4)),
    ]
    try:
        reqs = [worker.submit(ServeRequest(prompt, SamplingParams(max_tokens=6, **kw))) for kw, _ in cases]
        echo = worker.submit(ServeRequest(list(range(60, 90)), SamplingParams(max_tokens=2, prompt_logprobs=1)))
        for r, (_, spec) in zip(reqs, cases):
            tokens, end = _collect(r)
            assert tokens == _reference(ref, prompt, len(tokens), **spec) and end[0] == "done", (spec, end)
            assert len(tokens) >= 4
        assert min(decode.routed) >= 1  # both decode ranks served some
        tokens, end = _collect(echo)
        assert end == ("done", "length")
        with torch.no_grad():
            want = torch.log_softmax(ref.hf(torch.tensor([list(range(60, 90))])).logits[0].double(), -1)
        lps = echo.prompt_logprobs
        assert lps[0] is None and len(lps) == 30
        for i in range(1, 30):
            assert abs(lps[i][0] - float(want[i - 1, 60 + i])) < 1e-4
    finally:
        worker.stop(10)
    assert all(p.exitcode == 0 for p in decode.procs)
