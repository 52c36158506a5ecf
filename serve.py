"""An OpenAI-compatible HTTP server: completions and chat completions, streamed or not, with continuous batching
and prefix caching, and a chat page at /.

    python serve.py --compile
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

The main thread owns the model (uvicorn runs in another). Requests join the running batch between decode steps,
up to --max_batch_size rows, and leave when done; the rest wait in a queue. Every prompt's beginning found in the
prefix cache is restored instead of prefilled again. Sampling is per request (temperature, top_k, top_p, seed), so
a greedy request gets the tokens it would get alone, whatever runs beside it (with --compile, bitwise where bf16
takes brisk's CPU kernel, else logits within rounding of alone: a near tie can go the other way). A chat request's
response_format or required tool call holds its own rows to a grammar, and its tool calls are parsed out of its
replies (structured.py).
"""
import argparse
import asyncio
import contextlib
import json
import math
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import engine
import structured
from checkpoint import DEFAULT_CHECKPOINT, check_checkpoint, load_config
from batch import Batch
from cli import DTYPES, ArgumentParser, BriskError, check_at_least_one, parse_device, run_cli
from model import Transformer
from prefix_cache import PrefixCache, model_meta
from tokenizer import load_tokenizer

CHAT_PAGE = Path(__file__).resolve().parent / "chat.html"
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts times n, per request
MAX_STOPS = 4
MAX_BODY = 16 * 2**20  # bytes of a request's body
DEFAULT_BUDGET_MB = 2048  # the prefix cache's
# OpenAI parameters this server does not implement: refused when given a value that asks for them, not ignored
# (tools, tool_choice and response_format are chat requests' fields: a completion's are refused)
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "best_of", "logit_bias", "presence_penalty",
               "frequency_penalty", "tools", "tool_choice", "functions", "response_format")

# ---------------------------------------------------------------------------------------------------------------
# The engine: rows of a batch that requests join and leave


class PrefixBatch(Batch):
    """batch.Batch whose rows start from the prefix cache: the longest cached beginning of a prompt is copied into
    its row and only the rest is prefilled; each prompt is then cached in turn.

        row = batch.add(ids, prefix=cache)   # batch.cached[row]: the prompt tokens restored
    """

    def __init__(self, model: Transformer, max_rows: int, max_seq_length: int, compile: bool = False):
        super().__init__(model, max_rows, max_seq_length, compile)
        self.cached: dict[int, int] = {}  # row -> prompt tokens restored from the prefix cache

    @torch.no_grad()
    def add(self, ids: list[int], prefix: Optional[PrefixCache] = None) -> int:
        row, start = self.free_row(), 0
        if prefix is not None and 0 < len(ids) <= self.max_seq_length:
            start = prefix.restore(ids, len(ids) - 1, row)  # the last token is prefilled: it gives the logits
        super().add(ids, start, row)
        if prefix is not None:
            prefix.store(ids, row)
        self.cached[row] = start
        return row

    def remove(self, row: int) -> None:
        super().remove(row)
        del self.cached[row]


# ---------------------------------------------------------------------------------------------------------------
# The loop that owns the model


