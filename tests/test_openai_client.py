"""The server driven by the official ``openai`` client, as a user's code would: completions
and chat, streaming and not, every OpenAI / vLLM field we accept, each checked for what it
means against transformers' forward of the same weights (penalised distributions computed
independently in float64), not just for a 200.

One server (tiny Qwen3-MoE, a word-level tokenizer with a chat template) serves every test.
"""

from __future__ import annotations

import math

import openai
import pytest
import torch

from dwdp.sampling import uniform_noise
from dwdp.serve.server import Server
from dwdp.serve.text import load_tokenizer
from dwdp.serve.worker import ServingWorker

TEMPLATE = "{% for m in messages %}t1 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t2{% endif %}"
NAMES = ["tiny", "tiny-alias"]


def _word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(320)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def env(ref_cases, tmp_path_factory):
    ref = ref_cases["qwen3_moe"]
    worker = ServingWorker(ref.ours(), max_num_tokens=32, max_batch=4, max_queue=16)
    srv = Server(worker, NAMES, "127.0.0.1", 0, _word_tokenizer(tmp_path_factory.mktemp("tok")))
    srv.start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield ref, client, srv
    client.close()
    srv.shutdown(5)


def _ids(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


_LOGITS: dict = {}


def _hf_logits(ref, seq: list[int]) -> torch.Tensor:
    """transformers' last logits for ``seq`` (memoised: the references share many prefixes)."""
    key = (ref.name, tuple(seq))
    if key not in _LOGITS:
        with torch.no_grad():
            _LOGITS[key] = ref.hf(torch.tensor([seq])).logits[0, -1].double()
    return _LOGITS[key]


def _processed(logits, prompt, out, presence=0.0, frequency=0.0, repetition=1.0, bias=None, eos=None,
               min_tokens=0):
    """vLLM's logits processing, written out in float64 on one row."""
    x = logits.clone()
    if eos is not None and len(out) < min_tokens:
        x[eos] = -math.inf
    for t, b in (bias or {}).items():
        x[t] += b
    for t in set(prompt) | set(out):
        x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
    for t in set(out):
        x[t] -= frequency * out.count(t) + presence
    return x


def _reference(ref, prompt, n, temperature=0.0, seed=None, **kw) -> list[int]:
    """Tokens from transformers' logits, processed as specified; sampled rows draw the
    server's documented noise (a pure function of seed, draw and token)."""
    out = []
    for draw in range(n):
        x = _processed(_hf_logits(ref, prompt + out), prompt, out, **kw)
        if temperature > 0:
            u = uniform_noise(torch.tensor([seed]), torch.tensor([draw]), x.shape[0])[0]
            x = torch.log_softmax((x - x.max()) / temperature, -1) - torch.log(-torch.log(u))
        out.append(int(x.argmax()))
    return out


PROMPT = [5, 9, 2, 7, 5, 9]


def test_models_and_unknown_model(env):
    _, client, _ = env
    assert [m.id for m in client.models.list().data] == NAMES
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt=[1, 2], max_tokens=1)
    assert e.value.body["param"] == "model" and "gpt-4o" in e.value.body["message"]
    r = client.completions.create(model="tiny-alias", prompt=[1, 2], max_tokens=1)
    assert r.model == "tiny-alias"


def test_completions_and_chat_greedy_streaming_and_not(env):
    ref, client, _ = env
    want = _reference(ref, PROMPT, 5)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0,
                                  presence_penalty=0, frequency_penalty=0, best_of=1, suffix="", user="u")
    assert _ids(r.choices[0].text) == want and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 5
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, stream=True))
    assert _ids(text) == want
    chat_prompt = [1, 7, 1, 5, 9, 2]  # the template's rendering of these messages
    msgs = [{"role": "system", "content": "t7"}, {"role": "user", "content": "t5 t9"}]
    want = _reference(ref, chat_prompt, 4)
    r = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=4, temperature=0, response_format={"type": "text"},
        metadata={"k": "v"}, parallel_tool_calls=False, tool_choice="none",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert _ids(r.choices[0].message.content) == want and r.usage.prompt_tokens == len(chat_prompt)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert _ids("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) == want
    assert chunks[-1].usage.completion_tokens == 4


def test_refused_fields_name_themselves(env):
    _, client, _ = env
    msgs = [{"role": "user", "content": "t5"}]
    cases = [
        (dict(response_format={"type": "json_object"}), "response_format", "constrained decoding"),
        (dict(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto"), "tools", "tool"),
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "tool"),
    ]
    for kw, param, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1, **kw)
        assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[1], max_tokens=1, n=2, best_of=3)
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[1], max_tokens=1, suffix="t3")
    assert e.value.body["param"] == "suffix"


@pytest.mark.parametrize("kw", [
    dict(presence_penalty=1.5, frequency_penalty=0.7),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6, frequency_penalty=-0.5, logit_bias={"17": 2.5}),
])
def test_penalties_follow_the_float64_reference(env, kw):
    """Greedy and seeded sampling under penalties pick what the penalised float64
    distribution of transformers' logits picks, first token (from prefill) included."""
    ref, client, _ = env
    n = 8
    bias = {int(k): v for k, v in kw.get("logit_bias", {}).items()}
    spec = dict(presence=kw.get("presence_penalty", 0.0), frequency=kw.get("frequency_penalty", 0.0),
                repetition=kw.get("repetition_penalty", 1.0), bias=bias)
    want = _reference(ref, PROMPT, n, **spec)
    assert want != _reference(ref, PROMPT, n), "the penalties should change this greedy path"
    extra = {k: kw[k] for k in ("repetition_penalty",) if k in kw}
    std = {k: v for k, v in kw.items() if k != "repetition_penalty"}
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=n, temperature=0, extra_body=extra, **std)
    assert _ids(r.choices[0].text) == want
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=n, temperature=0.8, seed=11,
                                  extra_body=extra, **std)
    assert _ids(r.choices[0].text) == _reference(ref, PROMPT, n, temperature=0.8, seed=11, **spec)
    # The next request reuses the slot (freed slots are taken last-in first-out): none of the
    # penalised request's state may stay behind in it.
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=n, temperature=0)
    assert _ids(r.choices[0].text) == _reference(ref, PROMPT, n)


