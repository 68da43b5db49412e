"""OpenAI's request schemas and error shape, as pydantic models.

Every field is checked (types, ranges, finite floats, 64-bit seeds) before anything
reaches the serving loop; a field we do not implement is refused with a 400 naming it,
never silently ignored. What is accepted follows OpenAI's API as vLLM serves it,
vLLM's extensions included (top_k, repetition_penalty, min_tokens, ignore_eos).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_BODY = 16 << 20
MAX_STOP = 4  # stop sequences per request (OpenAI's limit)
MAX_LOGPROBS = 20
MAX_N = 128  # choices per request (each one a sequence of its own)


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


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def unsupported(message: str, param: str) -> ApiError:
    return bad(message, param, "unsupported_parameter")


def model_not_found(name: str, served: list[str]) -> ApiError:
    return ApiError(404, f"the model {name!r} does not exist; this server serves {', '.join(map(repr, served))}",
                    "invalid_request_error", "model", "model_not_found")


class _Strict(BaseModel):
    # strict: no "1" -> 1 or true -> 1 coercions; ints are still accepted where floats are.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: accepted, usage comes at the end


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
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None
    eos_token_id: int | None = Field(None, ge=0)  # extension: stop at this token id
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)  # vLLM's extension
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(0, ge=0)  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension
    metadata: dict[str, str] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for k, b in (v or {}).items():
            if not k.isdigit():
                raise ValueError(f"keys must be token ids, got {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"the bias of token {k} must lie in [-100, 100]")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_SamplingFields):
    prompt: Any  # str, [ids], [str] or [[ids]]: checked by hand for clear messages
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


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


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None


def check_unsupported(r) -> None:
    """Fields we accept only in the values we implement: anything else gets a 400 that
    names the field and what would work."""
    if isinstance(r, CompletionRequest):
        if r.best_of is not None and r.best_of != r.n:
            raise unsupported(f"best_of must equal n ({r.n}): ranking candidates is not supported", "best_of")
        if r.suffix:
            raise unsupported("suffix (insertion) is not supported; leave it empty", "suffix")
        return
    if r.response_format is not None and r.response_format.type != "text":
        raise unsupported(f"response_format {r.response_format.type!r}: constrained decoding is not supported; "
                          "use {\"type\": \"text\"}", "response_format")
    if r.tools and r.tool_choice != "none":
        raise unsupported("tools: tool calling is not supported (tools are only accepted with tool_choice "
                          "\"none\")", "tools")
    if r.tool_choice is not None and r.tool_choice != "none":
        raise unsupported("tool_choice: tool calling is not supported; only \"none\" is accepted", "tool_choice")


def validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    tags = {"str", "int", "float", "bool", "list", "dict", "none"}  # union-member tags pydantic adds
    loc = [str(x) for x in err["loc"] if str(x) not in tags and "[" not in str(x) and "-" not in str(x)]
    param = ".".join(loc) or None
    if err["type"] == "extra_forbidden":
        return unsupported(f"unsupported field: {param}", param)
    return bad(f"{param}: {err['msg']}" if param else err["msg"], param)


def parse_json(body: bytes) -> dict:
    try:
        obj = json.loads(body)  # NaN / Infinity parse; the models refuse them with the field's name
    except RecursionError:
        raise bad("malformed JSON: nested too deeply", code="invalid_json")
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"malformed JSON: {e}", code="invalid_json")
    if not isinstance(obj, dict):
        raise bad("the body must be a JSON object", code="invalid_json")
    return obj
