"""Structured output and tool calls for the server: a request's response_format or tool_choice
compiled into a grammar (llguidance) that masks its row's logits token by token, tools rendered into
the prompt, and tool calls parsed out of the reply into OpenAI's tool_calls.

    grammars = Grammars(tokenizer)                        # once: the vocabulary as llguidance sees it
    spec = Spec(grammars, response_format, tools, tool_choice)   # per request; RequestError if it is invalid
    messages, tools = spec.prompt(messages)               # tools for the template, or in the generic format
    ids = tokenizer.encode_chat(messages, tools=tools)
    constraint = spec.constraint()                        # per choice, None when unconstrained
    logits = constraint.mask(logits); token = sample(logits); constraint.accept(token)  # until constraint.done
    parser = spec.parser()                                # per choice, None without tools
    content, calls = parser.push(text)                    # per piece of the reply; parser.finish() at its end

Templates without a tool format get Qwen2.5's (Hermes'): the tools listed in the system message
inside <tools></tools>, each call answered as <tool_call>{"name": ..., "arguments":
{...}}</tool_call>, each result sent back in a user turn inside <tool_response></tool_response>.
"""
import json
import secrets
from typing import Literal, Optional, Union

import llguidance
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

# compact JSON as json.dumps writes it: flexible whitespace lets a small model pad a reply with
# newlines forever
JSON_OPTIONS = dict(whitespace_flexible=False, item_separator=", ", key_separator=": ")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
GENERIC_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