def test_logit_bias_forces_and_bans(env):
    ref, client, _ = env
    greedy = _reference(ref, PROMPT, 6)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, logit_bias={"42": 100})
    assert _ids(r.choices[0].text) == [42] * 6
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                  logit_bias={str(greedy[0]): -100})
    got = _ids(r.choices[0].text)
    assert greedy[0] not in got and got == _reference(ref, PROMPT, 6, bias={greedy[0]: -100.0})
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t5"}], max_tokens=3,
                                       temperature=0, logit_bias={"99": 100})
    assert _ids(r.choices[0].message.content) == [99] * 3


def test_min_tokens_and_ignore_eos(env):
    ref, client, _ = env
    greedy = _reference(ref, PROMPT, 6)
    eos = greedy[1]  # greedy reaches this "EOS" as its second token
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"eos_token_id": eos})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 2
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"eos_token_id": eos, "min_tokens": 4})
    got = _ids(r.choices[0].text)
    assert eos not in got[:3] and len(got) >= 4
    assert got == _reference(ref, PROMPT, len(got), eos=eos, min_tokens=4)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"eos_token_id": eos, "ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and _ids(r.choices[0].text) == greedy


def test_n_choices_are_separate_sequences(env):
    ref, client, srv = env
    before = srv.worker.metrics.value("dwdp_requests_total")
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, best_of=3,
                                  seed=5)
    assert srv.worker.metrics.value("dwdp_requests_total") == before + 3  # one sequence (decode slot) each
    outs = [_ids(c.text) for c in sorted(r.choices, key=lambda c: c.index)]
    assert [c.index for c in r.choices] == [0, 1, 2] and len({tuple(o) for o in outs}) == 3
    assert outs == [_reference(ref, PROMPT, 8, temperature=1.0, seed=5 + j) for j in range(3)]  # seeds 5, 6, 7
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 24
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t5"}], n=2,
                                            max_tokens=3, temperature=1.0, seed=1, stream=True)
    texts, reasons = {0: "", 1: ""}, {}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert reasons == {0: "length", 1: "length"} and all(len(_ids(t)) == 3 for t in texts.values())


def test_a_list_of_prompts(env):
    ref, client, _ = env
    prompts = [[5, 9, 2], list(range(40, 80))]  # the second over MNT 32: chunked prefill
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=3, temperature=0, n=2)
    got = {c.index: _ids(c.text) for c in r.choices}
    want = [_reference(ref, p, 3) for p in prompts]
    assert got == {0: want[0], 1: want[0], 2: want[1], 3: want[1]}
    assert r.usage.prompt_tokens == 43 and r.usage.completion_tokens == 12
    r = client.completions.create(model="tiny", prompt=["t5 t9 t2", "t1 t2"], max_tokens=2, temperature=0)
    assert [_ids(c.text) for c in r.choices] == [want[0][:2], _reference(ref, [1, 2], 2)]


def test_echo_with_prompt_logprobs(env):
    ref, client, _ = env
    prompt = list(range(60, 100))  # over MNT 32: its logprobs come from two prefill chunks
    with torch.no_grad():
        want = torch.log_softmax(ref.hf(torch.tensor([prompt])).logits[0].double(), -1)
    gen = _reference(ref, prompt, 2)
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                      logprobs=2, stream=stream)
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks)
        words = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
        assert text == words(prompt) + words(gen)  # the prompt's text, then the completion's
        lp = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
        tokens = [t for x in lp for t in x.tokens]
        token_lps = [v for x in lp for v in x.token_logprobs]
        tops = [v for x in lp for v in x.top_logprobs]
        assert tokens == [f"t{i}" for i in prompt + gen]
        assert token_lps[0] is None and tops[0] is None  # nothing predicts the first token
        for i in range(1, len(prompt)):
            assert token_lps[i] == pytest.approx(float(want[i - 1, prompt[i]]), abs=1e-4)
            best = sorted(tops[i].values(), reverse=True)[0]
            assert best == pytest.approx(float(want[i - 1].max()), abs=1e-4)
        assert token_lps[len(prompt)] == pytest.approx(float(want[-1, gen[0]]), abs=1e-4)


def test_mixed_batch_rows_keep_their_own_parameters(env):
    """Plain and processed requests decoded in the same steps: each row gets its own."""
    import threading

    ref, client, _ = env
    cases = [({}, {}), ({"presence_penalty": 2.0}, dict(presence=2.0)),
             ({"logit_bias": {"3": 4.0}, "frequency_penalty": 1.0}, dict(bias={3: 4.0}, frequency=1.0)),
             ({"extra_body": {"repetition_penalty": 2.0}}, dict(repetition=2.0))]
    got = [None] * len(cases)
    barrier = threading.Barrier(len(cases))

    def go(i):
        barrier.wait()
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, **cases[i][0])
        got[i] = _ids(r.choices[0].text)

    ths = [threading.Thread(target=go, args=(i,)) for i in range(len(cases))]
    for t in ths:
        t.start()
    for t in ths:
        t.join(120)
    assert got == [_reference(ref, PROMPT, 8, **spec) for _, spec in cases]
