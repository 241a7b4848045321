"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus
/health and /metrics (Prometheus). Streaming responses are server-sent events in OpenAI's chunk
format, ending with `data: [DONE]`. A client that goes away cancels its sequences."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from llama_jax.chat import ChatError, encode_dialog
from llama_jax.generate import row_seeds
from llama_jax.serving.engine import Delta, Engine, Failure, Finish, Output
from llama_jax.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    error_response,
    validation_message,
)
from llama_jax.serving.scheduler import QueueFull, Sequence

DISCONNECT_POLL_S = 0.5


@dataclass
class Job:
    """The sequences of one request and the queue their events arrive on, as (choice, event)."""

    seqs: list[Sequence]
    events: asyncio.Queue
    prompt_tokens: int


def create_app(engine: Engine, tokenizer, served_model_name: str, api_key: str | None = None) -> FastAPI:
    ctx = engine.model.cfg.max_seq_len

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="llama-jax", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "internal_server_error")

    async def authorized(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key", "invalid_request_error", code="invalid_api_key")

    def check_model(req: Sampling) -> None:
        if req.model is not None and req.model != served_model_name:
            raise APIError(404, f"the model {req.model!r} does not exist", param="model", code="model_not_found")

    def start(req: Sampling, prompts: list[list[int]], max_tokens: int, logprobs: int | None) -> Job:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop_ids = list(req.stop_token_ids or []) + ([] if req.ignore_eos else list(tokenizer.stop_ids))
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        seqs = []
        for p, prompt in enumerate(prompts):
            for j, row_seed in enumerate(row_seeds([prompt] * req.n, seed)):
                choice = p * req.n + j
                emit = lambda event, choice=choice: loop.call_soon_threadsafe(events.put_nowait, (choice, event))
                out = Output(tokenizer, emit, max_tokens, req.stop_strings(), stop_ids, logprobs)
                seqs.append(
                    Sequence(prompt, max_tokens, req.temperature, req.top_p, max(req.top_k, 0), int(row_seed), out)
                )
        try:
            engine.submit(seqs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", "rate_limit_exceeded", code="queue_full") from None
        except RuntimeError as e:
            raise APIError(503, str(e), "service_unavailable") from None
        return Job(seqs, events, sum(map(len, prompts)))

    def check_fits(prompts: list[list[int]], max_tokens: int) -> None:
        for prompt in prompts:
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            if len(prompt) + max_tokens > ctx:
                raise APIError(
                    400,
                    f"this model's context is {ctx} tokens; the request has {len(prompt)} prompt tokens and "
                    f"max_tokens {max_tokens}",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            if not engine.fits(len(prompt), max_tokens):
                raise APIError(400, "the request needs more KV cache pages than the server has", param="max_tokens")

    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return tokenizer.encode(prompt, bos=True)
        bad = [t for t in prompt if t >= tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary ({tokenizer.vocab_size})", param="prompt")
        return list(prompt)

    async def results(job: Job, request: Request) -> tuple[list[list[Delta]], list[Finish]]:
        """Wait for every choice to finish (cancelling them if the client goes away)."""
        deltas: list[list[Delta]] = [[] for _ in job.seqs]
        finishes: list[Finish | None] = [None] * len(job.seqs)
        try:
            while any(f is None for f in finishes):
                try:
                    choice, event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if isinstance(event, Failure):
                    raise APIError(500, event.message, "internal_server_error")
                if isinstance(event, Delta):
                    deltas[choice].append(event)
                else:
                    finishes[choice] = event
        finally:
            engine.cancel(job.seqs)
        return deltas, finishes

    async def sse(job: Job, chunk, usage_chunk) -> AsyncIterator[str]:
        """Server-sent events of a job: `chunk(choice, delta or None, finish or None)` makes each."""
        done = 0
        try:
            while done < len(job.seqs):
                choice, event = await job.events.get()
                if isinstance(event, Failure):
                    error = {"message": event.message, "type": "internal_server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                if isinstance(event, Finish):
                    done += 1
                    yield f"data: {json.dumps(chunk(choice, None, event))}\n\n"
                elif event.text or event.logprobs:
                    yield f"data: {json.dumps(chunk(choice, event, None))}\n\n"
            else:
                if usage_chunk is not None:
                    yield f"data: {json.dumps(usage_chunk())}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # finished, or the client went away (the stream is cancelled)
            engine.cancel(job.seqs)

    def usage(job: Job, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens,
        }

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    # -- completions -----------------------------------------------------------------------
    def completion_logprobs(deltas: list[Delta], offset: int) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for d in deltas:
            for token, lp, alternatives in d.logprobs:
                offsets.append(offset)
                tokens.append(token_text(token))
                token_logprobs.append(lp)
                top.append({token_text(t): a for t, a in alternatives})
            offset += len(d.text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request):
        check_model(req)
        prompts = [encode(p) for p in req.prompts()]
        check_fits(prompts, req.max_tokens)
        job = start(req, prompts, req.max_tokens, req.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": served_model_name}
        if req.stream:
            offsets = [0] * len(job.seqs)
            completion_tokens = [0]

            def chunk(choice: int, delta: Delta | None, finish: Finish | None) -> dict:
                text = delta.text if delta else ""
                lp = completion_logprobs([delta], offsets[choice]) if delta and req.logprobs is not None else None
                offsets[choice] += len(text)
                if finish:
                    completion_tokens[0] += finish.completion_tokens
                body = {"index": choice, "text": text, "logprobs": lp, "finish_reason": finish and finish.reason}
                return head | {"choices": [body]}

            usage_chunk = None
            if req.stream_options and req.stream_options.include_usage:
                usage_chunk = lambda: head | {"choices": [], "usage": usage(job, completion_tokens[0])}  # noqa: E731
            return StreamingResponse(sse(job, chunk, usage_chunk), media_type="text/event-stream")
        deltas, finishes = await results(job, request)
        choices = [
            {
                "index": i,
                "text": "".join(d.text for d in deltas[i]),
                "logprobs": completion_logprobs(deltas[i], 0) if req.logprobs is not None else None,
                "finish_reason": finishes[i].reason,
            }
            for i in range(len(job.seqs))
        ]
        return head | {"choices": choices, "usage": usage(job, sum(f.completion_tokens for f in finishes))}

    # -- chat ------------------------------------------------------------------------------
    def chat_logprobs(deltas: list[Delta]) -> dict:
        def entry(token: int, lp: float) -> dict:
            text = token_text(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        content = [
            entry(token, lp) | {"top_logprobs": [entry(t, a) for t, a in alternatives]}
            for d in deltas
            for token, lp, alternatives in d.logprobs
        ]
        return {"content": content}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req)
        try:
            prompt = encode_dialog(tokenizer, [m.model_dump() for m in req.messages])
        except ChatError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens or max(ctx - len(prompt), 1)
        check_fits([prompt], max_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else None
        job = start(req, [prompt], max_tokens, top)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": served_model_name}
        if req.stream:
            started = [False] * len(job.seqs)
            completion_tokens = [0]

            def chunk(choice: int, delta: Delta | None, finish: Finish | None) -> dict:
                body: dict = {"role": "assistant"} if not started[choice] else {}
                started[choice] = True
                if delta:
                    body["content"] = delta.text
                if finish:
                    completion_tokens[0] += finish.completion_tokens
                lp = chat_logprobs([delta]) if delta and req.logprobs else None
                piece = {"index": choice, "delta": body, "logprobs": lp, "finish_reason": finish and finish.reason}
                return head | {"object": "chat.completion.chunk", "choices": [piece]}

            usage_chunk = None
            if req.stream_options and req.stream_options.include_usage:
                usage_chunk = lambda: head | {  # noqa: E731
                    "object": "chat.completion.chunk", "choices": [], "usage": usage(job, completion_tokens[0])
                }  # fmt: skip
            return StreamingResponse(sse(job, chunk, usage_chunk), media_type="text/event-stream")
        deltas, finishes = await results(job, request)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(d.text for d in deltas[i])},
                "logprobs": chat_logprobs(deltas[i]) if req.logprobs else None,
                "finish_reason": finishes[i].reason,
            }
            for i in range(len(job.seqs))
        ]
        completion_tokens = sum(f.completion_tokens for f in finishes)
        return head | {"object": "chat.completion", "choices": choices, "usage": usage(job, completion_tokens)}

    # -- the rest --------------------------------------------------------------------------
    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        card = {"id": served_model_name, "object": "model", "created": 0, "owned_by": "llama-jax", "max_model_len": ctx}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok"} | engine.stats())

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
