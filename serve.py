"""An OpenAI-compatible HTTP server: completions and chat completions, streamed or not, with
continuous batching and prefix caching, and a chat page at /.

    python serve.py --compile
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

The main thread owns the model (uvicorn runs in another). Requests join the running batch between
decode steps, up to --max_batch_size rows, and leave when done; the rest wait in a queue. While rows
decode, prompts go in --prefill_chunk tokens between two steps, so that a long one does not stall
the rows streaming. Every prompt's beginning found in the prefix cache is restored instead of
prefilled again. Sampling is per request (sampling.py: temperature, top_k, top_p, min_p, penalties,
logit_bias, seed), so a greedy request gets the tokens it would get alone, whatever runs beside it
(with --compile, bitwise where bf16 takes brisk's CPU kernel, else logits within rounding of alone:
a near tie can go the other way; so too for a prompt prefilled in pieces, chunked or restored).
/metrics: the server's figures for Prometheus. A chat request's response_format or required tool
call holds its own rows to a grammar, and its tool calls are parsed out of its replies
(structured.py).

A request is a recipe: its route checks and tokenizes it, Server.rows makes a Seq per choice, the
Scheduler's loop sends each Seq's events (Text, Done, Failed; CallEvents adds Calls), and a Reply
shapes them as the request's Kind (CHAT, COMPLETION) wants. The requests, events and answers are
data, in protocol.py.
"""
import argparse
import asyncio
import contextlib
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
from typing import Callable, Optional

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import engine
import structured
from checkpoint import DEFAULT_CHECKPOINT, check_checkpoint, load_config
from cli import (DTYPES, ArgumentParser, BriskError, TextStream, add_device_flags,
                 check_at_least_one, kv_cache_dtype, run_cli)
from prefix_cache import PrefixBatch, PrefixCache, model_meta
from protocol import (CHAT, COMPLETION, MAX_CHOICES, MAX_STOPS, UNSUPPORTED, CallEvents,
                      ChatRequest, CompletionRequest, Done, Event, Failed, Kind, Reply, Sampling,
                      ServeError, Text, TokenLogprob, http_error, invalid, logit_bias,
                      queue_timeout_error, sse)
from sampling import Penalties, logprobs, sample, stop_reason
from tokenizer import load_tokenizer

CHAT_PAGE = Path(__file__).resolve().parent / "chat.html"
MAX_BODY = 16 * 2**20  # bytes of a request's body
DEFAULT_BUDGET_MB = 2048  # the prefix cache's
DEFAULT_PREFILL_CHUNK = 512  # tokens: BENCHMARKS.md, "Chunked prefill"


# --------------------------------------------------------------------------------------------------
# The loop that owns the model


@dataclass
class Seq:
    """One choice of one request: its prompt, how it samples and stops, and what it has generated.
    Once submitted, only the loop's thread touches it, but `cancelled`."""
    ids: list[int]
    index: int  # the choice's index in the response
    max_tokens: int
    emit: Callable[[Event], None]  # called from the loop's thread
    # sampling.sample's temperature, top_k, top_p, min_p
    sampling: dict = field(default_factory=dict)
    # its own random draws, so that its seed alone decides them
    generator: Optional[torch.Generator] = None
    # logits processors (token ids generated so far, logits [V]) -> logits, applied in order before
    # sampling: sampling.Penalties (penalties, logit_bias)
    processors: list[Callable] = field(default_factory=list)
    # a grammar its tokens must follow (response_format, tools): masks the logits before the
    # processors, is told each token, and ends the sequence once complete
    constraint: Optional[structured.Constraint] = None
    stops: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # most likely tokens reported beside each token's logprob; None: no logprobs
    logprobs: Optional[int] = None
    enqueued: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens restored from the prefix cache
    cancelled: bool = False
    stream: Optional[TextStream] = None
    unsent: list[TokenLogprob] = field(default_factory=list)  # logprobs not sent with an event yet
    last: float = 0.0  # time.monotonic() at its latest token

    def sent(self) -> list[TokenLogprob]:
        """The logprobs not sent yet, now counted as sent."""
        out, self.unsent = self.unsent, []
        return out