class ServeError(Exception):
    """An error answered to the client: HTTP status, message, OpenAI error type and code."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = "invalid_request_error" if status < 500 else "server_error"

    def response(self) -> JSONResponse:
        body = dict(message=self.message, type=self.type, param=self.param, code=self.code)
        return JSONResponse(dict(error=body), status_code=self.status)


@dataclass
class Seq:
    """One choice of one request: its prompt, sampling, and what it has generated."""
    ids: list[int]
    index: int  # the choice's index in the response
    max_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    stops: list[str]
    ignore_eos: bool
    generator: torch.Generator
    emit: Callable[[tuple], None]  # from the loop's thread: ("text", index, s), ("done", index, reason, n, cached)
    enqueued: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens restored from the prefix cache
    cancelled: bool = False
    stream: Optional[engine.TextStream] = None
    constraint: Optional[structured.Constraint] = None  # a grammar its tokens must follow (response_format, tools)


class Scheduler:
    """Admits queued sequences into free rows between decode steps, samples each row's next token, streams the text
    out and frees a row when its sequence ends (eos, a stop string, max_tokens) or its client has gone."""

    def __init__(self, batch, tokenizer, max_rows: int, prefix: Optional[PrefixCache], queue_timeout: float):
        self.batch, self.tokenizer, self.max_rows, self.prefix = batch, tokenizer, max_rows, prefix
        self.queue_timeout = queue_timeout
        self.pending: deque[Seq] = deque()
        self.active: dict[int, Seq] = {}  # row -> sequence
        self.wake = threading.Condition()
        self.accepting, self.running = True, True
        self.cancelled = 0  # rows freed because their client went away

    def submit(self, seqs: list[Seq]) -> None:
        with self.wake:
            if not self.accepting:
                raise ServeError(503, "the server is shutting down", "shutting_down")
            self.pending.extend(seqs)
            self.wake.notify()

    def stop_accepting(self) -> None:
        """Refuse new requests and fail the queued ones; the running rows finish."""
        with self.wake:
            self.accepting = False
            while self.pending:
                self.pending.popleft().emit(("error", ServeError(503, "the server is shutting down", "shutting_down")))

    def stop(self) -> None:
        """Cancel the running rows and end the loop (run returns)."""
        self.stop_accepting()
        with self.wake:
            self.running = False
            self.wake.notify()

    def stats(self) -> dict:
        cache = None if self.prefix is None else dict(entries=len(self.prefix.entries), bytes=self.prefix.nbytes,
                                                      budget_bytes=self.prefix.budget)
        return dict(rows=self.max_rows, rows_busy=len(self.active), queued=len(self.pending), cancelled=self.cancelled,
                    prefix_cache=cache)

    def run(self) -> None:
        """The loop, until stop(): in the thread that loaded the model (see main)."""
        while True:
            with self.wake:
                if not self.running:
                    break
                if not self.active and not self.pending:
                    self.wake.wait()
                    continue
            try:
                self.iteration()
            except Exception:  # a bug must not take the other requests or the server down
                traceback.print_exc()
                for row, seq in list(self.active.items()):
                    self.finish(row, seq, error=ServeError(500, "internal error while generating", "internal_error"))
        for row, seq in list(self.active.items()):
            self.finish(row, seq, error=ServeError(503, "the server is shutting down", "shutting_down"))

    def iteration(self) -> None:
        for row, seq in list(self.active.items()):
            if seq.cancelled:
                self.cancelled += 1
                self.finish(row, seq, reason=None)
        self.admit()
        if self.active:
            tokens = {row: seq.tokens[-1] for row, seq in self.active.items()}
            for row, logits in self.batch.step(tokens).items():
                self.take(row, self.active[row], logits)

    def admit(self) -> None:
        while len(self.active) < self.max_rows:
            with self.wake:
                if not self.pending:
                    return
                seq = self.pending.popleft()
            if seq.cancelled:
                continue
            if time.monotonic() - seq.enqueued > self.queue_timeout:
                seq.emit(("error", ServeError(503, f"the request waited over {self.queue_timeout:g} s for a free "
                                                   "row; try again later", "queue_timeout")))
                continue
            try:
                row = self.batch.add(seq.ids, prefix=self.prefix)
            except BriskError as e:
                seq.emit(("error", ServeError(400, str(e), "context_length_exceeded")))
                continue
            self.active[row], seq.cached = seq, self.batch.cached[row]
            seq.stream = engine.TextStream(self.tokenizer, seq.stops, Emitter(seq))
            self.take(row, seq, self.batch.last_logits(row))
        with self.wake:  # the rest wait; those that waited too long are told so now, not when a row frees up
            late = [s for s in self.pending if time.monotonic() - s.enqueued > self.queue_timeout]
            for seq in late:
                self.pending.remove(seq)
                seq.emit(("error", ServeError(503, f"the request waited over {self.queue_timeout:g} s for a free "
                                                   "row; try again later", "queue_timeout")))

    def take(self, row: int, seq: Seq, logits: torch.Tensor) -> None:
        if seq.constraint is not None:  # only this row's logits: the others are sampled as they came
            logits = seq.constraint.mask(logits)
        token = sample(logits, seq)
        seq.tokens.append(token)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        if token in self.tokenizer.eos_ids and not seq.ignore_eos:
            self.finish(row, seq, "stop")
        elif seq.stream.push(token) or (seq.constraint is not None and seq.constraint.done):
            self.finish(row, seq, "stop")
        elif len(seq.tokens) >= seq.max_tokens:
            self.finish(row, seq, "length")

    def finish(self, row: int, seq: Seq, reason: Optional[str] = None, error: Optional[ServeError] = None) -> None:
        self.batch.remove(row)
        del self.active[row]
        if error is not None:
            seq.emit(("error", error))
        elif reason is not None:  # None: cancelled, nobody listens
            seq.stream.finish()
            seq.emit(("done", seq.index, reason, len(seq.tokens), seq.cached))


class Emitter:
    """TextStream's output: each piece of text becomes an event of its sequence."""

    def __init__(self, seq: Seq):
        self.seq = seq

    def write(self, text: str) -> None:
        self.seq.emit(("text", self.seq.index, text))

    def flush(self) -> None:
        pass