class RequestError(ValueError):
    """A request's structured-output or tool fields are invalid: the message and the parameter at
    fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


# --------------------------------------------------------------------------------------------------
# The request's fields, as OpenAI's API has them

class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class JsonSchema(Strict):
    name: str = "response"
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchema] = None


class Function(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Optional[str] = None
    parameters: dict = Field(default_factory=lambda: dict(type="object", properties={}))
    strict: Optional[bool] = None


class Tool(Strict):
    type: Literal["function"]
    function: Function


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# --------------------------------------------------------------------------------------------------
# Grammars and the per-row mask

class Grammars:
    """The model's vocabulary as llguidance sees it, built on first use (~0.5 s for 49,152 tokens:
    once a server)."""

    def __init__(self, tokenizer):
        self.tokenizer, self._lltok = tokenizer, None

    @property
    def lltok(self) -> llguidance.LLTokenizer:
        if self._lltok is None:
            if not hasattr(self.tokenizer, "tok"):
                raise RequestError("response_format and required tool calls need a tokenizer.json tokenizer",
                                   "response_format")
            self._lltok = llguidance.LLTokenizer(self.tokenizer.tok.to_str(),
                                                 eos_token=self.tokenizer.eos_ids)
        return self._lltok

    @staticmethod
    def check(grammar: str, param: str) -> str:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if failed:
            raise RequestError(f"{param}: invalid JSON schema: {messages[0].splitlines()[0]}",
                               param)
        return grammar


class Constraint:
    """One choice's grammar as it decodes: mask(logits) before sampling its token, accept(token)
    after; done once the grammar is complete (or broken): the row stops there."""

    def __init__(self, lltok: llguidance.LLTokenizer, grammar: str):
        self.matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        self.vocab = lltok.vocab_size
        # one bit per token, 1: allowed
        self.bits = np.zeros((self.vocab + 31) // 32, dtype=np.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] with the tokens the grammar forbids at -inf (a new tensor: the batch's logits
        stay)."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        V = min(logits.shape[-1], self.vocab)
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[:V].view(bool)  # [V]
        out = np.full(logits.shape[-1], -np.inf, dtype=np.float32)  # ids past the tokenizer's vocabulary: never
        # numpy, in one thread: torch's threads cost ~45 ms a call here when other processes hold
        # the cores
        np.copyto(out[:V], logits[:V].float().cpu().numpy(), where=allowed)
        return torch.from_numpy(out).to(logits.device)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_error()


def schema_grammar(schema: dict) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def call_schema(tool: Tool) -> dict:
    """The JSON of one call of `tool`: its name, then arguments that match its parameters."""
    return dict(type="object", properties=dict(name=dict(const=tool.function.name),
                                               arguments=tool.function.parameters),
                required=["name", "arguments"], additionalProperties=False)


def calls_grammar(tools: list, wrapped: bool) -> str:
    """Exactly one call of one of `tools`, inside <tool_call></tool_call> where the format has
    them."""
    schemas = [call_schema(t) for t in tools]
    schema = dict(schemas[0] if len(schemas) == 1 else dict(anyOf=schemas),
                  **{"x-guidance": JSON_OPTIONS})
    if not wrapped:
        return schema_grammar(schema)
    lark = f"start: {json.dumps(CALL_OPEN + chr(10))} call {json.dumps(chr(10) + CALL_CLOSE)}\n"
    return llguidance.LLMatcher.grammar_from_lark(lark + f"call: %json {json.dumps(schema)}")


# --------------------------------------------------------------------------------------------------
# A request's plan: its grammar, its tools in the prompt, its reply's tool calls

class Spec:
    """What a chat request asks beyond text: its checked grammar (or none) and the tools to render
    and parse."""

    def __init__(self, grammars: Grammars, response_format: Optional[ResponseFormat] = None,
                 tools: Optional[list] = None, tool_choice: Optional[ToolChoice] = None):
        tokenizer = grammars.tokenizer
        self.native = tokenizer.has_tool_format()
        self.wrapped = not self.native or CALL_OPEN in tokenizer.chat_template
        self.tools, self.grammar = tools or None, None
        if tool_choice is not None and not tools:
            raise RequestError("tool_choice: given without tools", "tool_choice")
        named = [t for t in tools or () if isinstance(tool_choice, NamedToolChoice)
                 and t.function.name == tool_choice.function.name]
        if isinstance(tool_choice, NamedToolChoice) and not named:
            raise RequestError(f"tool_choice: no tool named {tool_choice.function.name!r} is in tools", "tool_choice")
        for i, t in enumerate(tools or ()):
            grammars.check(schema_grammar(t.function.parameters), f"tools[{i}].function.parameters")
        if tool_choice == "none":
            self.tools = None  # the model answers in text: tools neither rendered nor parsed
        elif tool_choice == "required" or named:
            self.grammar = grammars.check(calls_grammar(named or tools, self.wrapped), "tools")
        if response_format is not None and response_format.type != "text":
            if self.grammar is not None:
                raise RequestError("response_format: give it or a required tool call, not both",
                                   "response_format")
            schema = dict(type="object") if response_format.type == "json_object" else \
                (response_format.json_schema or JsonSchema()).schema_
            self.grammar = grammars.check(schema_grammar(schema), "response_format")
        # built here, off the event loop
        self.lltok = None if self.grammar is None else grammars.lltok

    def prompt(self, messages: list) -> tuple:
        """(messages, tools) for tokenizer.encode_chat: the tools, the calls and their results in
        the template's own format or in the generic one."""
        check_tool_messages(messages)
        tools = None if self.tools is None else [t.model_dump(exclude_none=True)
                                                 for t in self.tools]
        if self.native:
            return [native(m) for m in messages], tools
        if tools is None and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            return [dict(role=m["role"], content=m.get("content") or "") for m in messages], None
        return generic(messages, tools), None

    def constraint(self) -> Optional[Constraint]:
        return None if self.grammar is None else Constraint(self.lltok, self.grammar)

    def parser(self) -> Optional["ToolParser"]:
        return None if self.tools is None else ToolParser({t.function.name for t in self.tools})


def check_tool_messages(messages: list) -> None:
    """Each tool message answers a call of an earlier assistant message, by its id."""
    ids = set()
    for i, m in enumerate(messages):
        ids |= {c.id for c in m.get("tool_calls") or ()}
        if m["role"] == "tool" and m.get("tool_call_id") not in ids:
            raise RequestError(f"messages[{i}]: a tool message's tool_call_id must be the id of an earlier "
                               "assistant message's tool call", f"messages[{i}].tool_call_id")


def arguments(call: ToolCall):
    """A call's arguments as an object, which templates expect (OpenAI sends them as JSON text)."""
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


def native(m: dict) -> dict:
    out = dict(m, content=m.get("content") or "")
    if m.get("tool_calls"):
        out["tool_calls"] = [dict(id=c.id, type="function",
                                  function=dict(name=c.function.name, arguments=arguments(c)))
                             for c in m["tool_calls"]]
    return {k: v for k, v in out.items() if v is not None}


