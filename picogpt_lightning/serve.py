"""An OpenAI-compatible chat server over a checkpoint, with a chat page (`pip install picogpt_lightning[serve]`).

    GET  /                      a chat page for the browser (static/chat.html), streaming through the API
    POST /v1/chat/completions   answers, streamed as server-sent events ("stream": true) or whole
    GET  /v1/models             the one model served
    GET  /health                "ok" once the model is loaded (never needs the key)

Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY or "none")`. A request's
messages are rendered with the checkpoint's chat template (meta["chat_template"]; `qa` for checkpoints that have
none), and the answer ends at end-of-text, the template's stop strings, the request's `stop`, or `max_tokens`.
Requests are read completely before any work (serve_protocol.py): a bad one is a 400 with OpenAI's error body.

Concurrent requests are generated together (batching.py's Scheduler, one thread owning the model): each joins
the running batch at the next step and leaves it when it ends; up to `max_batch_size` run at once and up to
`max_queue` wait, beyond which a request gets 503 at once. A client that goes away cancels its generation at the
next step. The server binds 127.0.0.1 unless told otherwise; with `api_key`, every endpoint but /health and the
static page needs `Authorization: Bearer KEY`. FastAPI's /docs and /openapi.json are off.

Like generate.py, nothing here imports Lightning. The command around `serve` is `picogpt serve` (cli/serve.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources

import torch

from .batching import Finish, GenerationRequest, QueueFull, Scheduler
from .chat_template import AnswerLead, ChatTemplate, template_from_meta, turn_stop_strings
from .checkpoint import load_checkpoint
from .conversation import encode_conversation
from .errors import PicoGPTError
from .generate import make_generator, resolve_device
from .serve_protocol import ChatJob, RequestError, RequestLimits, read_request
from .settings import ServeSettings
from .threads import thread_choice

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as error:  # an optional extra: say how to get it, in one line
    raise PicoGPTError("serving needs FastAPI and uvicorn: pip install 'picogpt_lightning[serve]'") from error

OPEN_PATHS = ("/", "/health")  # the page holds no data: it asks for the key itself


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class Inbox:
    """Hands pieces from the generating thread to the event loop, waking the loop once per batch of them (a
    step emits a piece for every request in the batch) rather than once per piece."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, object]] = []

    def put(self, pieces: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((pieces, item))
            if len(self.items) > 1:
                return  # a wake-up is on its way
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for pieces, item in items:
            pieces.put_nowait(item)


class ChatService:
    """The model, its template and the scheduler: turns a ChatJob into a stream of answer pieces."""

    def __init__(self, model: torch.nn.Module, tokenizer, template: ChatTemplate, scheduler: Scheduler,
                 limits: RequestLimits):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.scheduler, self.limits = scheduler, limits
        self.stop = turn_stop_strings(template, tokenizer.eot_id is not None)
        self.inbox: Inbox | None = None  # made in the server's event loop, on the first request

    def start(self, job: ChatJob) -> tuple[GenerationRequest, asyncio.Queue, int]:
        """Queue the job's generation; its pieces, then a Finish, arrive on the returned queue."""
        prompt_ids = encode_conversation(job.messages, self.template, self.tokenizer, add_generation_prompt=True).ids
        self.inbox = self.inbox or Inbox(asyncio.get_running_loop())
        inbox, pieces = self.inbox, asyncio.Queue()
        generation = GenerationRequest(prompt_ids, job.max_tokens, job.settings,
                                       make_generator(job.seed, self.model.wte.weight.device), self.stop + job.stop,
                                       emit=lambda item: inbox.put(pieces, item))
        try:
            self.scheduler.submit(generation)
        except QueueFull:
            raise RequestError("the server is busy: every place in its queue is taken; try again shortly",
                               status=503, code="overloaded") from None
        return generation, pieces, len(prompt_ids)

    async def answer(self, pieces: asyncio.Queue) -> AsyncIterator[str | Finish]:
        """The answer's text pieces without the template's lead, then how it finished."""
        lead = AnswerLead(self.template.answer_lead)
        while True:
            item = await pieces.get()
            if isinstance(item, Finish):
                yield item
                return
            text = lead.strip(item)
            if text:
                yield text


async def _cancel_on_disconnect(request: Request, generation: GenerationRequest) -> None:
    """Wait for the client to go away, then cancel its generation (the scheduler drops it at the next step)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancelled = True


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is {int(declared):,} bytes, more than this server takes "
                           f"({limit:,}, --max_request_bytes)", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"the request body is more than this server takes ({limit:,} bytes, "
                               f"--max_request_bytes)", status=413)
    return bytes(body)


def _usage(prompt_tokens: int, finish: Finish) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": prompt_tokens + finish.completion_tokens}


class KeyCheck:
    """ASGI middleware: a request without `Authorization: Bearer KEY` gets 401 before any route sees it (plain
    ASGI rather than FastAPI's @middleware, which would pass every streamed chunk through another queue)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        message = "Incorrect API key provided" if given else "No API key provided: send Authorization: Bearer KEY"
        await error_response(RequestError(message, status=401, code="invalid_api_key"))(scope, receive, send)


def build_app(service: ChatService, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="picogpt", docs_url=None, redoc_url=None, openapi_url=None)
    if settings.api_key is not None:
        app.add_middleware(KeyCheck, key=settings.api_key)
    page = resources.files(__package__).joinpath("static", "chat.html").read_text("utf-8")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(RequestError(f"{request.method} {request.url.path}: {error.detail}",
                                           status=error.status_code))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        print(f"error: {request.method} {request.url.path} failed: {error!r}", file=sys.stderr, flush=True)
        return error_response(RequestError("the server failed; its log says why", status=500))

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "picogpt"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> Response:
        if name != settings.model_name:
            return error_response(RequestError(f"The model `{name}` does not exist", status=404, param="model",
                                               code="model_not_found"))
        return JSONResponse(model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            job = read_request(await _read_body(request, settings.max_request_bytes), service.limits)
            generation, pieces, prompt_tokens = service.start(job)
        except RequestError as error:
            return error_response(error)
        fields = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": job.model}
        if job.stream:
            return StreamingResponse(_stream(service, request, generation, pieces, prompt_tokens, fields),
                                     media_type="text/event-stream")
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            text, finish = [], None
            async for item in service.answer(pieces):
                if isinstance(item, Finish):
                    finish = item
                else:
                    text.append(item)
        finally:
            watcher.cancel()
        if finish.reason in ("error", "cancelled"):
            return error_response(RequestError("generation failed or the server is stopping", status=500))
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                  "finish_reason": finish.reason}
        return JSONResponse({**fields, "object": "chat.completion", "choices": [choice],
                             "usage": _usage(prompt_tokens, finish)})

    return app


async def _stream(service: ChatService, request: Request, generation: GenerationRequest, pieces: asyncio.Queue,
                  prompt_tokens: int, fields: dict) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, a last chunk with the finish reason and usage, [DONE]."""

    def chunk(delta: dict, finish: Finish | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish.reason if finish else None}
        body = {**fields, "object": "chat.completion.chunk", "choices": [choice]}
        if finish:
            body["usage"] = _usage(prompt_tokens, finish)
        return f"data: {json.dumps(body)}\n\n"

    watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
    try:
        async for item in service.answer(pieces):
            if not isinstance(item, Finish):
                yield chunk({"role": "assistant", "content": item})
            elif item.reason in ("error", "cancelled"):  # the status line is sent already: say it in the stream
                error = RequestError("generation failed or the server is stopping", status=500)
                yield f"data: {json.dumps(error.body())}\n\n"
            else:
                yield chunk({"role": "assistant", "content": None}, item)
        yield "data: [DONE]\n\n"
    finally:
        generation.cancelled = True  # a no-op once it ended; a client gone mid-stream stops it
        watcher.cancel()


# ----------------------------------------------------------------------------------------------- the server


class _Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM or Ctrl-C also ends the generations in flight at once."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler

    def handle_exit(self, sig, frame) -> None:
        self.scheduler.stopping.set()
        super().handle_exit(sig, frame)


def serve(ckpt: str, device: str = "auto", settings: ServeSettings | None = None) -> None:
    """Serve a checkpoint (or a safetensors export folder) until interrupted; see `picogpt serve --help`.

    The checkpoint is loaded and every setting checked before the server starts, so that a file that cannot
    be served fails in one line.
    """
    settings = settings or ServeSettings()
    target = resolve_device(device)
    torch.set_num_threads(settings.threads or thread_choice().threads)
    loaded = load_checkpoint(ckpt, target)
    model, template = loaded.model.eval(), template_from_meta(loaded.meta)
    block_size = model.config.block_size
    limits = RequestLimits(settings.model_name, settings.max_tokens,
                           settings.max_tokens_limit or max(block_size, settings.max_tokens), settings.max_messages)
    scheduler = Scheduler(model, loaded.tokenizer, settings.max_batch_size, settings.max_queue)
    app = build_app(ChatService(model, loaded.tokenizer, template, scheduler, limits), settings)
    url = f"http://{settings.bind_address}:{settings.port}"
    print(f"serving {ckpt} as {settings.model_name!r} at {url}/v1 and a chat page at {url}/ (batches of up to "
          f"{settings.max_batch_size}, {settings.max_queue} waiting, max_tokens up to {limits.max_tokens_limit}; "
          f"{target}, {torch.get_num_threads()} thread(s); chat template {template.name}; "
          f"{'API key required' if settings.api_key else 'no API key'})", flush=True)
    if settings.workers != 1:
        print(f"note: --workers {settings.workers} is no longer used: requests share one model in batches of up "
              f"to --max_batch_size", file=sys.stderr, flush=True)
    if settings.bind_address != "127.0.0.1" and not settings.api_key:
        print(f"warning: listening on every interface without an API key: anyone who can reach this machine on "
              f"port {settings.port} can use it; set --api_key or PICOGPT_API_KEY", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=settings.bind_address, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=2, access_log=settings.log_level == "debug")
    scheduler.start()
    try:
        _Server(config, scheduler).run()
    finally:
        scheduler.stop()