def sample(logits: torch.Tensor, seq: Seq) -> int:
    """The next token from a row's fp32 logits [V], with the sequence's own random generator (so its seed alone
    decides its draws); temperature 0 is greedy."""
    if seq.temperature == 0:
        return int(logits.argmax())
    probs = engine.logits_to_probs(logits[None], seq.temperature, seq.top_k, seq.top_p)  # [1, V]
    return int(torch.multinomial(probs, 1, generator=seq.generator))


# ---------------------------------------------------------------------------------------------------------------
# The API's requests


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # wrong types are errors, unknown fields are ignored


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model_config = ConfigDict(extra="allow")  # kept, to refuse the UNSUPPORTED ones
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)  # extensions of OpenAI's API, as in vLLM and llama.cpp's server
    ignore_eos: bool = False  # generate max_tokens whatever the model says (for load tests)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: Optional[list[structured.ToolCall]] = None  # an assistant's
    tool_call_id: Optional[str] = None  # a tool's: the call it answers


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens
    response_format: Optional[structured.ResponseFormat] = None
    tools: Optional[list[structured.Tool]] = None
    tool_choice: Optional[structured.ToolChoice] = None


# ---------------------------------------------------------------------------------------------------------------
# The HTTP server


class Server:
    """The FastAPI app around a Scheduler: validation, tokenization, and the OpenAI-shaped responses."""

    def __init__(self, scheduler: Scheduler, tokenizer, model_id: str, max_seq_length: int, vocab_size: int,
                 api_key: Optional[str]):
        self.scheduler, self.tokenizer, self.model_id = scheduler, tokenizer, model_id
        self.max_seq_length, self.vocab_size, self.api_key = max_seq_length, vocab_size, api_key
        self.created = int(time.time())
        self.grammars = structured.Grammars(tokenizer)  # the vocabulary for grammars, built on first use
        app = self.app = FastAPI(title="brisk", lifespan=self.lifespan, docs_url=None, redoc_url=None)
        app.exception_handler(RequestValidationError)(self.invalid)
        app.exception_handler(HTTPException)(self.http_error)
        app.exception_handler(ServeError)(lambda request, e: e.response())
        app.middleware("http")(self.guard)
        app.get("/")(self.page)
        app.get("/health")(self.health)
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        yield
        self.scheduler.stop()

    # errors, in OpenAI's shape

    async def invalid(self, request: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return ServeError(400, f"the body is not valid JSON: {err.get('msg')}", "invalid_json").response()
        if err.get("type") == "missing":
            return ServeError(400, f"missing required field {'.'.join(loc)!r}", "missing_field",
                              ".".join(loc)).response()
        where = f"{'.'.join(loc)}: " if loc else "the body: "
        return ServeError(400, where + err.get("msg", "invalid value"), "invalid_value", ".".join(loc) or None
                          ).response()

    async def http_error(self, request: Request, e: HTTPException):
        return ServeError(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else None).response()

    async def guard(self, request: Request, call_next):
        """Refuse oversized bodies, and requests without the API key (but /health and the page)."""
        size = request.headers.get("content-length", "0")
        if not size.isdigit() or int(size) > MAX_BODY:
            return ServeError(413, f"the body must be at most {MAX_BODY} bytes", "body_too_large").response()
        if self.api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return ServeError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                  "invalid_api_key").response()
        return await call_next(request)

    # endpoints

    async def page(self):
        return FileResponse(CHAT_PAGE, media_type="text/html")

    async def health(self):
        return dict(status="ok", model=self.model_id, **self.scheduler.stats())

    async def models(self):
        card = dict(id=self.model_id, object="model", created=self.created, owned_by="brisk",
                    max_model_len=self.max_seq_length)
        return dict(object="list", data=[card])

    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body)
        p = body.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise ServeError(400, "prompt: give at least one prompt", "invalid_value", "prompt")
        prompts = [await run_in_threadpool(self.tokenizer.encode, x) if isinstance(x, str) else x for x in p]
        for ids in prompts:
            if not ids:
                raise ServeError(400, "prompt: a prompt encodes to no tokens", "invalid_value", "prompt")
            if not all(0 <= t < self.vocab_size for t in ids):
                raise ServeError(400, f"prompt: token ids must be in [0, {self.vocab_size})", "invalid_value",
                                 "prompt")
        return await self.generate(request, body, prompts, 16 if body.max_tokens is None else body.max_tokens, "text")

    async def chat_completions(self, body: ChatRequest, request: Request):
        self.check_model(body)
        messages = [dict(role="system" if m.role == "developer" else m.role,
                         content=m.content if not isinstance(m.content, list) else "".join(p.text for p in m.content),
                         tool_calls=m.tool_calls, tool_call_id=m.tool_call_id) for m in body.messages]
        try:
            spec = await run_in_threadpool(structured.Spec, self.grammars, body.response_format, body.tools,
                                           body.tool_choice)
            messages, tools = spec.prompt(messages)
        except structured.RequestError as e:
            raise ServeError(400, e.message, "invalid_value", e.param)
        try:
            ids = await run_in_threadpool(self.tokenizer.encode_chat, messages, True, tools)
        except Exception as e:  # the template may refuse a conversation (say two user messages in a row)
            raise ServeError(400, f"messages: the chat template refused them: {e}", "invalid_value", "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self.generate(request, body, [ids], max_tokens, "chat", spec)

    def check_model(self, body: Sampling) -> None:
        extra = body.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, 0, [], {}) and not (name == "best_of" and extra[name] == 1):
                raise ServeError(400, f"{name} is not supported by this server", "unsupported_parameter", name)
        name = body.model
        if name != self.model_id:
            raise ServeError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                             "model_not_found", "model")

    # generation

    async def generate(self, request: Request, body: Sampling, prompts: list[list[int]], max_tokens: Optional[int],
                       kind: str, spec: Optional[structured.Spec] = None):
        for ids in prompts:
            if len(ids) > self.max_seq_length:
                raise ServeError(400, f"the prompt has {len(ids)} tokens, more than this server's context of "
                                      f"{self.max_seq_length} (--max_seq_length)", "context_length_exceeded")
        if len(prompts) * body.n > MAX_CHOICES:
            raise ServeError(400, f"prompts times n must be at most {MAX_CHOICES}", "invalid_value", "n")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > MAX_STOPS:
            raise ServeError(400, f"stop: at most {MAX_STOPS} strings", "invalid_value", "stop")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody listens any more
                loop.call_soon_threadsafe(events.put_nowait, event)
        if spec is not None and spec.tools is not None:  # each choice's text is parsed for tool calls
            emit = structured.CallEvents(emit, {k: spec.parser() for k in range(len(prompts) * body.n)})

        seqs = []
        for i, ids in enumerate(prompts):
            room = self.max_seq_length - len(ids) + 1  # the last token is never fed back
            for j in range(body.n):
                seed = secrets.randbits(63) if body.seed is None else hash((body.seed, j)) & (2**63 - 1)
                g = torch.Generator(self.scheduler.batch.device).manual_seed(seed)
                seqs.append(Seq(ids, i * body.n + j, min(max_tokens or room, room), body.temperature, body.top_k,
                                None if body.top_p == 1 else body.top_p, stops, body.ignore_eos, g, emit,
                                constraint=spec and spec.constraint()))
        self.scheduler.submit(seqs)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        usage = dict(prompt_tokens=sum(map(len, prompts)), completion_tokens=0,
                     prompt_tokens_details=dict(cached_tokens=0))
        try:
            first = await self.next_event(events, request)
        except BaseException as e:
            cancel(seqs)
            if isinstance(e, ClientGone):
                return Response(status_code=499)  # nobody reads it
            raise
        if first[0] == "error":
            return first[1].response()
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self.stream(rid, kind, first, events, seqs, body.n, usage, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            texts, reasons, event = [""] * len(seqs), [None] * len(seqs), first
            calls = [[] for _ in seqs]
            while True:
                if event[0] == "error":
                    return event[1].response()
                if event[0] == "text":
                    texts[event[1]] += event[2]
                elif event[0] == "calls":
                    calls[event[1]] += event[2]
                else:
                    reasons[event[1]] = event[2]
                    add_usage(usage, event, body.n)
                    if all(reasons):
                        break
                event = await self.next_event(events, request)
        except ClientGone:
            return Response(status_code=499)
        finally:
            cancel(seqs)
        if kind == "chat":
            choices = [dict(index=i, message=structured.message(t, c), finish_reason=r, logprobs=None)
                       for i, (t, r, c) in enumerate(zip(texts, reasons, calls))]
        else:
            choices = [dict(index=i, text=t, finish_reason=r, logprobs=None)
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return dict(id=rid, object="chat.completion" if kind == "chat" else "text_completion", created=int(time.time()),
                    model=self.model_id, choices=choices, usage=usage)

    async def next_event(self, events: asyncio.Queue, request: Request) -> tuple:
        """The next event of a request, checking twice a second whether its client has gone."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone() from None

    async def stream(self, rid: str, kind: str, event: tuple, events: asyncio.Queue, seqs: list[Seq], n: int,
                     usage: dict, include_usage: bool):
        """Server-sent events: one chunk per piece of text, one with each choice's finish_reason, then [DONE]."""
        created, started, done = int(time.time()), set(), 0

        def chunk(index: int, text: Optional[str], reason: Optional[str] = None, calls: Optional[list] = None) -> str:
            if kind == "chat":
                delta = {} if text is None else dict(content=text)
                if calls:
                    delta["tool_calls"] = calls
                if index not in started:
                    started.add(index)
                    delta["role"] = "assistant"
                choice = dict(index=index, delta=delta, finish_reason=reason, logprobs=None)
                obj = "chat.completion.chunk"
            else:
                choice, obj = dict(index=index, text=text or "", finish_reason=reason, logprobs=None), "text_completion"
            body = dict(id=rid, object=obj, created=created, model=self.model_id, choices=[choice])
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        try:
            while True:
                if event[0] == "error":  # after the first event: the status is sent; say it in the stream
                    err = event[1]
                    yield f"data: {json.dumps(dict(error=dict(message=err.message, type=err.type, code=err.code)))}\n\n"
                    break
                if event[0] == "text":
                    yield chunk(event[1], event[2])
                elif event[0] == "calls":
                    yield chunk(event[1], None, calls=event[2])
                else:
                    yield chunk(event[1], None, event[2])
                    add_usage(usage, event, n)
                    done += 1
                    if done == len(seqs):
                        if include_usage:
                            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                            body = dict(id=rid, object="chat.completion.chunk" if kind == "chat" else "text_completion",
                                        created=created, model=self.model_id, choices=[], usage=usage)
                            yield f"data: {json.dumps(body)}\n\n"
                        break
                event = await events.get()  # a client that goes away cancels this generator
            yield "data: [DONE]\n\n"
        finally:
            cancel(seqs)


def add_usage(usage: dict, done: tuple, n: int) -> None:
    """Count a finished choice's tokens; a prompt's cached tokens are those of its first choice."""
    usage["completion_tokens"] += done[3]
    if done[1] % n == 0:
        usage["prompt_tokens_details"]["cached_tokens"] += done[4]


class ClientGone(Exception):
    """The client closed its connection while its request was waiting or generating."""


def cancel(seqs: list[Seq]) -> None:
    for s in seqs:
        s.cancelled = True  # the loop frees their rows before its next step; finished ones are gone already


class UvicornServer(uvicorn.Server):
    """uvicorn for a thread other than the main one: the main thread catches SIGINT/SIGTERM and calls handle, which
    refuses new requests and lets the running ones finish (at most timeout_graceful_shutdown seconds, then they are
    cancelled); the process then exits 0 instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler

    @contextlib.contextmanager
    def capture_signals(self):  # signals reach the main thread only; main installs handle
        yield

    def handle(self, sig, frame) -> None:
        self.force_exit = self.should_exit  # a second Ctrl-C: do not wait for the running requests
        self.should_exit = True
        self.scheduler.stop_accepting()


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"model.pth in a checkpoint directory (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--max_batch_size", type=int, default=8, help="rows generated at once (default 8)")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help=f"positions of each row's KV cache: prompt + reply (default: the model's block_size, at most "
                        f"{engine.INTERACTIVE_MAX_SEQ_LENGTH})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="default bfloat16")
    p.add_argument("--cache_budget_mb", type=float, default=DEFAULT_BUDGET_MB,
                   help=f"memory for the prefix cache's keys/values, MiB (default {DEFAULT_BUDGET_MB}; 0: no cache)")
    p.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--queue_timeout", type=float, default=60.0,
                   help="seconds a request may wait for a free row before it gets an error (default 60)")
    p.add_argument("--model_name", default=None, help="the model's id in the API (default: the checkpoint's directory)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_at_least_one(args, "max_batch_size", "max_seq_length")
    if not 0 < args.port < 65536:
        raise BriskError(f"--port must be in 1..65535, got {args.port}")
    if not args.cache_budget_mb >= 0:
        raise BriskError(f"--cache_budget_mb must be >= 0, got {args.cache_budget_mb}")
    if not (args.queue_timeout > 0 and math.isfinite(args.queue_timeout)):
        raise BriskError(f"--queue_timeout must be positive, got {args.queue_timeout}")
    if args.api_key is not None and not args.api_key:
        raise BriskError("--api_key must not be empty")
    check_checkpoint(args.checkpoint_path)
    args.device = parse_device(args.device)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so that a port in use is a one-line error at once."""
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        sock = socket.socket(family, kind, proto)  # proto TCP: else asyncio leaves Nagle on (40 ms stalls)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise BriskError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    sock = listen(args.host, args.port)
    config = load_config(args.checkpoint_path)
    max_seq_length = args.max_seq_length or min(config.block_size, engine.INTERACTIVE_MAX_SEQ_LENGTH)
    if max_seq_length > config.block_size:
        raise BriskError(f"--max_seq_length {max_seq_length} exceeds the model's block_size {config.block_size}")
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    model = engine.load(args.checkpoint_path, args.device, DTYPES[args.dtype])
    batch = PrefixBatch(model, args.max_batch_size, max_seq_length, compile=args.compile)
    prefix = None
    if args.cache_budget_mb > 0:
        prefix = PrefixCache([model], [model_meta(model, args.checkpoint_path)], int(args.cache_budget_mb * 2**20))
    if args.compile:  # before serving, so that no request waits for it
        t0 = time.perf_counter()
        batch.warm_up()
        print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    scheduler = Scheduler(batch, tokenizer, args.max_batch_size, prefix, args.queue_timeout)
    model_id = args.model_name or args.checkpoint_path.parent.name
    server = Server(scheduler, tokenizer, model_id, max_seq_length, min(config.vocab_size, tokenizer.vocab_size),
                    args.api_key)
    print(f"serving {model_id} on http://{args.host}:{args.port} ({args.max_batch_size} rows of {max_seq_length} "
          f"positions); Ctrl-C stops", file=sys.stderr)
    web = UvicornServer(uvicorn.Config(server.app, log_level="warning", timeout_graceful_shutdown=30), scheduler)

    def serve_http() -> None:
        try:
            web.run(sockets=[sock])
        finally:
            scheduler.stop()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, web.handle)
    http = threading.Thread(target=serve_http, name="brisk-http", daemon=True)
    http.start()
    # the model's steps stay in the thread that loaded it: torch's OpenMP loops started from a second thread run
    # at half speed on a small machine (two thread teams; BENCHMARKS.md, "The server under load")
    scheduler.run()
    http.join()


if __name__ == "__main__":
    run_cli(main)
