"""The OpenAI API of serve.py, as data: the typed requests (pydantic), the events the scheduler's
loop sends a request (Text, Calls, Done, Failed), and the answers built from them, a table per kind
of request (CHAT, COMPLETION) and a Reply per request; errors in OpenAI's shape (ServeError). Pure:
no model, no scheduler, no routes (vLLM's entrypoints/openai/protocol.py is the model).
"""
import json
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Annotated, Callable, Literal, Optional, Union

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

import structured

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts times n, per request
MAX_STOPS = 4
MAX_LOGPROBS = 20  # most likely tokens reported beside each token's logprob
# OpenAI parameters this server does not implement: refused when given a value that asks for them,
# not ignored (tools, tool_choice and response_format are chat requests' fields: a completion's are
# refused)
UNSUPPORTED = ("echo", "suffix", "best_of", "tools", "tool_choice", "functions", "response_format")

# --------------------------------------------------------------------------------------------------
# What the loop tells a request: typed events, sent from the loop's thread


class ServeError(Exception):
    """An error answered to the client: HTTP status, message, OpenAI error type and code."""

    def __init__(self, status: int, message: str, code: Optional[str] = None,
                 param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = "invalid_request_error" if status < 500 else "server_error"

    def response(self) -> JSONResponse:
        body = dict(message=self.message, type=self.type, param=self.param, code=self.code)
        return JSONResponse(dict(error=body), status_code=self.status)


@dataclass
class TokenLogprob:
    """A generated token's log-probability, the most likely tokens' (sampling.logprobs), and where
    its text starts."""
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, log-probability), most likely first
    offset: int  # characters of the choice's text before this token's


@dataclass
class Text:
    """More text of choice `index`, with the logprobs of the tokens generated since its last event
    (if asked)."""
    index: int
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Calls:
    """Tool calls that choice `index` has made (structured.ToolParser's dicts), each once it is
    complete."""
    index: int
    calls: list[dict]
    # none: its tokens' go with its Text and Done
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Done:
    """Choice `index` has ended ("stop" or "length") after `tokens` new tokens; `cached`: its prompt
    tokens restored from the prefix cache; logprobs: of its tokens not yet sent."""
    index: int
    reason: str
    tokens: int
    cached: int
    logprobs: list[TokenLogprob]


@dataclass
class Failed:
    """The request fails with this error (a streamed one after its status was sent: the stream tells
    it)."""
    error: ServeError


Event = Union[Text, Calls, Done, Failed]


def queue_timeout_error(seconds: float) -> Failed:
    return Failed(ServeError(503, f"the request waited over {seconds:g} s for a free row; try "
                             "again later", "queue_timeout"))


class CallEvents:
    """A request's event sink that parses each choice's text for tool calls (structured.ToolParser):
    its Text events carry the content around them, a Calls event comes as each call ends, and a
    choice that called a tool finishes with "tool_calls"."""

    def __init__(self, emit: Callable[[Event], None], parsers: dict[int, structured.ToolParser]):
        self.emit, self.parsers = emit, parsers

    def __call__(self, event: Event) -> None:
        if not isinstance(event, (Text, Done)):
            return self.emit(event)
        parser = self.parsers[event.index]
        content, calls = parser.push(event.text) if isinstance(event, Text) else parser.finish()
        # held text still sends its tokens' logprobs
        if content or (isinstance(event, Text) and event.logprobs):
            self.emit(Text(event.index, content, event.logprobs if isinstance(event, Text) else []))
        if calls:
            self.emit(Calls(event.index, calls))
        if isinstance(event, Done):
            reason = "tool_calls" if parser.calls and event.reason == "stop" else event.reason
            self.emit(replace(event, reason=reason))


# --------------------------------------------------------------------------------------------------
# The API's requests