def generic(messages: list, tools: Optional[list]) -> list:
    """The conversation in the generic format: the tools in the system message, calls and results as
    text."""
    out = []
    if tools is not None:
        listed = GENERIC_TOOLS.format(tools="\n".join(json.dumps(t, ensure_ascii=False)
                                                      for t in tools))
        system = messages[0]["role"] == "system"
        out.append(dict(role="system",
                        content=(messages[0].get("content") or "") + "\n\n" + listed if system
                        else listed))
        messages = messages[1:] if system else messages
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            # the results of one turn's calls share a user message
            if out and out[-1].get("results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append(dict(role="user", content=text, results=True))
            continue
        calls = [json.dumps(dict(name=c.function.name, arguments=arguments(c)), ensure_ascii=False)
                 for c in m.get("tool_calls") or ()]
        text = "\n".join([m.get("content") or ""]
                         + [f"{CALL_OPEN}\n{c}\n{CALL_CLOSE}" for c in calls]).strip()
        out.append(dict(role=m["role"], content=text))
    return [dict(role=m["role"], content=m["content"]) for m in out]


# --------------------------------------------------------------------------------------------------
# Tool calls out of the reply

class ToolParser:
    """Splits a reply into content and OpenAI tool calls: <tool_call>{...}</tool_call> blocks (Qwen,
    Hermes, the generic format) or a reply that is all JSON, one call or a list of them ({"name":
    ..., "arguments" or "parameters": ...}: Llama 3). Streamed, text that may begin a call is held
    back until it is known."""

    def __init__(self, names: set):
        self.names, self.text, self.emitted, self.calls = names, "", 0, []
        self.json = None  # whether the reply is all JSON: known from its first non-blank character

    def push(self, text: str) -> tuple:
        """(content, calls) that `text` completes: content to show now, calls it closes."""
        self.text += text
        if self.json is None and self.text.strip():
            self.json = self.text.lstrip()[0] in "{["
        if self.json is not False:
            return "", []
        content, calls = "", []
        while True:
            start = self.text.find(CALL_OPEN, self.emitted)
            end = self.text.find(CALL_CLOSE, start) if start >= 0 else -1
            if end < 0:
                break
            found = self.read(self.text[start + len(CALL_OPEN):end])
            # a broken call is text
            content += self.text[self.emitted:start if found else end + len(CALL_CLOSE)]
            calls, self.emitted = calls + found, end + len(CALL_CLOSE)
        hold = start if start >= 0 else len(self.text) - partial_marker(self.text)
        if hold > self.emitted:
            content, self.emitted = content + self.text[self.emitted:hold], hold
        return content, calls

    def finish(self) -> tuple:
        """(content, calls) left at the end of the reply: a call not closed is still read, if its
        JSON is whole."""
        rest = self.text[self.emitted:]
        if self.json:
            calls = self.read(rest)
            return ("", calls) if calls else (rest, [])
        start = rest.find(CALL_OPEN)
        if start >= 0 and (calls := self.read(rest[start + len(CALL_OPEN):])):
            return rest[:start], calls
        return rest, []

    def read(self, text: str) -> list:
        """The calls in JSON text (one call or a list of them), numbered after those read before; []
        if it is none."""
        try:
            found = json.loads(text)
        except ValueError:
            return []
        found = found if isinstance(found, list) else [found]
        if not found or not all(isinstance(c, dict) and c.get("name") in self.names for c in found):
            return []
        calls = []
        for c in found:
            args = c.get("arguments", c.get("parameters", {}))
            args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            calls.append(dict(index=len(self.calls), id="call_" + secrets.token_hex(12),
                              type="function", function=dict(name=c["name"], arguments=args)))
            self.calls.append(calls[-1])
        return calls


def partial_marker(text: str) -> int:
    """How many of text's last characters could begin <tool_call>."""
    return next((n for n in range(min(len(text), len(CALL_OPEN) - 1), 0, -1)
                 if CALL_OPEN.startswith(text[-n:])), 0)


def message(content: str, calls: list) -> dict:
    """A chat reply's message: its text, and its tool calls if it made any (then no text is None,
    not "")."""
    if not calls:
        return dict(role="assistant", content=content)
    return dict(role="assistant", content=content if content.strip() else None,
                tool_calls=[{k: v for k, v in c.items() if k != "index"} for c in calls])