class Metrics:
    """The server's figures for /metrics, in Prometheus's text format: a registry of its own per
    scheduler."""

    def __init__(self, scheduler: "Scheduler"):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("brisk_requests", "HTTP requests answered, by status code",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("brisk_prompt_tokens",
                                     "prompt tokens of the choices given a row", registry=r)
        self.generated_tokens = Counter("brisk_generation_tokens", "tokens generated", registry=r)
        self.cache_hits = Counter("brisk_prefix_cache_hits",
                                  "prompts whose beginning the prefix cache restored", registry=r)
        self.cache_hit_tokens = Counter("brisk_prefix_cache_hit_tokens",
                                        "prompt tokens the prefix cache restored", registry=r)
        Gauge("brisk_rows_busy", "rows of the batch generating", registry=r).set_function(
            lambda: len(scheduler.active))
        Gauge("brisk_queue_length", "choices waiting for a row", registry=r).set_function(
            lambda: len(scheduler.pending))
        self.ttft = Histogram("brisk_time_to_first_token_seconds",
                              "from a choice's queueing to its first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram("brisk_inter_token_latency_seconds",
                             "between a choice's consecutive tokens", registry=r,
                             buckets=(.0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56))

    def admitted(self, seq: Seq) -> None:
        self.prompt_tokens.inc(len(seq.ids))
        if seq.cached:
            self.cache_hits.inc()
            self.cache_hit_tokens.inc(seq.cached)

    def token(self, seq: Seq) -> None:
        """seq has just taken a token."""
        now = time.monotonic()
        first = len(seq.tokens) == 1
        (self.ttft if first else self.itl).observe(now - (seq.enqueued if first else seq.last))
        seq.last = now
        self.generated_tokens.inc()


class Scheduler:
    """Admits queued sequences into free rows between decode steps, samples each row's next token,
    streams the text out and frees a row when its sequence ends (sampling.stop_reason) or its client
    has gone."""

    def __init__(self, batch: PrefixBatch, tokenizer, max_rows: int, prefix: Optional[PrefixCache],
                 queue_timeout: float, prefill_chunk: int = 0):
        self.batch, self.tokenizer, self.max_rows, self.prefix = batch, tokenizer, max_rows, prefix
        self.queue_timeout, self.prefill_chunk = queue_timeout, prefill_chunk
        self.pending: deque[Seq] = deque()
        self.active: dict[int, Seq] = {}  # row -> sequence
        # the rows of active whose prompt is not all in yet, oldest first
        self.filling: dict[int, Seq] = {}
        self.wake = threading.Condition()
        self.accepting, self.running = True, True
        self.cancelled = 0  # rows freed because their client went away
        self.metrics = Metrics(self)

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
                self.pending.popleft().emit(Failed(ServeError(503, "the server is shutting down",
                                                              "shutting_down")))

    def stop(self) -> None:
        """Cancel the running rows and end the loop (run returns)."""
        self.stop_accepting()
        with self.wake:
            self.running = False
            self.wake.notify()

    def stats(self) -> dict:
        cache = None if self.prefix is None else dict(entries=len(self.prefix.entries),
                                                      bytes=self.prefix.nbytes,
                                                      budget_bytes=self.prefix.budget)
        return dict(rows=self.max_rows, rows_busy=len(self.active), queued=len(self.pending),
                    cancelled=self.cancelled, prefix_cache=cache)

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
                    self.finish(row, seq,
                                error=ServeError(500, "internal error while generating",
                                                 "internal_error"))
        for row, seq in list(self.active.items()):
            self.finish(row, seq, error=ServeError(503, "the server is shutting down",
                                                   "shutting_down"))

    def iteration(self) -> None:
        for row, seq in list(self.active.items()):
            if seq.cancelled:
                self.cancelled += 1
                self.finish(row, seq, reason=None)
        self.admit()
        tokens = {row: seq.tokens[-1] for row, seq in self.active.items()
                  if row not in self.filling}
        if tokens:
            for row, logits in self.batch.step(tokens).items():
                self.advance(row, self.active[row], logits)

    def admit(self) -> None:
        """Prefill the prompts that have a row, then give the queued sequences free rows and prefill
        theirs, oldest first. While other rows decode, at most prefill_chunk prompt tokens in all
        (0: no limit): those rows then wait for no more than a chunk between two steps, and a long
        prompt goes in over several iterations."""
        decoding = len(self.active) > len(self.filling)
        budget = self.prefill_chunk if self.prefill_chunk and decoding else None  # None: no limit
        for row, seq in list(self.filling.items()):
            if budget == 0:
                break
            budget = self.fill(row, seq, budget)
        while len(self.active) < self.max_rows and budget != 0:
            with self.wake:
                if not self.pending:
                    break
                seq = self.pending.popleft()
            if seq.cancelled:
                continue
            if time.monotonic() - seq.enqueued > self.queue_timeout:
                seq.emit(queue_timeout_error(self.queue_timeout))
                continue
            try:  # the row is taken and its cached beginning restored: its prompt goes in with fill
                row = self.batch.add(seq.ids, prefix=self.prefix, n=0)
            except BriskError as e:
                seq.emit(Failed(ServeError(400, str(e), "context_length_exceeded")))
                continue
            self.active[row] = self.filling[row] = seq
            seq.cached = self.batch.cached[row]
            seq.stream = TextStream(self.tokenizer, seq.stops, Emitter(seq))
            self.metrics.admitted(seq)
            budget = self.fill(row, seq, budget)
        # the rest wait; those that waited too long are told so now, not when a row frees up
        with self.wake:
            late = [s for s in self.pending if time.monotonic() - s.enqueued > self.queue_timeout]
            for seq in late:
                self.pending.remove(seq)
                seq.emit(queue_timeout_error(self.queue_timeout))

    def fill(self, row: int, seq: Seq, budget: Optional[int]) -> Optional[int]:
        """Prefill up to budget more tokens of row's prompt (None: all); once it is all in, sample
        the first token. Returns the budget left."""
        before = self.batch.pos[row]
        ready = self.batch.fill(row, seq.ids, budget)
        left = None if budget is None else budget - (self.batch.pos[row] - before)
        if ready:
            del self.filling[row]
            self.advance(row, seq, self.batch.last_logits(row))
        return left

    def advance(self, row: int, seq: Seq, logits: torch.Tensor) -> None:
        """Sample the next token of row's sequence from its fp32 logits [V]; end the sequence if it
        stops there. Its logprobs are those of the logits it samples from: masked by its constraint
        and processed."""
        c = seq.constraint
        if c is not None:  # only this row's logits: the others are sampled as they came
            logits = c.mask(logits)
        for process in seq.processors:
            logits = process(seq.tokens, logits)
        token = int(sample(logits[None], generator=seq.generator, **seq.sampling)[0])
        if seq.logprobs is not None:
            seq.unsent.append(TokenLogprob(token, *logprobs(logits, token, seq.logprobs),
                                           len(seq.stream.text)))
        seq.tokens.append(token)
        self.metrics.token(seq)
        eos_ids = () if seq.ignore_eos else self.tokenizer.eos_ids
        reason = stop_reason(token, len(seq.tokens), seq.max_tokens, eos_ids, seq.stream.push)
        if c is not None:
            c.accept(token)
            if c.done:  # the grammar is complete: the reply is too, whatever max_tokens says
                reason = "stop"
        if reason is not None:
            self.finish(row, seq, reason)

    def finish(self, row: int, seq: Seq, reason: Optional[str] = None,
               error: Optional[ServeError] = None) -> None:
        self.batch.remove(row)
        del self.active[row]
        self.filling.pop(row, None)
        if error is not None:
            seq.emit(Failed(error))
        elif reason is not None:  # None: cancelled, nobody listens
            seq.stream.finish()
            seq.emit(Done(seq.index, reason, len(seq.tokens), seq.cached, seq.sent()))


class Emitter:
    """TextStream's output: each piece of text becomes an event of its sequence."""

    def __init__(self, seq: Seq):
        self.seq = seq

    def write(self, text: str) -> None:
        self.seq.emit(Text(self.seq.index, text, self.seq.sent()))

    def flush(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# The HTTP server


class ClientGone(Exception):
    """The client closed its connection while its request was waiting or generating."""


async def next_event(events: asyncio.Queue, request: Request) -> Event:
    """The next event of a request, checking twice a second whether its client has gone."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), 0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone() from None


def cancel(seqs: list[Seq]) -> None:
    for s in seqs:
        # the loop frees their rows before its next step; finished ones are gone already
        s.cancelled = True


async def collect(reply: Reply, event: Event, events: asyncio.Queue, seqs: list[Seq],
                  request: Request):
    """The whole answer, once every choice has ended."""
    try:
        while True:
            if isinstance(event, Failed):
                return event.error.response()
            reply.add(event)
            if reply.finished:
                return reply.body()
            event = await next_event(events, request)
    except ClientGone:
        return Response(status_code=499)
    finally:
        cancel(seqs)


async def stream(reply: Reply, event: Event, events: asyncio.Queue, seqs: list[Seq],
                 include_usage: bool):
    """Server-sent events: one chunk per piece of text, one with each choice's finish_reason, then
    [DONE]."""
    try:
        while True:
            # after the first event: the status is sent; say it in the stream
            if isinstance(event, Failed):
                err = event.error
                yield sse(dict(error=dict(message=err.message, type=err.type, code=err.code)))
                break
            yield reply.chunk(event, include_usage)
            if reply.finished:
                if include_usage:
                    yield reply.usage_chunk()
                break
            event = await events.get()  # a client that goes away cancels this generator
        yield "data: [DONE]\n\n"
    finally:
        cancel(seqs)


class Server:
    """The FastAPI app around a Scheduler: a short function per route; generate() makes a request's
    rows, and collect() or stream() turn their events into the answer."""

    def __init__(self, scheduler: Scheduler, tokenizer, model_id: str, max_seq_length: int,
                 vocab_size: int, api_key: Optional[str]):
        self.scheduler, self.tokenizer, self.model_id = scheduler, tokenizer, model_id
        self.max_seq_length, self.vocab_size, self.api_key = max_seq_length, vocab_size, api_key
        self.created = int(time.time())
        # the vocabulary for grammars, built on first use
        self.grammars = structured.Grammars(tokenizer)
        app = self.app = FastAPI(title="brisk", lifespan=self.lifespan, docs_url=None,
                                 redoc_url=None)
        app.exception_handler(RequestValidationError)(invalid)
        app.exception_handler(HTTPException)(http_error)
        app.exception_handler(ServeError)(lambda request, e: e.response())
        app.middleware("http")(self.guard)
        app.get("/")(self.page)
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics)
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        yield
        self.scheduler.stop()

    async def guard(self, request: Request, call_next):
        """Refuse oversized bodies, and requests without the API key (but /health, /metrics and the
        page); count the answers by status."""
        size = request.headers.get("content-length", "0")
        given = request.headers.get("authorization", "")
        if not size.isdigit() or int(size) > MAX_BODY:
            response = ServeError(413, f"the body must be at most {MAX_BODY} bytes",
                                  "body_too_large").response()
        elif (self.api_key is not None and request.url.path.startswith("/v1/")
              and not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())):
            response = ServeError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                  "invalid_api_key").response()
        else:
            response = await call_next(request)
        self.scheduler.metrics.requests.labels(str(response.status_code)).inc()
        return response

    # routes

    async def page(self):
        return FileResponse(CHAT_PAGE, media_type="text/html")

    async def health(self):
        return dict(status="ok", model=self.model_id, **self.scheduler.stats())

    async def metrics(self):
        return Response(generate_latest(self.scheduler.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

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
        prompts = [await run_in_threadpool(self.tokenizer.encode, x) if isinstance(x, str) else x
                   for x in p]
        for ids in prompts:
            if not ids:
                raise ServeError(400, "prompt: a prompt encodes to no tokens", "invalid_value",
                                 "prompt")
            if not all(0 <= t < self.vocab_size for t in ids):
                raise ServeError(400, f"prompt: token ids must be in [0, {self.vocab_size})",
                                 "invalid_value", "prompt")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        return await self.generate(request, body, COMPLETION, prompts, max_tokens, body.logprobs)

    async def chat_completions(self, body: ChatRequest, request: Request):
        self.check_model(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise ServeError(400, "top_logprobs needs logprobs: true", "invalid_value",
                             "top_logprobs")
        messages = [dict(role="system" if m.role == "developer" else m.role,
                         content=m.content if not isinstance(m.content, list)
                         else "".join(p.text for p in m.content),
                         tool_calls=m.tool_calls,
                         tool_call_id=m.tool_call_id) for m in body.messages]
        try:  # the vocabulary for grammars is built here on first use, off the event loop
            spec = await run_in_threadpool(structured.Spec, self.grammars, body.response_format,
                                           body.tools, body.tool_choice)
            messages, tools = spec.prompt(messages)
        except structured.RequestError as e:
            raise ServeError(400, e.message, "invalid_value", e.param)
        try:
            ids = await run_in_threadpool(self.tokenizer.encode_chat, messages, True, tools)
        # the template may refuse a conversation (say two user messages in a row)
        except Exception as e:
            raise ServeError(400, f"messages: the chat template refused them: {e}", "invalid_value",
                             "messages")
        alternatives = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self.generate(request, body, CHAT, [ids], max_tokens, alternatives, spec)

    def check_model(self, body: Sampling) -> None:
        extra = body.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, 0, [], {}) and not (name == "best_of"
                                                                        and extra[name] == 1):
                raise ServeError(400, f"{name} is not supported by this server",
                                 "unsupported_parameter", name)
        name = body.model
        if name != self.model_id:
            raise ServeError(404, f"the model {name!r} does not exist; this server serves "
                             f"{self.model_id!r}", "model_not_found", "model")

    # generation

    async def generate(self, request: Request, body: Sampling, kind: Kind, prompts: list[list[int]],
                       max_tokens: Optional[int], alternatives: Optional[int],
                       spec: Optional[structured.Spec] = None):
        """Queue a choice per prompt and n, then answer from their events; alternatives: the most
        likely tokens reported beside each token's logprob (None: no logprobs); spec: a chat
        request's grammar and tools."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:
            # the event loop is closed: nobody listens any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)
        # each choice's text is parsed for tool calls
        if spec is not None and spec.tools is not None:
            emit = CallEvents(emit, {k: spec.parser() for k in range(len(prompts) * body.n)})
        seqs = self.rows(body, prompts, max_tokens, alternatives, emit, spec)
        self.scheduler.submit(seqs)
        reply = Reply(kind, self.model_id, prompts, body.n, alternatives is not None,
                      self.decode_token)
        try:
            first = await next_event(events, request)
        except BaseException as e:
            cancel(seqs)
            if isinstance(e, ClientGone):
                return Response(status_code=499)  # nobody reads it
            raise
        if isinstance(first, Failed):
            return first.error.response()
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(reply, first, events, seqs, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await collect(reply, first, events, seqs, request)

    def rows(self, body: Sampling, prompts: list[list[int]], max_tokens: Optional[int],
             alternatives: Optional[int], emit: Callable[[Event], None],
             spec: Optional[structured.Spec] = None) -> list[Seq]:
        """A request's sequences, choice i * n + j for prompt i, each with its own generator,
        processors and constraint."""
        for ids in prompts:
            try:
                engine.check_fits(len(ids), self.max_seq_length)
            except BriskError as e:
                raise ServeError(400, f"{e}, this server's context",
                                 "context_length_exceeded") from None
        if len(prompts) * body.n > MAX_CHOICES:
            raise ServeError(400, f"prompts times n must be at most {MAX_CHOICES}", "invalid_value",
                             "n")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > MAX_STOPS:
            raise ServeError(400, f"stop: at most {MAX_STOPS} strings", "invalid_value", "stop")
        bias = logit_bias(body.logit_bias or {}, self.vocab_size)
        sampling = dict(temperature=body.temperature, top_k=body.top_k,
                        top_p=None if body.top_p == 1 else body.top_p, min_p=body.min_p or None)
        seqs = []
        for i, ids in enumerate(prompts):
            fit = engine.tokens_that_fit(max_tokens or self.max_seq_length, len(ids),
                                         self.max_seq_length)
            for j in range(body.n):
                seed = (secrets.randbits(63) if body.seed is None
                        else hash((body.seed, j)) & (2**63 - 1))
                processors = []
                if bias or body.presence_penalty or body.frequency_penalty:
                    processors.append(Penalties(body.presence_penalty, body.frequency_penalty,
                                                bias))
                generator = torch.Generator(self.scheduler.batch.device).manual_seed(seed)
                seqs.append(Seq(ids, i * body.n + j, fit, emit, sampling=sampling,
                                generator=generator, processors=processors, stops=stops,
                                ignore_eos=body.ignore_eos, logprobs=alternatives,
                                constraint=None if spec is None else spec.constraint()))
        return seqs

    def decode_token(self, token: int) -> str:
        return self.tokenizer.decode([token])


class UvicornServer(uvicorn.Server):
    """uvicorn for a thread other than the main one: the main thread catches SIGINT/SIGTERM and
    calls handle, which refuses new requests and lets the running ones finish (at most
    timeout_graceful_shutdown seconds, then they are cancelled); the process then exits 0 instead of
    re-raising the signal."""

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


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"model.pth in a checkpoint directory (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--max_batch_size", type=int, default=8,
                   help="rows generated at once (default 8)")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="positions of each row's KV cache: prompt + reply (default: the model's "
                        f"block_size, at most {engine.INTERACTIVE_MAX_SEQ_LENGTH})")
    add_device_flags(p)
    p.add_argument("--cache_budget_mb", type=float, default=DEFAULT_BUDGET_MB,
                   help="memory for the prefix cache's keys/values, MiB (default "
                        f"{DEFAULT_BUDGET_MB}; 0: no cache)")
    p.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--prefill_chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens prefilled between two decode steps while other rows decode, "
                        "so that a long prompt does not stall them (default "
                        f"{DEFAULT_PREFILL_CHUNK}; 0: each prompt at once)")
    p.add_argument("--queue_timeout", type=float, default=60.0,
                   help="seconds a request may wait for a free row before it gets an error "
                        "(default 60)")
    p.add_argument("--model_name", default=None,
                   help="the model's id in the API (default: the checkpoint's directory)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_at_least_one(args, "max_batch_size", "max_seq_length")
    if not 0 < args.port < 65536:
        raise BriskError(f"--port must be in 1..65535, got {args.port}")
    if not args.cache_budget_mb >= 0:
        raise BriskError(f"--cache_budget_mb must be >= 0, got {args.cache_budget_mb}")
    if args.prefill_chunk < 0:
        raise BriskError(f"--prefill_chunk must be >= 0, got {args.prefill_chunk}")
    if not (args.queue_timeout > 0 and math.isfinite(args.queue_timeout)):
        raise BriskError(f"--queue_timeout must be positive, got {args.queue_timeout}")
    if args.api_key is not None and not args.api_key:
        raise BriskError("--api_key must not be empty")
    check_checkpoint(args.checkpoint_path)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so that a port in use is a one-line error
    at once."""
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        # proto TCP: else asyncio leaves Nagle on (40 ms stalls)
        sock = socket.socket(family, kind, proto)
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
    # a conversation's
    max_seq_length = engine.cache_length(args.max_seq_length, None, config.block_size)
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    model = engine.load(args.checkpoint_path, args.device, DTYPES[args.dtype], kv_cache_dtype(args))
    batch = PrefixBatch(model, args.max_batch_size, max_seq_length, compile=args.compile)
    prefix = None
    if args.cache_budget_mb > 0:
        prefix = PrefixCache([model], [model_meta(model, args.checkpoint_path)],
                             int(args.cache_budget_mb * 2**20))
    if args.compile:  # before serving, so that no request waits for it
        t0 = time.perf_counter()
        batch.warm_up()
        print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    scheduler = Scheduler(batch, tokenizer, args.max_batch_size, prefix, args.queue_timeout,
                          args.prefill_chunk)
    model_id = args.model_name or args.checkpoint_path.parent.name
    server = Server(scheduler, tokenizer, model_id, max_seq_length,
                    min(config.vocab_size, tokenizer.vocab_size), args.api_key)
    print(f"serving {model_id} on http://{args.host}:{args.port} ({args.max_batch_size} rows of "
          f"{max_seq_length} positions); Ctrl-C stops", file=sys.stderr)
    web = UvicornServer(uvicorn.Config(server.app, log_level="warning",
                                       timeout_graceful_shutdown=30), scheduler)

    def serve_http() -> None:
        try:
            web.run(sockets=[sock])
        finally:
            scheduler.stop()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, web.handle)
    http = threading.Thread(target=serve_http, name="brisk-http", daemon=True)
    http.start()
    # the model's steps stay in the thread that loaded it: torch's OpenMP loops started from a
    # second thread run at half speed on a small machine (two thread teams; BENCHMARKS.md, "The
    # server under load")
    scheduler.run()
    http.join()


if __name__ == "__main__":
    run_cli(main)