class Strict(BaseModel):
    # wrong types are errors, unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model_config = ConfigDict(extra="allow")  # kept, to refuse the UNSUPPORTED ones
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    # extensions of OpenAI's API, as in vLLM and llama.cpp's server
    top_k: Optional[int] = Field(None, ge=1)
    min_p: float = Field(0.0, ge=0, le=1)
    ignore_eos: bool = False  # generate max_tokens whatever the model says (for load tests)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # token id -> added to its logit
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    # most likely tokens reported beside each token
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


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
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[structured.ResponseFormat] = None
    tools: Optional[list[structured.Tool]] = None
    tool_choice: Optional[structured.ToolChoice] = None


def logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """A request's logit_bias with token ids for keys; a key that is not one in [0, vocab_size) is
    an error."""
    out = {}
    for key, value in bias.items():
        token = int(key) if key.isdigit() else -1
        if not 0 <= token < vocab_size:
            raise ServeError(400, f"logit_bias: {key!r} is not a token id in [0, {vocab_size})",
                             "invalid_value", "logit_bias")
        out[token] = value
    return out


async def invalid(request: Request, e: RequestValidationError):
    """A body that does not validate: the first problem, in OpenAI's shape."""
    err = e.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return ServeError(400, f"the body is not valid JSON: {err.get('msg')}",
                          "invalid_json").response()
    if err.get("type") == "missing":
        return ServeError(400, f"missing required field {'.'.join(loc)!r}", "missing_field",
                          ".".join(loc)).response()
    where = f"{'.'.join(loc)}: " if loc else "the body: "
    return ServeError(400, where + err.get("msg", "invalid value"), "invalid_value",
                      ".".join(loc) or None).response()


async def http_error(request: Request, e: HTTPException):
    return ServeError(e.status_code, str(e.detail),
                      "not_found" if e.status_code == 404 else None).response()


# --------------------------------------------------------------------------------------------------
# The API's answers: a table per kind of request, and a Reply that builds one request's answer
# from its events


def chat_choice(index: int, text: str, reason: Optional[str], logprobs: Optional[dict],
                calls: list) -> dict:
    return dict(index=index, message=structured.message(text, calls), finish_reason=reason,
                logprobs=logprobs)


def chat_delta(index: int, text: Optional[str], reason: Optional[str], logprobs: Optional[dict],
               calls: list, first: bool) -> dict:
    delta = {} if text is None else dict(content=text)
    if calls:
        delta["tool_calls"] = calls
    if first:
        delta["role"] = "assistant"
    return dict(index=index, delta=delta, finish_reason=reason, logprobs=logprobs)


def text_choice(index: int, text: Optional[str], reason: Optional[str], logprobs: Optional[dict],
                calls: list = (), first: bool = False) -> dict:
    return dict(index=index, text=text or "", finish_reason=reason, logprobs=logprobs)


def chat_logprobs(entries: list[TokenLogprob], decode: Callable[[int], str]) -> dict:
    """OpenAI's chat logprobs: an entry per token, its text (and its UTF-8 bytes) and the most
    likely tokens'."""
    def item(token: int, logprob: float) -> dict:
        text = decode(token)
        return dict(token=text, logprob=logprob, bytes=list(text.encode()))
    return dict(content=[dict(item(e.token, e.logprob), top_logprobs=[item(*t) for t in e.top])
                         for e in entries])


def text_logprobs(entries: list[TokenLogprob], decode: Callable[[int], str]) -> dict:
    """The legacy completions' logprobs: per token its text, logprob, {text: logprob} of the most
    likely tokens and the token's own, and where its text starts."""
    return dict(tokens=[decode(e.token) for e in entries],
                token_logprobs=[e.logprob for e in entries],
                top_logprobs=[{decode(t): lp for t, lp in [*e.top, (e.token, e.logprob)]}
                              for e in entries],
                text_offset=[e.offset for e in entries])


