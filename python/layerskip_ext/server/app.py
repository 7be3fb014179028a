"""The OpenAI-compatible HTTP API (FastAPI): routes, request -> GenerationArgs, responses, SSE, errors.

    app = create_app(layerskip_ext.load(path), model_name="demo", max_batch=8)
    uvicorn.run(app, port=8000)

Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (both with "stream": true as server-sent events). Every error is an OpenAI-shaped
body {"error": {"message", "type", "param", "code"}}: 400 for a bad request (schema errors included),
404 for an unknown model or route, 429 when the waiting queue is full, 500 for an engine failure.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import get_chat_template
from ..api import _apply_settings
from ..generation import MAX_SPECULATIONS, check_generation_args
from ..stopping import check_stop
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from .scheduler import QueueFull, Scheduler


@dataclass(frozen=True)
class ServerDefaults:
    """Settings a request may override: the LayerSkip strategy of requests that do not name one."""
    strategy: str = "autoregressive"
    exit_layer: int | None = None  # None: a quarter of the layers for early_exit / self_speculative
    num_speculations: int | None = None


def create_app(model, model_name: str | None = None, max_batch: int = 8, max_queue: int = 64,
               defaults: ServerDefaults = ServerDefaults(), chat_template: str | None = None, core=None) -> FastAPI:
    """The FastAPI app serving `model` (a LayerSkipModel); its scheduler thread runs while the app is up."""
    name = model_name or default_model_name(model)
    scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue, core=core)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="layerskip_ext", lifespan=lifespan)
    app.state.scheduler = scheduler

    # ---- errors: always the OpenAI shape

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        # the field's path, without "body" and the union-member tags pydantic adds ("str", "list[int]", ...)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body" and not _is_type_tag(x))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', message)})"
            where = ""  # the location is a character offset, not a field
        elif where:
            message = f"{where}: {message}"
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error" if e.status_code < 500 else
                                       "server_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    # ---- plain routes

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            raise APIError(503, "the scheduler thread is not running", "server_error")
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "layerskip_ext", "max_model_len": context_length(model)}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(scheduler))

    # ---- generation

    def generation_args(req, prompt_ids: list[int], max_tokens: int | None):
        if req.model != name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        bad = req.unsupported()
        if bad:
            raise APIError(400, f"unsupported field(s): {', '.join(bad)}", param=bad[0])
        ctx = context_length(model)
        if max_tokens is None:
            max_tokens = max(ctx - len(prompt_ids), 0)
        if len(prompt_ids) + max_tokens > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens; the request has "
                                f"{len(prompt_ids)} prompt tokens and max_tokens {max_tokens}", param="max_tokens")
        # checked whatever the strategy, as generate() checks them (an autoregressive request ignores them)
        L = model.num_layers
        if req.exit_layer is not None and not 1 <= req.exit_layer <= L:
            raise APIError(400, f"exit_layer must be in [1, {L}] on this model, got {req.exit_layer}",
                           param="exit_layer")
        if req.num_speculations is not None and not 1 <= req.num_speculations <= MAX_SPECULATIONS:
            raise APIError(400, f"num_speculations must be in [1, {MAX_SPECULATIONS}], got {req.num_speculations}",
                           param="num_speculations")
        strategy = req.strategy or defaults.strategy
        # request fields, then the server's defaults, then (self-speculative) the settings stored with the model
        # (layerskip-ext tune), then a quarter of the layers
        row = dict(strategy=strategy,
                   exit_layer=req.exit_layer if req.exit_layer is not None else defaults.exit_layer,
                   num_speculations=(req.num_speculations if req.num_speculations is not None
                                     else defaults.num_speculations),
                   draft_threshold=req.draft_threshold, adaptive=req.adaptive, draft_vocab_size=None)
        try:
            stop = check_stop(req.stop)
            if stop and model.tokenizer is None:
                raise APIError(400, "stop strings need a tokenizer; this model has none", param="stop")
            if strategy == "self_speculative":
                _apply_settings(model, row)
            if strategy != "autoregressive" and row["exit_layer"] is None:
                row["exit_layer"] = max(1, model.num_layers // 4)
            spec = strategy == "self_speculative"
            args = check_generation_args(
                model.config, model.tokenizer, prompt_ids, max_new_tokens=max_tokens, strategy=strategy,
                exit_layer=None if strategy == "autoregressive" else row["exit_layer"],
                num_speculations=row["num_speculations"] if spec else None,
                temperature=1.0 if req.temperature is None else req.temperature, top_k=req.top_k or 0,
                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                stop_token_ids=[] if req.ignore_eos else None,
                context_length=ctx, draft_threshold=(row.get("draft_threshold") or 0.0) if spec else 0.0,
                adaptive=bool(row.get("adaptive")) if spec else False,
                draft_vocab=row.get("draft_vocab") if spec else None)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return args, stop

    def submit(args, stop):
        try:
            return scheduler.submit(args, stop)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", "rate_limit_error",
                           code="rate_limit_exceeded") from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if prompt == "":
                raise APIError(400, "prompt is empty", param="prompt")
            if model.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            try:
                prompt_ids = model.encode(prompt)
            except ValueError as e:  # a lone surrogate
                raise APIError(400, f"prompt: {e}", param="prompt") from None
        else:
            prompt_ids = list(prompt)
        args, stop = generation_args(req, prompt_ids, req.max_tokens)
        row = submit(args, stop)
        return await respond(req, request, row, "cmpl", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if model.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            text = get_chat_template(model, chat_template).render(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt_ids = model.tokenizer.encode(text, add_special_tokens=False).ids
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        args, stop = generation_args(req, prompt_ids, max_tokens)
        row = submit(args, stop)
        return await respond(req, request, row, "chatcmpl", chat=True)

    async def respond(req, request: Request, row, prefix: str, chat: bool):
        rid = f"{prefix}-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse_events(row, rid, name, chat, include_usage), media_type="text/event-stream")
        try:
            result = await wait_or_cancel(row, request)
        except Exception as e:  # the engine failed on this request: a 500 for it, the server goes on
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error") from None
        if result is None:  # the client is gone: nobody reads an answer
            return JSONResponse(error_body("the client disconnected", code="client_closed"), status_code=499)
        choice = {"index": 0, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice.update(text=result.text, logprobs=None)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": name, "choices": [choice], "usage": usage(row.args, result),
                "layerskip": layerskip_fields(result)}

    return app


async def wait_or_cancel(row, request: Request):
    """The row's RowResult, or None (and the row cancelled) when the client disconnects first."""
    task = asyncio.ensure_future(row.result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                row.cancel()
                await task
                return None
    finally:
        if not task.done():  # the handler itself was cancelled
            row.cancel()
            task.cancel()


async def sse_events(row, rid: str, name: str, chat: bool, include_usage: bool):
    """Server-sent events for a streaming request; leaving early (a disconnect) cancels the row."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, **extra):
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": name,
                                      "choices": choices, **extra}) + "\n\n"

    def text_choice(text, finish_reason=None):
        if chat:
            return {"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    finished = False
    try:
        if chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for event, value in row:
            if event == "text":  # with the texts that arrived meanwhile: one chunk, not one per step
                yield chunk([text_choice(value + row.take_text())])
            elif event == "done":
                finished = True
                yield chunk([text_choice(None, value.finish_reason)], layerskip=layerskip_fields(value))
                if include_usage:
                    yield chunk([], usage=usage(row.args, value))
        yield "data: [DONE]\n\n"
    except Exception as e:  # an engine failure mid-stream: say so in the stream, then end it
        yield "data: " + json.dumps(error_body(f"generation failed: {type(e).__name__}: {e}", "server_error")) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            row.cancel()


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict") or "[" in part)


def usage(args, result) -> dict:
    n = len(result.tokens)
    return {"prompt_tokens": len(args.prompt_ids), "completion_tokens": n, "total_tokens": len(args.prompt_ids) + n}


def layerskip_fields(result) -> dict:
    """The LayerSkip settings and acceptance statistics of one request."""
    s = result.stats
    return {"strategy": s.strategy, "exit_layer": s.exit_layer, "num_speculations": s.num_speculations,
            "drafted": s.drafted, "accepted": s.accepted, "acceptance_rate": s.acceptance_rate, "rounds": s.rounds,
            "queue_time_s": result.queue_time_s, "time_to_first_token_s": result.first_token_time_s}


def context_length(model) -> int:
    return model.config.max_position_embeddings


def default_model_name(model) -> str:
    import os
    if model.path is None:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(model.path)).removesuffix(".gguf")


def metrics_text(scheduler: Scheduler) -> str:
    """Prometheus exposition text: queue depth, active rows, tokens/s, acceptance, request counts."""
    m = scheduler.metrics
    acceptance = m.accepted_total / m.drafted_total if m.drafted_total else 0.0
    rows = [
        ("queue_depth", "gauge", "requests waiting for a row", scheduler.queue_depth),
        ("active_rows", "gauge", "rows in the running batch", scheduler.active_rows),
        ("max_batch", "gauge", "rows the batch can hold", scheduler.max_batch),
        ("tokens_per_second", "gauge", "generated tokens per second over the last 10 s", m.tokens_per_second()),
        ("acceptance_rate", "gauge", "accepted / drafted tokens since start (self-speculative rows)", acceptance),
        ("requests_total", "counter", "requests accepted into the queue", m.requests_total),
        ("requests_rejected_total", "counter", "requests refused with 429 (queue full)", m.requests_rejected),
        ("prompt_tokens_total", "counter", "prompt tokens prefilled", m.prompt_tokens_total),
        ("generation_tokens_total", "counter", "tokens generated", m.generation_tokens_total),
        ("drafted_tokens_total", "counter", "draft tokens proposed", m.drafted_total),
        ("accepted_tokens_total", "counter", "draft tokens accepted", m.accepted_total),
        ("engine_steps_total", "counter", "engine steps", m.steps_total),
        ("engine_busy_seconds_total", "counter", "seconds spent in engine steps", m.busy_time_s),
    ]
    lines = []
    for key, kind, help_text, value in rows:
        lines += [f"# HELP layerskip_{key} {help_text}", f"# TYPE layerskip_{key} {kind}", f"layerskip_{key} {value}"]
    lines += ["# HELP layerskip_requests_finished_total finished requests by finish reason",
              "# TYPE layerskip_requests_finished_total counter"]
    lines += [f'layerskip_requests_finished_total{{reason="{r}"}} {n}' for r, n in
              sorted(m.requests_finished.items())]
    return "\n".join(lines) + "\n"
