"""The HTTP layer: OpenAI's chat and completions endpoints over the scheduler (FastAPI on uvicorn).

A handler validates the body (schema.py), turns the prompt into token ids (the build's tokenizer and
chat template), submits a scheduler `Request` and streams its events back, as server-sent events or
as one JSON response. It never touches the engine's steps or the cache. Errors are OpenAI's error
object with the field at fault in `param`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from l4compile.runtime.sampling import Sampling
from l4compile.serve.errors import ApiError
from l4compile.serve.prompts import Prompts
from l4compile.serve.schema import ChatRequest, CompletionRequest, describe
from l4compile.serve.scheduler import Failed, Finished, Piece, QueueFull, Request, Scheduler, ShuttingDown

DEFAULT_MAX_TOKENS = 256
KEEPALIVE_SECONDS = 1.0   # an idle stream sends an SSE comment this often (and notices a client that left)


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    max_body_bytes: int = 8 << 20
    request_timeout: float | None = 600.0
    retry_after: int = 1


def create_app(scheduler: Scheduler, settings: ServeSettings) -> FastAPI:
    """The ASGI app; its lifespan stops the scheduler at shutdown (requests still in it get a clean 503)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="l4compile serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    generation = Generation(scheduler, settings)

    @app.get("/health")
    async def health():
        if not scheduler.accepting:   # draining after SIGTERM: a load balancer should look elsewhere
            return JSONResponse({"status": "shutting down", "model": settings.model_name}, status_code=503)
        return {"status": "ok", "model": settings.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "l4compile", "max_model_len": scheduler.context}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(scheduler.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await generation.handle(http, "chat")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await generation.handle(http, "completion")

    return app


class Generation:
    """Both generation endpoints: body -> prompt ids and settings -> scheduler -> SSE or JSON."""

    def __init__(self, scheduler: Scheduler, settings: ServeSettings) -> None:
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.settings = settings
        self.metrics = scheduler.metrics
        self.prompts = Prompts(self.engine)
        text = self.engine.text_settings
        self.defaults = text.get("sampling") or {}
        self.stop_tokens = frozenset(self.engine.default_stop_tokens)
        self.default_max_tokens = text.get("max_new_tokens") or DEFAULT_MAX_TOKENS

    async def handle(self, http: HTTPRequest, kind: str) -> Response:
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        try:
            body = await self._read_body(http)
            params = _parse(body, ChatRequest if kind == "chat" else CompletionRequest)
            ids, features = await run_in_threadpool(self.prompts.of, params)
            request_settings = self._settings(params, len(ids))
        except ApiError as exc:
            self.metrics.request(endpoint, exc.status)
            return exc.response()
        except Exception as exc:   # a fault of ours (or of the vision model) on this request only
            self.metrics.request(endpoint, 500)
            return ApiError(500, f"the prompt could not be prepared: {type(exc).__name__}: {exc}",
                            kind="internal_error").response()
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        request = Request(ids=ids, sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                          timeout=self.settings.request_timeout, image_features=features, **request_settings)
        try:
            self.scheduler.submit(request)
        except QueueFull:
            self.metrics.request(endpoint, 429)
            return ApiError(429, f"the server is busy: {self.scheduler.max_queue} requests are queued already; "
                                 "retry later", kind="rate_limit_error",
                            headers={"Retry-After": str(self.settings.retry_after)}).response()
        except ShuttingDown:
            self.metrics.request(endpoint, 503)
            return ApiError(503, "the server is shutting down", kind="unavailable").response()
        reply = Reply(kind, self.settings.model_name, len(ids))
        if params.stream:
            self.metrics.request(endpoint, 200)
            usage = bool(params.stream_options and params.stream_options.include_usage)
            return StreamingResponse(self._stream(request, events, reply, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        response = await self._collect(http, request, events, reply)
        self.metrics.request(endpoint, response.status_code)
        return response

    # ---- the request ---------------------------------------------------------------
    async def _read_body(self, http: HTTPRequest) -> bytes:
        limit = self.settings.max_body_bytes
        declared = http.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit}")
        body = bytearray()
        async for chunk in http.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body is over {limit} bytes, the most this server takes")
        return bytes(body)

    def _settings(self, params, prompt_tokens: int) -> dict[str, Any]:
        context = self.scheduler.context
        what = "messages" if isinstance(params, ChatRequest) else "prompt"
        if prompt_tokens >= context:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this server's context is {context} tokens "
                                "(prompt and completion together)", what)
        room = context - prompt_tokens
        wanted = getattr(params, "max_completion_tokens", None) or params.max_tokens
        field = "max_completion_tokens" if getattr(params, "max_completion_tokens", None) else "max_tokens"
        if wanted is not None and wanted > room:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens and {field} is {wanted}: together they exceed "
                                f"this server's context of {context} tokens", field)
        d = self.defaults
        temperature = d.get("temperature", 0.0) if params.temperature is None else params.temperature
        top_p = d.get("top_p", 1.0) if params.top_p is None else params.top_p
        return {"max_tokens": wanted if wanted is not None else min(self.default_max_tokens, room),
                "sampling": Sampling(temperature, d.get("top_k", 0), top_p), "seed": params.seed,
                "stop_tokens": self.stop_tokens, "stop_strings": params.stop_strings()}

    # ---- the reply -------------------------------------------------------------------
    async def _stream(self, request: Request, events: asyncio.Queue, reply: "Reply",
                      usage: bool) -> AsyncIterator[str]:
        try:
            if reply.kind == "chat":
                yield _sse(reply.chunk({"role": "assistant", "content": ""}))
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if isinstance(event, Piece):
                    yield _sse(reply.chunk(event.text))
                elif isinstance(event, Finished):
                    yield _sse(reply.chunk(None, event.reason))
                    if usage:
                        yield _sse(reply.usage_chunk(event))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield _sse({"error": {"message": event.message, "type": event.kind, "param": None,
                                          "code": event.status}})
                    yield "data: [DONE]\n\n"
                    return
        finally:
            request.cancel()   # the client left (or the stream ended): free the row at the next step

    async def _collect(self, http: HTTPRequest, request: Request, events: asyncio.Queue, reply: "Reply") -> Response:
        pieces: list[str] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return Response(status_code=499)
                    continue
                if isinstance(event, Piece):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    return JSONResponse(reply.whole("".join(pieces), event))
                else:
                    return ApiError(event.status, event.message, kind=event.kind).response()
        finally:
            request.cancel()


class Reply:
    """The JSON shapes of one request's answer (chat.completion[.chunk] or text_completion)."""

    def __init__(self, kind: str, model: str, prompt_tokens: int) -> None:
        self.kind, self.model, self.prompt_tokens = kind, model, prompt_tokens
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def chunk(self, content: str | dict | None, finish_reason: str | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage(self, done: Finished) -> dict[str, int]:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens}

    def usage_chunk(self, done: Finished) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion"),
                "choices": [], "usage": self.usage(done)}

    def whole(self, text: str, done: Finished) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(done)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(done)}


def _parse(body: bytes, model: type[BaseModel]) -> BaseModel:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        param, message = describe(exc)
        raise ApiError(400, message, param or None) from None


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