@dataclass(frozen=True)
class Kind:
    """What sets chat completions and completions apart in their answers."""
    id_prefix: str
    object: str
    chunk_object: str
    # (index, text, finish_reason, logprobs, tool calls) -> a choice of the whole answer
    choice: Callable
    # (index, text or None, finish_reason, logprobs, tool calls, first of its choice) -> a streamed
    # one
    chunk_choice: Callable
    logprobs: Callable  # (TokenLogprobs, decode) -> a choice's logprobs


CHAT = Kind("chatcmpl-", "chat.completion", "chat.completion.chunk", chat_choice, chat_delta,
            chat_logprobs)
COMPLETION = Kind("cmpl-", "text_completion", "text_completion", text_choice, text_choice,
                  text_logprobs)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


class Reply:
    """The answer to one request, from its Text, Calls and Done events: collected whole (add, then
    body) or streamed (chunk per event, then usage_chunk)."""

    def __init__(self, kind: Kind, model: str, prompts: list[list[int]], n: int, logprobs: bool,
                 decode: Callable):
        self.kind, self.model, self.n, self.logprobs, self.decode = kind, model, n, logprobs, decode
        self.id, self.created = kind.id_prefix + secrets.token_hex(12), int(time.time())
        self.usage = dict(prompt_tokens=sum(map(len, prompts)), completion_tokens=0,
                          prompt_tokens_details=dict(cached_tokens=0))
        count = len(prompts) * n
        self.texts, self.reasons = [""] * count, [None] * count
        self.entries: list[list[TokenLogprob]] = [[] for _ in range(count)]
        self.calls: list[list[dict]] = [[] for _ in range(count)]
        self.started: set[int] = set()  # choices streamed from

    @property
    def finished(self) -> bool:
        return all(self.reasons)

    def shaped(self, entries: list[TokenLogprob]) -> Optional[dict]:
        return self.kind.logprobs(entries, self.decode) if self.logprobs else None

    def add(self, event: Union[Text, Calls, Done]) -> None:
        self.entries[event.index] += event.logprobs
        if isinstance(event, Text):
            self.texts[event.index] += event.text
        elif isinstance(event, Calls):
            self.calls[event.index] += event.calls
        else:
            self.count(event)

    def count(self, done: Done) -> None:
        self.reasons[done.index] = done.reason
        self.usage["completion_tokens"] += done.tokens
        if done.index % self.n == 0:  # a prompt's cached tokens are those of its first choice
            self.usage["prompt_tokens_details"]["cached_tokens"] += done.cached

    def total_usage(self) -> dict:
        return dict(self.usage, total_tokens=self.usage["prompt_tokens"]
                    + self.usage["completion_tokens"])

    def body(self) -> dict:
        choices = [self.kind.choice(i, t, r, self.shaped(e), c)
                   for i, (t, r, e, c) in enumerate(zip(self.texts, self.reasons, self.entries,
                                                        self.calls))]
        return dict(id=self.id, object=self.kind.object, created=self.created, model=self.model,
                    choices=choices, usage=self.total_usage())

    def chunk(self, event: Union[Text, Calls, Done], include_usage: bool) -> str:
        """The server-sent event of a piece of text, of tool calls or of a choice's end (counted;
        the text is not kept)."""
        text = event.text if isinstance(event, Text) else None
        reason = event.reason if isinstance(event, Done) else None
        if reason is not None:
            self.count(event)
        first = event.index not in self.started
        self.started.add(event.index)
        calls = event.calls if isinstance(event, Calls) else []
        choice = self.kind.chunk_choice(event.index, text, reason, self.shaped(event.logprobs),
                                        calls, first)
        body = dict(id=self.id, object=self.kind.chunk_object, created=self.created,
                    model=self.model, choices=[choice])
        if include_usage:
            body["usage"] = None
        return sse(body)

    def usage_chunk(self) -> str:
        return sse(dict(id=self.id, object=self.kind.chunk_object, created=self.created,
                        model=self.model, choices=[], usage=self.total_usage()))
