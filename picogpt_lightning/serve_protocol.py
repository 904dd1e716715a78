"""OpenAI's chat-completions protocol as `picogpt serve` speaks it: reading a request, and the error body.

Every request is read completely here before any work starts: JSON, types, text that is valid Unicode, the
model's name, the messages, the length asked for, sampling settings and the seed. What is wrong becomes a
`RequestError` carrying the HTTP status and OpenAI's error fields, which the server sends as one line of JSON:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Parameters OpenAI defines that this server cannot honour (logprobs, response_format, presence_penalty, ...) are
refused by name unless they hold their neutral value (false, 0, null), so a client never silently gets less
than it asked for. Plain Python and pydantic (which FastAPI brings): no torch, no HTTP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from .chat_template import validate_messages
from .errors import PicoGPTError
from .settings import SamplingSettings, check_seed

# What each kind of error is called in OpenAI's bodies.
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               503: "server_error"}
NEUTRAL_VALUES = (None, False, 0, "", [], {}, "none", {"type": "text"})


class RequestError(PicoGPTError):
    """A request the server refuses: its HTTP status and OpenAI's `param` and `code`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Part(BaseModel):
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: str
    content: str | list[_Part] | None
    name: str | None = None


class ChatRequest(BaseModel):
    """The fields this server reads; others are checked by `_refuse_unsupported`."""

    model_config = ConfigDict(strict=True, extra="allow")
    messages: list[_Message]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # an end-user id, for the client's own records


@dataclass
class ChatJob:
    """What one request asks the model to do, in our terms."""

    messages: list[dict[str, str]]
    settings: SamplingSettings
    max_tokens: int
    stop: list[str]
    seed: int | None
    stream: bool = False
    model: str = "picogpt"


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of this server (ServeSettings with the model's context filled in)."""

    model_name: str
    default_max_tokens: int
    max_tokens_limit: int
    max_messages: int


def read_request(body: bytes, limits: RequestLimits) -> ChatJob:
    """The generation a request body asks for, or a RequestError saying what is wrong with it."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise RequestError(f"the request body is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    _check_text(data, "")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as error:
        problems = ["{}: {}".format(".".join(str(part) for part in problem["loc"]) or "body", problem["msg"])
                    for problem in error.errors()[:3]]
        raise RequestError("invalid request: " + "; ".join(problems)) from None
    _refuse_unsupported(request.model_extra or {})
    return _job(request, limits)


def _check_text(value: object, where: str) -> None:
    """Strings that cannot become UTF-8 (a lone surrogate such as "\\ud800" in the JSON) are refused, by place."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"{where or 'the body'} holds text that is not valid Unicode (a lone surrogate); "
                               f"send UTF-8 text", param=where or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_text(item, f"{where}[{index}]")


def _refuse_unsupported(extra: dict) -> None:
    asked = sorted(name for name, value in extra.items() if not any(value == v and type(value) is type(v)
                                                                     for v in NEUTRAL_VALUES))
    if asked:
        raise RequestError(f"unsupported parameter(s): {', '.join(asked)}; this server supports model, messages, "
                           f"max_tokens, temperature, top_p, stop, seed, stream, n=1", param=asked[0])


def _content(message: _Message) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.type != "text" for part in message.content):
        raise RequestError("only text content parts are supported", param="messages")
    return "".join(part.text or "" for part in message.content)


def _job(request: ChatRequest, limits: RequestLimits) -> ChatJob:
    if request.model not in (None, limits.model_name):
        raise RequestError(f"The model `{request.model}` does not exist; this server has {limits.model_name!r}",
                           status=404, param="model", code="model_not_found")
    if request.n not in (None, 1):
        raise RequestError(f"n must be 1 (one answer per request), got {request.n}", param="n")
    if len(request.messages) > limits.max_messages:
        raise RequestError(f"{len(request.messages)} messages are more than this server takes "
                           f"({limits.max_messages}, --max_messages)", param="messages")
    try:
        messages = validate_messages([{"role": m.role, "content": _content(m)} for m in request.messages],
                                     for_generation=True)
    except RequestError:
        raise
    except PicoGPTError as error:
        raise RequestError(str(error), param="messages") from None
    asked = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    max_tokens = limits.default_max_tokens if asked is None else asked
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if max_tokens > limits.max_tokens_limit:
        raise RequestError(f"max_tokens is too large: {max_tokens}; this server answers at most "
                           f"{limits.max_tokens_limit} tokens (--max_tokens_limit)", param="max_tokens")
    defaults = SamplingSettings()
    try:
        temperature = defaults.temperature if request.temperature is None else request.temperature
        settings = SamplingSettings(temperature=temperature, top_k=defaults.top_k, top_p=request.top_p)
        check_seed(request.seed)
    except PicoGPTError as error:
        raise RequestError(str(error)) from None
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4:
        raise RequestError(f"stop holds {len(stop)} strings; at most 4", param="stop")
    return ChatJob(messages, settings, max_tokens, stop, request.seed, request.stream,
                   request.model or limits.model_name)
