"""The OpenAI-compatible routes on FastAPI: ``/v1/completions`` and
``/v1/chat/completions`` (streaming and not), ``/v1/models`` (and ``/v1/models/{id}``),
``/health`` and Prometheus ``/metrics``; an optional API key is required as
``Authorization: Bearer <key>`` (``/health`` stays open for probes).

A request asks for one or more choices: ``n`` per prompt, and a completions request may
carry a list of prompts (choice ``i * n + j`` is prompt i's j-th, as OpenAI numbers them).
Each choice is a sequence of its own in the serving loop (it takes a decode slot, counted
against ``--max-batch``); a seeded request's choice j samples with seed + j, as vLLM's do.
A body over ``MAX_BODY`` gets 413, a body that does not arrive within ``body_timeout_s``
408; a client that disconnects cancels its choices (their slots are free within one step).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling import SamplingParams
from .metrics import CONTENT_TYPE_LATEST
from .protocol import (MAX_BODY, ApiError, ChatCompletionRequest, CompletionRequest, bad, check_unsupported,
                       model_not_found, parse_json, validation_error)
from .text import Detokenizer, TextStream
from .worker import QueueFull, ServeRequest, ServingWorker, WorkerDown

SERVED_BY = __package__.split(".")[0]  # the package's name, as OpenAI's owned_by and the app title
LOG = logging.getLogger("dwdp.serve")


def build_app(worker: ServingWorker, model_names: str | list[str], tokenizer=None, api_key: str | None = None,
              request_timeout_s: float = 600.0, body_timeout_s: float = 30.0) -> FastAPI:
    """``model_names``: the names the model is served under (the first is its id in
    answers to requests that name none); a request naming another model gets a 404."""
    names = [model_names] if isinstance(model_names, str) else list(model_names)
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise ValueError("the served model names must be non-empty strings")
    cfg = worker.model.config
    # A request's prompt + output must fit the decode cache's slot, not just the model.
    vocab, context = cfg.vocab_size, min(cfg.max_position_embeddings, worker.decode.max_context)
    detok = Detokenizer(tokenizer)
    eos_default = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    app = FastAPI(title=SERVED_BY, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):  # 404 / 405 in OpenAI's shape
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"no route {request.url.path}" if e.status_code == 404 else \
            f"{request.method} is not allowed on {request.url.path}" if e.status_code == 405 else str(e.detail)
        return ApiError(e.status_code, msg, kind, None, code, getattr(e, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return bad(str(e)).response()

    def authorize(request: Request) -> None:
        if api_key and not secrets.compare_digest(request.headers.get("authorization", "").encode(),
                                                  f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error",
                           None, "invalid_api_key")

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > MAX_BODY:  # h11 has checked it is an integer
            raise ApiError(413, f"body over {MAX_BODY} bytes", code="body_too_large")

        async def read() -> bytes:
            chunks, size = [], 0
            async for c in request.stream():
                size += len(c)
                if size > MAX_BODY:
                    raise ApiError(413, f"body over {MAX_BODY} bytes", code="body_too_large")
                chunks.append(c)
            return b"".join(chunks)

        try:
            body = await asyncio.wait_for(read(), body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {body_timeout_s:g} s", code="timeout",
                           headers={"Connection": "close"})
        return parse_json(body)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": SERVED_BY, "root": names[0],
                "vocab_size": vocab, "max_model_len": context, "tokenizer": tokenizer is not None}

    # -- routes ----------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        state, reason = worker.health()
        body = {"status": state} | ({"reason": reason} if reason else {})
        return JSONResponse(body, 503 if state in ("down", "draining") else 200)

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id not in names:
            raise model_not_found(model_id, names)
        return model_card(model_id)

    async def parse(request: Request, model_cls):
        """The body as ``model_cls`` (a pydantic request model), or a 400 naming the field."""
        obj = await read_json(request)
        try:
            r = model_cls.model_validate(obj)
        except ValidationError as e:
            raise validation_error(e)
        if r.model is not None and r.model not in names:
            raise model_not_found(r.model, names)
        check_unsupported(r)
        return r

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        authorize(request)
        r = await parse(request, CompletionRequest)
        return await serve(request, r, _prompts(r.prompt), chat=False, t0=t0)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        authorize(request)
        r = await parse(request, ChatCompletionRequest)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise bad("this model has no chat template (it was loaded without a tokenizer that has one): use "
                      "/v1/completions", "messages", "no_chat_template")
        if r.max_completion_tokens is not None:
            r.max_tokens = r.max_completion_tokens
        try:
            prompt = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in r.messages],
                                                   add_generation_prompt=True, tokenize=True)
        except Exception as e:  # noqa: BLE001  (a template that rejects these messages)
            raise bad(f"the chat template failed on these messages: {e}", "messages")
        if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):  # BatchEncoding in newer transformers
            prompt = prompt["input_ids"]
        return await serve(request, r, [_check_ids(list(prompt), "messages")], chat=True, t0=t0)

    # -- helpers ---------------------------------------------------------------------------
    def _check_ids(ids: list, param: str) -> list[int]:
        if not ids:
            raise bad(f"'{param}' must not be empty", param)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            wrong = next(type(t).__name__ for t in ids if isinstance(t, bool) or not isinstance(t, int))
            raise bad(f"'{param}' must be token ids (integers), not {wrong}", param)
        if min(ids) < 0 or max(ids) >= vocab:
            raise bad(f"token ids must lie in [0, {vocab}) (this model's vocabulary)", param)
        return ids

    def _one_prompt(p) -> list[int]:
        if isinstance(p, str):
            if tokenizer is None:
                raise bad("this model was loaded without a tokenizer: send the prompt as a list of token ids",
                          "prompt")
            p = tokenizer.encode(p)
        if not isinstance(p, list) or not p:
            raise bad("'prompt' must be a non-empty list of token ids (or a string when a tokenizer is loaded)",
                      "prompt")
        return _check_ids(p, "prompt")

    def _prompts(p) -> list[list[int]]:
        """A completions ``prompt``: a string or token ids, or a list of either (several prompts)."""
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return [_one_prompt(x) for x in p]
        return [_one_prompt(p)]

    def _params(r, prompt: list[int], chat: bool) -> SamplingParams:
        max_tokens = r.max_tokens if r.max_tokens is not None else (context - len(prompt) if chat else 16)
        if len(prompt) + max_tokens > context:
            raise bad(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                      f"of {context} tokens", "max_tokens", "context_length_exceeded")
        if r.top_k is not None and r.top_k > vocab:
            raise bad(f"top_k must lie in [-1, {vocab}]", "top_k")
        if r.eos_token_id is not None and r.eos_token_id >= vocab:
            raise bad(f"eos_token_id must lie in [0, {vocab})", "eos_token_id")
        if r.stream_options is not None and not r.stream:
            raise bad("stream_options is only allowed with stream: true", "stream_options")
        if r.min_tokens > max_tokens:
            raise bad(f"min_tokens ({r.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
        bias = {int(k): float(v) for k, v in (r.logit_bias or {}).items()}
        if any(t >= vocab for t in bias):
            raise bad(f"logit_bias: token ids must lie in [0, {vocab}) (this model's vocabulary)", "logit_bias")
        prompt_top = None
        if chat:
            top = (r.top_logprobs or 0) if r.logprobs else None
            if r.top_logprobs is not None and not r.logprobs:
                raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        else:
            top = r.logprobs
            prompt_top = r.logprobs if r.echo else None
        eos = None if r.ignore_eos else (r.eos_token_id if r.eos_token_id is not None else eos_default)
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if r.temperature is None else float(r.temperature),
            top_k=max(0, r.top_k or 0), top_p=1.0 if r.top_p is None else float(r.top_p),
            eos_token_id=eos, seed=r.seed, logprobs=top,
            presence_penalty=float(r.presence_penalty or 0.0), frequency_penalty=float(r.frequency_penalty or 0.0),
            repetition_penalty=1.0 if r.repetition_penalty is None else float(r.repetition_penalty),
            logit_bias=bias or None, min_tokens=r.min_tokens, prompt_logprobs=prompt_top)

    async def serve(request: Request, r, prompts: list[list[int]], chat: bool, t0: float):
        total = len(prompts) * r.n
        if total > worker.max_queue:
            raise bad(f"{len(prompts)} prompt(s) x n={r.n} = {total} choices exceed the server's limit of "
                      f"{worker.max_queue} requests in flight (dwdp serve --max-queue)", "n")
        per_prompt = [_params(r, p, chat) for p in prompts]
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def notify():  # from the serving thread
            loop.call_soon_threadsafe(wake.set)

        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        choices = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, per_prompt)):
                for j in range(r.n):
                    p = params if j == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + j)
                    sub = rid if total == 1 else f"{rid}-{i * r.n + j}"
                    req = worker.submit(ServeRequest(prompt, p, id=sub, notify=notify))
                    choices.append(_Choice(i * r.n + j, req, prompt, TextStream(detok, r.stops(), r.min_tokens)))
        except (QueueFull, WorkerDown, ValueError) as e:
            for c in choices:
                worker.cancel(c.req.id)
            if isinstance(e, QueueFull):
                raise ApiError(429, str(e), "rate_limit_error", None, "too_many_requests", {"Retry-After": "1"})
            if isinstance(e, WorkerDown):
                raise ApiError(503, str(e), "service_unavailable", None, "unavailable", {"Retry-After": "5"})
            raise bad(str(e))
        gen = _Generation(rid, choices, prompts, r, chat, detok, r.model or names[0], wake, request_timeout_s,
                          worker, t0)
        if r.stream:
            return StreamingResponse(gen.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(gen.cancel))
        return await gen.whole(request)

    return app


@dataclasses.dataclass
class _Choice:
    index: int
    req: ServeRequest
    prompt: list[int]
    text: TextStream
    tokens: list = dataclasses.field(default_factory=list)
    lps: list = dataclasses.field(default_factory=list)
    reason: str | None = None  # set once the choice has ended
    offset: int = 0  # streaming: text sent so far (completions' text_offset)


class _Generation:
    """One HTTP request's choices: their events -> OpenAI response objects (whole, or as
    SSE chunks); a log line once it ends."""

    def __init__(self, rid: str, choices: list[_Choice], prompts, r, chat: bool, detok: Detokenizer,
                 model_name: str, wake: asyncio.Event, timeout_s: float, worker: ServingWorker, t0: float):
        self.id, self.choices, self.prompts, self.r, self.chat, self.detok = rid, choices, prompts, r, chat, detok
        self.model_name, self.wake, self.timeout_s, self.worker, self.t0 = model_name, wake, timeout_s, worker, t0
        self.created = int(time.time())
        self.want_logprobs = choices[0].req.params.logprobs is not None
        self.echo = not chat and r.echo
        self.status = "cancelled"  # until it ends otherwise (the client went away)
        self.gone = False  # the client hung up: stop waiting for events

    def cancel(self) -> None:
        for c in self.choices:
            self.worker.cancel(c.req.id)

    async def events(self):
        """(choice, "tokens", [ids]) / (choice, "done", reason) / (None, "error", ApiError), as
        the serving loop sends them; ends when every choice has."""
        deadline = time.monotonic() + self.timeout_s
        while not self.gone:
            progressed = False
            for c in self.choices:
                if c.reason is not None:
                    continue
                batch = []
                while True:
                    try:
                        batch.append(c.req.events.get_nowait())
                    except queue.Empty:
                        break
                progressed |= bool(batch)
                toks = [v for k, v in batch if k == "token"]
                end = next(((k, v) for k, v in batch if k != "token"), None)
                if toks:
                    yield c, "tokens", toks
                if end is not None and end[0] != "done":
                    self.cancel()
                    yield None, "error", ApiError(500, end[1], "server_error", None, "generation_failed")
                    return
                if c.text.stopped or end is not None:
                    c.reason = "stop" if c.text.stopped else end[1]
                    yield c, "done", c.reason
            if all(c.reason is not None for c in self.choices):
                return
            if progressed:
                continue
            self.wake.clear()
            if any(not c.req.events.empty() for c in self.choices):
                continue
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self.cancel()
                yield None, "error", ApiError(504, f"no result within {self.timeout_s:g} s", "timeout", None,
                                              "timeout")
                return

    def _new_tokens(self, c: _Choice, toks: list[int]) -> tuple[str, list]:
        first = len(c.tokens)
        c.tokens += toks
        text = c.text.add(toks)
        if c.text.stopped:
            self.worker.cancel(c.req.id)  # a stop sequence: free the slot now
        lps = c.req.logprobs[first:first + len(toks)] if self.want_logprobs else []
        c.lps += lps
        return text, lps

    def _usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)  # each prompt once, whatever n
        out = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}

    def _logprobs_obj(self, toks, lps, offset0: int):
        if not self.want_logprobs:
            return None
        if self.chat:
            def entry(t, lp):
                s = self.detok.token(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [entry(t, lp) | {"top_logprobs": [entry(i, v) for i, v in top]}
                                for t, (lp, top) in zip(toks, lps)]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        off = offset0
        for t, entry in zip(toks, lps):
            s = self.detok.token(t)
            out["tokens"].append(s)
            out["text_offset"].append(off)
            off += len(s)
            if entry is None:  # the prompt's first token: nothing predicts it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            lp, top = entry
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self.detok.token(i): v for i, v in top} | {s: lp})
        return out

    def _choice(self, c: _Choice, text: str, toks, lps, reason, offset0=0, delta=False) -> dict:
        if self.chat:
            d = {"index": c.index, "finish_reason": reason, "logprobs": self._logprobs_obj(toks, lps, offset0)}
            if delta:
                d["delta"] = {"content": text} if text or toks else {}
            else:
                d["message"] = {"role": "assistant", "content": text}
            d["token_ids"] = toks
            return d
        return {"index": c.index, "text": text, "token_ids": toks, "finish_reason": reason,
                "logprobs": self._logprobs_obj(toks, lps, offset0)}

    def _echo(self, c: _Choice) -> tuple[str, list, list]:
        """The prompt's text, tokens and (with logprobs) per-token logprobs, for echo."""
        lps = (c.req.prompt_logprobs or [None] * len(c.prompt)) if self.want_logprobs else []
        return self.detok.decode(c.prompt), c.prompt, lps

    def _log(self) -> None:
        firsts = [c.req.first_token_at for c in self.choices if c.req.first_token_at is not None]
        ttft = f"{min(firsts) - self.t0:.3f} s" if firsts else "-"
        LOG.info("%s: %s, prompt %d tok, output %d tok, TTFT %s, total %.3f s", self.id, self.status,
                 self._usage()["prompt_tokens"], self._usage()["completion_tokens"], ttft,
                 time.perf_counter() - self.t0)

    def _ended(self) -> None:
        reasons = sorted({c.reason for c in self.choices if c.reason})
        self.status = "/".join(reasons) if all(c.reason for c in self.choices) else self.status

    async def whole(self, request: Request):
        # A non-streaming client that hangs up cancels the request: watch the receive channel.
        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.cancel()
            self.gone = True
            self.wake.set()

        watch = asyncio.create_task(disconnected())
        try:
            async for c, kind, val in self.events():
                if kind == "tokens":
                    self._new_tokens(c, val)
                elif kind == "error":
                    self.status = f"error {val.status}"
                    return val.response()
            self._ended()
            out = []
            for c in self.choices:
                if not c.text.stopped:
                    c.text.finish()
                text, toks, lps = c.text.text, c.tokens, c.lps
                if self.echo:
                    ptext, ptoks, plps = self._echo(c)
                    text, toks, lps = ptext + text, ptoks + toks, plps + lps
                d = self._choice(c, text, toks, lps, c.reason)
                if self.echo:
                    d["token_ids"] = c.tokens
                out.append(d)
            obj = "chat.completion" if self.chat else "text_completion"
            return JSONResponse({"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                                 "choices": out, "usage": self._usage()})
        finally:
            watch.cancel()
            self.cancel()  # no-op unless we are leaving early
            self._log()

    async def sse(self):
        obj = "chat.completion.chunk" if self.chat else "text_completion"

        def chunk(choices, usage=None):
            c = {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                 "choices": choices}
            if usage is not None:
                c["usage"] = usage
            return f"data: {json.dumps(c)}\n\n"

        def start(c: _Choice):  # a choice's first chunk: the role (chat) or the echoed prompt
            if self.chat:  # OpenAI's first chat chunk carries the role
                return chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}])
            text, toks, lps = self._echo(c)
            c.offset = len(text)
            d = self._choice(c, text, toks, lps, None)
            d["token_ids"] = []
            return chunk([d])

        # Echo waits for a choice's first event: its prompt logprobs come with the prefill.
        unechoed = {c.index for c in self.choices} if self.echo else set()
        try:
            if self.chat:
                for c in self.choices:
                    yield start(c)
            async for c, kind, val in self.events():
                if c is not None and c.index in unechoed:
                    unechoed.discard(c.index)
                    yield start(c)
                if kind == "tokens":
                    text, lps = self._new_tokens(c, val)
                    yield chunk([self._choice(c, text, val, lps, "stop" if c.text.stopped else None, c.offset,
                                              delta=True)])
                    c.offset += len(text)
                elif kind == "done":
                    if not c.text.stopped:  # a stopped choice's last chunk went out with its tokens
                        yield chunk([self._choice(c, c.text.finish(), [], [], val, c.offset, delta=True)])
                else:
                    self.status = f"error {val.status}"
                    yield f"data: {json.dumps(val.body())}\n\n"
                    break
            else:
                self._ended()
            if self.r.stream_options is not None and self.r.stream_options.include_usage:
                yield chunk([], self._usage())
            yield "data: [DONE]\n\n"
        finally:  # normal end, error, or the client went away (Starlette cancels us): free the slots
            self.cancel()
            self._log()
