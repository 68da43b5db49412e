"""HTTP front end on FastAPI + uvicorn: OpenAI-compatible ``/v1/completions`` and
``/v1/chat/completions`` (streaming and not), ``/v1/models``, ``/health`` and Prometheus
``/metrics``. Binds to 127.0.0.1 unless told otherwise; an optional API key is required
as ``Authorization: Bearer <key>`` (``/health`` stays open for probes).

Robustness, in the order a request meets it: uvicorn's h11 parser refuses malformed
requests (bad ``Content-Length``, TLS bytes, ...) with a 400; a connection must deliver
its headers within ``header_timeout_s`` and its body within ``body_timeout_s``; bodies
over ``MAX_BODY`` get 413; JSON nested too deeply gets 400, not a ``RecursionError``;
pydantic models mirroring OpenAI's schemas check every field (types, ranges, finite
floats, 64-bit seeds) and the token ids against the vocabulary before anything reaches
the serving loop. A client that disconnects cancels its request (its slot is free within
one step).
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import signal
import socket
import threading
import time
import uuid
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..sampling import SamplingParams

SERVED_BY = __package__.split(".")[0]  # the package's name, as OpenAI's owned_by and the app title
from .metrics import CONTENT_TYPE_LATEST
from .worker import QueueFull, ServeRequest, ServingWorker, WorkerDown

MAX_BODY = 16 << 20
MAX_STOP = 4  # stop sequences per request (OpenAI's limit)
MAX_LOGPROBS = 20


def load_tokenizer(model_dir: str):
    """The checkpoint's Hugging Face tokenizer, or None (then prompts must be token ids)."""
    import os
    import sys

    if not (os.path.isdir(model_dir) and any(os.path.exists(os.path.join(model_dir, f))
                                             for f in ("tokenizer.json", "tokenizer_config.json"))):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # token ids still work
        print(f"warning: could not load the tokenizer in {model_dir} ({e}); prompts must be token ids",
              file=sys.stderr)
        return None


# -- errors ------------------------------------------------------------------------------

class ApiError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


BadRequest = ApiError  # the old name


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


# -- request models (OpenAI's completions / chat-completions schemas) --------------------

class _Strict(BaseModel):
    # strict: no "1" -> 1 or true -> 1 coercions; ints are still accepted where floats are.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0: off
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    eos_token_id: int | None = Field(None, ge=0)  # extension: stop at this token id

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_SamplingFields):
    prompt: Any  # str, [ids], [str] or [[ids]] with one prompt: checked by hand for clear messages
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    tags = {"str", "int", "float", "bool", "list", "dict", "none"}  # union-member tags pydantic adds
    loc = [str(x) for x in err["loc"] if str(x) not in tags and "[" not in str(x) and "-" not in str(x)]
    param = ".".join(loc) or None
    if err["type"] == "extra_forbidden":
        return _bad(f"unsupported field: {param}", param, "unsupported_parameter")
    msg = err["msg"]
    if param == "n":
        msg = "only n = 1 is supported"
    return _bad(f"{param}: {msg}" if param else msg, param)


def parse_json(body: bytes) -> dict:
    try:
        obj = json.loads(body)  # NaN / Infinity parse; the models refuse them with the field's name
    except RecursionError:
        raise _bad("malformed JSON: nested too deeply", code="invalid_json")
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"malformed JSON: {e}", code="invalid_json")
    if not isinstance(obj, dict):
        raise _bad("the body must be a JSON object", code="invalid_json")
    return obj


# -- detokenization --------------------------------------------------------------------

