"""An OpenAI-compatible chat server over a checkpoint, built on LitServe (`pip install picogpt_lightning[serve]`).

    POST /v1/chat/completions   answers, streamed as server-sent events ("stream": true) or whole
    GET  /v1/models             the one model served

Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")`. A request's messages
are rendered with the checkpoint's chat template (meta["chat_template"]; `qa` for checkpoints that have none),
and the answer ends at end-of-text, the template's stop strings, the request's `stop`, or `max_tokens`.
`temperature`, `top_p` and `seed` are honoured; without them sampling is `picogpt sample`'s default
(temperature 0.8, top_k 200). A conversation longer than the context keeps its end, as sampling does.

LitServe runs `workers` inference processes, each with its own copy of the model, serving one request at a
time: the torch model is never shared between threads, and requests beyond `workers` wait their turn. There is
no batching (one prompt per forward; a tiny model on a CPU gains little from it). The OpenAI spec LitServe ships
lacks a few things a client relies on; `OpenAIChatSpec` adds them: `seed`, `/v1/models`, HTTP 400 with one
line of JSON for a bad request (checked before it is queued, so a bad streamed request is refused before the
stream starts), and finish_reason "length" when max_tokens cut the answer.

Like generate.py, nothing here imports Lightning. The command around `serve` is `picogpt serve` (cli/serve.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .checkpoint import load_checkpoint
from .chat_template import ChatTemplate, template_from_meta, turn_stop_strings, validate_messages
from .conversation import encode_conversation
from .errors import PicoGPTError
from .generate import generate, make_generator, resolve_device
from .prompt import StreamingDecoder
from .settings import SamplingSettings, ServeSettings
from .threads import thread_choice

try:
    import litserve as ls
    from fastapi import BackgroundTasks
    from fastapi.exceptions import HTTPException, RequestValidationError
    from fastapi.responses import JSONResponse
    from litserve.specs.openai import (
        ChatCompletionChunk,
        ChatCompletionRequest,
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatCompletionStreamingChoice,
        ChatMessage,
        ChoiceDelta,
        OpenAISpec,
        UsageInfo,
    )
    from litserve.utils import LitAPIStatus
except ImportError as error:  # an optional extra: say how to get it, in one line
    raise PicoGPTError("serving needs LitServe: pip install 'picogpt_lightning[serve]'") from error

# ----------------------------------------------------------------------------------------------- requests


class ChatRequest(ChatCompletionRequest):
    """LitServe's request with `seed` added, and no sampling defaults of its own (ours apply instead)."""

    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None


@dataclass
class ChatJob:
    """What one request asks the model to do, in our terms."""

    messages: list[dict[str, str]]
    settings: SamplingSettings
    max_tokens: int
    stop: list[str]
    seed: int | None


def read_request(request: ChatRequest, default_max_tokens: int) -> ChatJob:
    """The generation a request asks for, or a PicoGPTError saying what is wrong with it (an HTTP 400)."""
    if request.n not in (None, 1):
        raise PicoGPTError(f"n must be 1 (one answer per request), got {request.n}")
    if request.tools:
        raise PicoGPTError("tools are not supported by this model")
    messages = validate_messages([{"role": m.role, "content": m.content} for m in request.messages],
                                 for_generation=True)
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise PicoGPTError(f"max_tokens must be at least 1, got {max_tokens}")
    defaults = SamplingSettings()
    temperature = defaults.temperature if request.temperature is None else request.temperature
    settings = SamplingSettings(temperature=temperature, top_k=defaults.top_k, top_p=request.top_p)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return ChatJob(messages, settings, max_tokens, stop, request.seed)


def bad_request(message: str) -> JSONResponse:
    """OpenAI's error body, which clients show as the error's message; one line of JSON."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return JSONResponse(status_code=400, content={"error": error})


async def invalid_request_body(request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 (a list of field errors) as one 400 line: "temperature: Input should be a valid number"."""
    problems = []
    for problem in error.errors():
        if problem.get("type") == "json_invalid":
            reason = problem.get("ctx", {}).get("error", "")
            return bad_request(f"the request body is not valid JSON ({reason})" if reason else
                               "the request body is not valid JSON")
        where = ".".join(str(part) for part in problem.get("loc", ())[1:])  # without the leading "body"
        problems.append(f"{where}: {problem.get('msg')}" if where else str(problem.get("msg")))
    return bad_request("invalid request: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------- answers


def reply_pieces(model, tokenizer, template: ChatTemplate, job: ChatJob) -> Iterator[dict]:
    """The answer as OpenAI message pieces, then an empty one with the finish reason and the token counts."""
    prompt_ids = encode_conversation(job.messages, template, tokenizer, add_generation_prompt=True).ids
    decoder = StreamingDecoder(tokenizer, turn_stop_strings(template, tokenizer.eot_id is not None) + job.stop)
    generator = make_generator(job.seed, model.wte.weight.device)
    completion_tokens = 0

    def text() -> Iterator[str]:
        nonlocal completion_tokens
        for token_id in generate(model, prompt_ids, job.max_tokens, job.settings, generator):
            completion_tokens += 1
            yield decoder.push(token_id)
            if decoder.stopped:
                return
        yield decoder.flush()

    for piece in template.answer_pieces(text()):
        if piece:
            yield {"role": "assistant", "content": piece}
    yield {
        "role": "assistant",
        "content": "",
        "finish_reason": "stop" if decoder.stopped else "length",
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": completion_tokens,
        "total_tokens": len(prompt_ids) + completion_tokens,
    }


class ChatAPI(ls.LitAPI):
    """One inference worker: loads the checkpoint in its own process and answers one request at a time."""

    def __init__(self, ckpt: str, device: str, threads: int, default_max_tokens: int, model_name: str):
        super().__init__(spec=OpenAIChatSpec(model_name, default_max_tokens))
        self.ckpt = ckpt
        self.device_name = device
        self.threads = threads
        self.default_max_tokens = default_max_tokens

    def setup(self, device: str) -> None:
        # LitServe numbers devices from 0 ("cuda:0"); the model goes where the user asked (e.g. cuda:1).
        torch.set_num_threads(self.threads)
        loaded = load_checkpoint(self.ckpt, self.device_name)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.template = template_from_meta(loaded.meta)

    def predict(self, request: ChatRequest) -> Iterator[dict]:
        job = read_request(request, self.default_max_tokens)  # checked before queueing: cannot fail here
        yield from reply_pieces(self.model, self.tokenizer, self.template, job)


# ----------------------------------------------------------------------------------------------- the spec


class OpenAIChatSpec(OpenAISpec):
    """LitServe's OpenAI spec plus `seed`, `/v1/models`, 400s for bad requests and finish_reason "length"."""

    def __init__(self, model_name: str, default_max_tokens: int):
        super().__init__()
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens

    def pre_setup(self, lit_api: ls.LitAPI) -> None:
        super().pre_setup(lit_api)
        self.add_endpoint("/v1/models", self.list_models, ["GET"])

    async def list_models(self) -> dict:
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "picogpt"}
        return {"object": "list", "data": [model]}

    async def chat_completion(self, request: ChatRequest, background_tasks: BackgroundTasks):
        try:
            read_request(request, self.default_max_tokens)
        except PicoGPTError as error:
            return bad_request(str(error))
        return await super().chat_completion(request, background_tasks)

    async def _messages(self, pipe):
        """The worker's message pieces as dicts; a worker error as an HTTPException."""
        async for response, status in pipe:
            if status == LitAPIStatus.ERROR:
                raise response if isinstance(response, HTTPException) else HTTPException(
                    500, "generation failed; the server's log says why")
            yield json.loads(response)

    async def streaming_completion(self, request: ChatRequest, pipe_responses: list):
        (pipe,) = pipe_responses  # n == 1, checked in chat_completion
        chunk_fields = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()),
                        "model": request.model or self.model_name}
        try:
            async for message in self._messages(pipe):
                finish = message.get("finish_reason")
                delta = ChoiceDelta(role="assistant", content=None if finish else message["content"])
                choice = ChatCompletionStreamingChoice(index=0, delta=delta, finish_reason=finish)
                usage = UsageInfo(**message) if finish else None
                chunk = ChatCompletionChunk(**chunk_fields, choices=[choice], usage=usage)
                yield f"data: {chunk.model_dump_json(by_alias=True)}\n\n"
            yield "data: [DONE]\n\n"
        except HTTPException as error:  # the status line is sent already: say it in the stream
            yield "data: " + json.dumps({"error": {"message": error.detail, "type": "server_error"}}) + "\n\n"

    async def non_streaming_completion(self, request: ChatRequest, generator_list: list):
        (pipe,) = generator_list
        pieces, finish, usage = [], "stop", UsageInfo()
        async for message in self._messages(pipe):
            pieces.append(message["content"])
            if message.get("finish_reason"):
                finish, usage = message["finish_reason"], UsageInfo(**message)
        answer = ChatMessage(role="assistant", content="".join(pieces))
        choice = ChatCompletionResponseChoice(index=0, message=answer, finish_reason=finish)
        return ChatCompletionResponse(model=request.model or self.model_name, choices=[choice], usage=usage)


# ----------------------------------------------------------------------------------------------- the server


def _stop_like_ctrl_c(serving_pid: int):
    """A SIGTERM handler: `kill` shuts the server down like Ctrl-C, so LitServe stops its workers instead of
    leaving them behind. The HTTP process LitServe forks inherits it, and just exits when LitServe stops it."""

    def handler(signum, frame) -> None:
        if os.getpid() == serving_pid:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    return handler


def serve(ckpt: str, device: str = "auto", settings: ServeSettings | None = None) -> None:
    """Serve a checkpoint (or a safetensors export folder) until interrupted; see `picogpt serve --help`.

    The checkpoint is loaded once here first, so that a file that cannot be served fails before any worker
    starts, in one line.
    """
    settings = settings or ServeSettings()
    target = resolve_device(device)
    template = template_from_meta(load_checkpoint(ckpt).meta)
    threads = settings.threads or max(1, thread_choice().threads // settings.workers)
    api = ChatAPI(str(ckpt), str(target), threads, settings.max_tokens, settings.model_name)
    # No request timeout: a request waits for a free worker however long the answers before it take. Streamed
    # pieces go from worker to HTTP process over ZeroMQ (fast_queue): LitServe's default manager queue costs
    # milliseconds per piece, more than a tiny model's step (one client, 16 tokens: 1-3 requests/s against 15).
    server = ls.LitServer(api, accelerator=target.type, devices=1, workers_per_device=settings.workers,
                          timeout=False, fast_queue=True)
    server.app.add_exception_handler(RequestValidationError, invalid_request_body)
    print(f"serving {ckpt} as {settings.model_name!r} at http://{settings.bind_address}:{settings.port}/v1 "
          f"({settings.workers} worker(s) on {target}, {threads} thread(s) each; chat template {template.name})",
          flush=True)
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c(os.getpid()))
    server.run(host=settings.bind_address, port=settings.port, num_api_servers=1, log_level=settings.log_level,
               generate_client_file=False)