class Detokenizer:
    """Token ids -> text. Without a tokenizer each token is spelled ``<id>``, so ``text``,
    ``stop`` and logprob tokens still mean something."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def decode(self, ids: list[int]) -> str:
        if self.tok is None:
            return "".join(f"<{t}>" for t in ids)
        return self.tok.decode(ids, skip_special_tokens=True)

    def token(self, t: int) -> str:
        if self.tok is None:
            return f"<{t}>"
        return self.tok.decode([t])


class TextStream:
    """Incremental text of a growing token list, with stop sequences: ``add`` returns the
    text that is safe to send (held back while it could be the start of a stop string, or
    ends in an incomplete UTF-8 character) and whether a stop sequence was reached (the
    text then ends before it, as OpenAI does)."""

    def __init__(self, detok: Detokenizer, stops: list[str]):
        self.detok, self.stops = detok, stops
        self.ids: list[int] = []
        self.prefix = 0  # vLLM-style window: decode ids[prefix:] and subtract ids[prefix:read]
        self.read = 0
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, tokens: list[int]) -> str:
        self.ids += tokens
        if self.detok.tok is None:
            self.text += self.detok.decode(tokens)
        else:
            before = self.detok.decode(self.ids[self.prefix:self.read])
            after = self.detok.decode(self.ids[self.prefix:])
            if after.endswith("\ufffd"):  # an incomplete character: wait for the next token
                return self._emit(final=False)
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._emit(final=False)

    def finish(self) -> str:
        if self.detok.tok is not None and self.read < len(self.ids):
            self.text += self.detok.decode(self.ids[self.prefix:])[len(self.detok.decode(self.ids[self.prefix:self.read])):]
            self.read = len(self.ids)
        return self._emit(final=True)

    def _partial_stop(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        for n in range(min(len(self.text), max(map(len, self.stops)) - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stops):
                return n
        return 0

    def _emit(self, final: bool) -> str:
        if self.stops and not self.stopped:
            start = max(0, self.sent - max(map(len, self.stops)))
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text)
        if self.stops and not (final or self.stopped):
            end = max(self.sent, end - self._partial_stop())
        out, self.sent = self.text[self.sent:end], end
        return out


# -- the app -------------------------------------------------------------------------------

def build_app(worker: ServingWorker, model_name: str, tokenizer=None, api_key: str | None = None,
              request_timeout_s: float = 600.0, body_timeout_s: float = 30.0) -> FastAPI:
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
        return _bad(str(e)).response()

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
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": SERVED_BY, "vocab_size": vocab,
            "max_model_len": context, "tokenizer": tokenizer is not None}]}

    async def parse(request: Request, model_cls):
        """The body as ``model_cls`` (a pydantic request model), or a 400 naming the field."""
        obj = await read_json(request)
        try:
            return model_cls.model_validate(obj)
        except ValidationError as e:
            raise _validation_error(e)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        r = await parse(request, CompletionRequest)
        prompt = _prompt_ids(r.prompt)
        if r.echo and r.logprobs is not None:
            raise _bad("echo with logprobs (prompt logprobs) is not supported", "echo", "unsupported_parameter")
        return await _serve(request, r, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        r = await parse(request, ChatCompletionRequest)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise _bad("this model has no chat template (it was loaded without a tokenizer that has one): use "
                       "/v1/completions", "messages", "no_chat_template")
        if r.max_completion_tokens is not None:
            r.max_tokens = r.max_completion_tokens
        try:
            prompt = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in r.messages],
                                                   add_generation_prompt=True, tokenize=True)
        except Exception as e:  # noqa: BLE001  (a template that rejects these messages)
            raise _bad(f"the chat template failed on these messages: {e}", "messages")
        if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):  # BatchEncoding in newer transformers
            prompt = prompt["input_ids"]
        return await _serve(request, r, _check_ids(list(prompt), "messages"), chat=True)

    # -- helpers ---------------------------------------------------------------------------
    def _check_ids(ids: list, param: str) -> list[int]:
        if not ids:
            raise _bad(f"'{param}' must not be empty", param)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise _bad(f"'{param}' must be token ids (integers), not {next(type(t).__name__ for t in ids if isinstance(t, bool) or not isinstance(t, int))}", param)
        if min(ids) < 0 or max(ids) >= vocab:
            raise _bad(f"token ids must lie in [0, {vocab}) (this model's vocabulary)", param)
        return ids

    def _prompt_ids(p) -> list[int]:
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one prompt
        elif isinstance(p, list) and p and isinstance(p[0], (str, list)):
            raise _bad("send one prompt per request", "prompt")
        if isinstance(p, str):
            if tokenizer is None:
                raise _bad("this model was loaded without a tokenizer: send the prompt as a list of token ids",
                           "prompt")
            p = tokenizer.encode(p)
        if not isinstance(p, list) or not p:
            raise _bad("'prompt' must be a non-empty list of token ids (or a string when a tokenizer is loaded)",
                       "prompt")
        return _check_ids(p, "prompt")

    def _params(r, prompt: list[int], chat: bool) -> SamplingParams:
        max_tokens = r.max_tokens if r.max_tokens is not None else (context - len(prompt) if chat else 16)
        if len(prompt) + max_tokens > context:
            raise _bad(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                       f"of {context} tokens", "max_tokens", "context_length_exceeded")
        if r.top_k is not None and r.top_k > vocab:
            raise _bad(f"top_k must lie in [-1, {vocab}]", "top_k")
        if r.eos_token_id is not None and r.eos_token_id >= vocab:
            raise _bad(f"eos_token_id must lie in [0, {vocab})", "eos_token_id")
        if r.stream_options is not None and not r.stream:
            raise _bad("stream_options is only allowed with stream: true", "stream_options")
        if chat:
            top = (r.top_logprobs or 0) if r.logprobs else None
            if r.top_logprobs is not None and not r.logprobs:
                raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        else:
            top = r.logprobs
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if r.temperature is None else float(r.temperature),
            top_k=max(0, r.top_k or 0), top_p=1.0 if r.top_p is None else float(r.top_p),
            eos_token_id=r.eos_token_id if r.eos_token_id is not None else eos_default, seed=r.seed, logprobs=top)

    async def _serve(request: Request, r, prompt: list[int], chat: bool):
        params = _params(r, prompt, chat)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def notify():  # from the serving thread
            loop.call_soon_threadsafe(wake.set)

        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            req = worker.submit(ServeRequest(prompt, params, id=rid, notify=notify))
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", None, "too_many_requests", {"Retry-After": "1"})
        except WorkerDown as e:
            raise ApiError(503, str(e), "service_unavailable", None, "unavailable", {"Retry-After": "5"})
        except ValueError as e:
            raise _bad(str(e))
        gen = _Generation(req, prompt, r, chat, detok, model_name, wake, request_timeout_s, worker)
        if r.stream:
            return StreamingResponse(gen.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(worker.cancel, req.id))
        return await gen.whole(request)

    return app


class _Generation:
    """One request's events -> OpenAI response objects (whole, or as SSE chunks)."""

    def __init__(self, req: ServeRequest, prompt, r, chat: bool, detok: Detokenizer, model_name: str,
                 wake: asyncio.Event, timeout_s: float, worker: ServingWorker):
        self.req, self.prompt, self.r, self.chat, self.detok = req, prompt, r, chat, detok
        self.model_name, self.wake, self.timeout_s, self.worker = model_name, wake, timeout_s, worker
        self.created = int(time.time())
        self.text = TextStream(detok, r.stops())
        self.tokens: list[int] = []
        self.want_logprobs = req.params.logprobs is not None

    async def events(self):
        """("tokens", [ids]) / ("done", reason) / ("error", ApiError), as the loop sends them."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            batch = []
            while True:
                try:
                    batch.append(self.req.events.get_nowait())
                except queue.Empty:
                    break
            toks = [v for k, v in batch if k == "token"]
            end = next(((k, v) for k, v in batch if k != "token"), None)
            if toks:
                yield "tokens", toks
            if end is not None:
                if end[0] == "done":
                    yield "done", end[1]
                else:
                    yield "error", ApiError(500, end[1], "server_error", None, "generation_failed")
                return
            if self.text.stopped:
                return
            if batch:
                continue
            self.wake.clear()
            if not self.req.events.empty():
                continue
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self.worker.cancel(self.req.id)
                yield "error", ApiError(504, f"no result within {self.timeout_s:g} s", "timeout", None, "timeout")
                return

    def _new_tokens(self, toks: list[int]) -> tuple[list[int], str, list]:
        first = len(self.tokens)
        self.tokens += toks
        text = self.text.add(toks)
        if self.text.stopped:
            self.worker.cancel(self.req.id)  # a stop sequence: free the slot now
        lps = self.req.logprobs[first:first + len(toks)] if self.want_logprobs else []
        return toks, text, lps

    def _usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt) + len(self.tokens)}

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
        for t, (lp, top) in zip(toks, lps):
            s = self.detok.token(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self.detok.token(i): v for i, v in top} | {s: lp})
            out["text_offset"].append(off)
            off += len(s)
        return out

    def _choice(self, text: str, toks, lps, reason, offset0=0, delta=False) -> dict:
        if self.chat:
            c = {"index": 0, "finish_reason": reason, "logprobs": self._logprobs_obj(toks, lps, offset0)}
            if delta:
                c["delta"] = {"content": text} if text or toks else {}
            else:
                c["message"] = {"role": "assistant", "content": text}
            c["token_ids"] = toks
            return c
        return {"index": 0, "text": text, "token_ids": toks, "finish_reason": reason,
                "logprobs": self._logprobs_obj(toks, lps, offset0)}

    def _reason(self, reason: str) -> str:
        return "stop" if self.text.stopped else reason

    async def whole(self, request: Request):
        # A non-streaming client that hangs up cancels the request: watch the receive channel.
        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.worker.cancel(self.req.id)

        watch = asyncio.create_task(disconnected())
        try:
            lps, reason = [], None
            async for kind, val in self.events():
                if kind == "tokens":
                    lps += self._new_tokens(val)[2]
                elif kind == "done":
                    reason = val
                else:
                    return val.response()
            if not self.text.stopped:
                self.text.finish()
            text = self.text.text
            if self.r.__class__ is CompletionRequest and self.r.echo:
                text = self.detok.decode(self.prompt) + text
            obj = "chat.completion" if self.chat else "text_completion"
            return JSONResponse({"id": self.req.id, "object": obj, "created": self.created, "model": self.model_name,
                                 "choices": [self._choice(text, self.tokens, lps, self._reason(reason))],
                                 "usage": self._usage()})
        finally:
            watch.cancel()
            self.worker.cancel(self.req.id)  # no-op unless we are leaving early

    async def sse(self):
        obj = "chat.completion.chunk" if self.chat else "text_completion"

        def chunk(choices, usage=None):
            c = {"id": self.req.id, "object": obj, "created": self.created, "model": self.model_name,
                 "choices": choices}
            if usage is not None:
                c["usage"] = usage
            return f"data: {json.dumps(c)}\n\n"

        try:
            offset = 0
            if self.chat:  # OpenAI's first chat chunk carries the role
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            elif self.r.echo:
                prompt_text = self.detok.decode(self.prompt)
                offset = len(prompt_text)
                yield chunk([self._choice(prompt_text, [], [], None)])
            async for kind, val in self.events():
                if kind == "tokens":
                    toks, text, lps = self._new_tokens(val)
                    if self.text.stopped:
                        yield chunk([self._choice(text, toks, lps, "stop", offset, delta=True)])
                        break
                    yield chunk([self._choice(text, toks, lps, None, offset, delta=True)])
                    offset += len(text)
                elif kind == "done":
                    yield chunk([self._choice(self.text.finish(), [], [], self._reason(val), offset, delta=True)])
                else:
                    yield f"data: {json.dumps(val.body())}\n\n"
                    break
            if self.r.stream_options is not None and self.r.stream_options.include_usage:
                yield chunk([], self._usage())
            yield "data: [DONE]\n\n"
        finally:  # normal end, error, or the client went away (Starlette cancels us): free the slot
            self.worker.cancel(self.req.id)


# -- the server ------------------------------------------------------------------------------

def _protocol(header_timeout_s: float):
    """uvicorn's h11 protocol plus a deadline for a request's headers: a client that
    trickles them (or sends nothing) is cut off instead of holding the connection."""

    class TimedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self):
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # still no complete request head
                self.transport.close()

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol


class Server:
    """The app on uvicorn in a background thread. ``port=0`` picks a free port (``.port``)."""

    def __init__(self, worker: ServingWorker, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 tokenizer=None, api_key: str | None = None, *, drain_timeout_s: float = 30.0,
                 header_timeout_s: float = 10.0, body_timeout_s: float = 30.0, request_timeout_s: float = 600.0,
                 backlog: int = 2048, max_connections: int = 4096):
        self.worker = worker
        self.drain_timeout_s = drain_timeout_s
        self.app = build_app(worker, model_name, tokenizer, api_key, request_timeout_s, body_timeout_s)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # now, so a busy port fails here and .port is known
        self.config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", backlog=backlog,
            timeout_keep_alive=5, http=_protocol(header_timeout_s), limit_concurrency=max_connections,
            timeout_graceful_shutdown=5)
        self.uv = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def start(self, timeout_s: float = 30.0) -> None:
        self.worker.start()
        self._thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, name="dwdp-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)

    def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Refuse new requests (503), let running ones finish for up to the drain timeout
        (then they end with an error event / 500 saying so), then close the listener."""
        self.worker.stop(self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s)
        self.uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.sock.close()

    def serve_until_signal(self) -> None:
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        # Never an unbounded wait: Python runs signal handlers on the main thread only, and a
        # signal that lands on another thread (CUDA, torch and HTTP threads are most of them)
        # does not interrupt a lock wait here; SIGTERM was then lost until the next signal.
        # A sleep, not done.wait(timeout): the handler's done.set() could otherwise run while
        # this thread holds the event's lock inside wait(), and block on it for good.
        while not done.is_set():
            time.sleep(0.2)
        self.shutdown()
