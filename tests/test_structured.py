"""structured.py: grammars that mask a row's logits (llguidance, the default model's real
tokenizer), tools in the prompt, tool calls parsed out of replies; then greedy decodes of the real
model under the mask, whose outputs parse and validate."""
import json
from typing import Annotated, Literal

import pydantic
import pytest
import torch

import structured as st
from batch import Batch
from checkpoint import load_model
from helpers import Person
from tokenizer import load_tokenizer


class Badge(pydantic.BaseModel):
    """Bounded everywhere (no other keys either), so that random draws end."""
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=150)
    role: Literal["admin", "user"]
    tags: list[Annotated[str, pydantic.Field(max_length=5)]] = pydantic.Field(max_length=3)


class Weather(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str
    unit: Literal["celsius", "fahrenheit"]


def tool(name: str, params: type) -> st.Tool:
    return st.Tool(type="function", function=st.Function(name=name,
                                                         description=f"{name} of a place",
                                                         parameters=params.model_json_schema()))


TOOLS = [tool("get_weather", Weather), tool("get_person", Person)]
WEATHER = [dict(role="user", content="What is the weather in Paris, in celsius?")]


def json_schema(model: type) -> st.ResponseFormat:
    return st.ResponseFormat(type="json_schema", json_schema=st.JsonSchema(name=model.__name__,
                                                                           schema=model.model_json_schema()))


@pytest.fixture(scope="module")
def tok(real_checkpoint):
    return load_tokenizer(real_checkpoint.parent)


@pytest.fixture(scope="module")
def grammars(tok):
    return st.Grammars(tok)


@pytest.fixture(scope="module")
def decode(real_checkpoint, tok, grammars):
    """decode(spec, messages, max_tokens) -> the greedy reply of the real model (fp32, CPU) under
    spec's mask."""
    batch = Batch(load_model(real_checkpoint, "cpu", torch.float32), 1, 1024)

    def run(spec: st.Spec, messages: list, max_tokens: int = 150) -> str:
        messages, tools = spec.prompt(messages)
        constraint, out = spec.constraint(), []
        row = batch.add(tok.encode_chat(messages, tools=tools))
        logits = batch.last_logits(row)
        while len(out) < max_tokens:
            token = int((logits if constraint is None else constraint.mask(logits)).argmax())
            out.append(token)
            if constraint is not None:
                constraint.accept(token)
            if token in tok.eos_ids or (constraint is not None and constraint.done):
                break
            logits = batch.step({row: token})[row]
        batch.remove(row)
        return tok.decode([t for t in out if t not in tok.eos_ids])
    return run


def render(tok, spec: st.Spec, messages: list, **kwargs) -> str:
    messages, tools = spec.prompt(messages)
    return tok.apply_chat_template(messages, tools=tools, **kwargs)


def parse(parser: st.ToolParser, text: str, piece: int = 0) -> tuple:
    """(content, calls) of text pushed whole (piece 0) or `piece` characters at a time."""
    pieces = [text] if not piece else [text[i:i + piece] for i in range(0, len(text), piece)]
    content, calls = "", []
    for p in pieces + [None]:
        c, k = parser.push(p) if p is not None else parser.finish()
        content, calls = content + c, calls + k
    return content, [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                     for c in calls]


# --------------------------------------------------------------------------------------------------
# Tool calls out of text

@pytest.mark.parametrize("piece", [0, 1, 3])
def test_tool_call_blocks_become_calls_and_the_rest_content_streamed_or_not(piece):
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_person", "arguments": {"name": "Ada"}}\n</tool_call>')
    content, calls = parse(st.ToolParser({"get_weather", "get_person"}), text, piece)
    assert content == "Let me look.\n\n"
    assert calls == [(0, "get_weather", dict(city="Paris", unit="celsius")),
                     (1, "get_person", dict(name="Ada"))]


@pytest.mark.parametrize("piece", [0, 1])
def test_text_that_only_looks_like_a_call_stays_content(piece):
    names = {"get_weather"}
    for text in ['a < b and <tool_ is not <tool_call',
                 '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
                 '<tool_call>{not json}</tool_call> after', '{"name": "other"}', '[1, 2]',
                 'plain text']:
        assert parse(st.ToolParser(names), text, piece) == (text, [])


def test_a_reply_that_is_all_json_is_read_as_calls_llama_style():
    names = {"get_weather"}
    assert parse(st.ToolParser(names), ' {"name": "get_weather", "parameters": {"city": "Oslo"}}',
                 2) == \
        ("", [(0, "get_weather", dict(city="Oslo"))])
    two = '[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_weather", "arguments": "{}"}]'
    assert parse(st.ToolParser(names), two)[1] == [(0, "get_weather", dict(city="A")),
                                                   (1, "get_weather", {})]
    # a call cut off before its closing tag (the model stopped at end of turn) is still a call
    assert parse(st.ToolParser(names),
                 'ok <tool_call>\n{"name": "get_weather", "arguments": {}}\n') == \
        ("ok ", [(0, "get_weather", {})])


# --------------------------------------------------------------------------------------------------
# Requests: checks, and tools in the prompt

@pytest.mark.parametrize("kwargs,param", [
    (dict(response_format=st.ResponseFormat(type="json_schema", json_schema=st.JsonSchema(
        schema=dict(type="object", properties=dict(a=dict(type="integer", minimum="x")))))),
     "response_format"),
    (dict(response_format=st.ResponseFormat(type="json_schema",
                                            json_schema=st.JsonSchema(schema=dict(type="foo")))),
     "response_format"),
    (dict(tools=[st.Tool(type="function",
                         function=st.Function(name="f", parameters={"$ref": "#/nowhere"}))]),
     "tools[0].function.parameters"),
    (dict(tools=TOOLS, tool_choice=st.NamedToolChoice(type="function",
                                                      function=st.FunctionName(name="nope"))),
     "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="required",
          response_format=st.ResponseFormat(type="json_object")),
     "response_format"),
])
def test_invalid_requests_are_refused_with_the_parameter_at_fault(grammars, kwargs, param):
    with pytest.raises(st.RequestError) as e:
        st.Spec(grammars, **kwargs)
    assert e.value.param == param and e.value.message.startswith(param.split("[")[0])


def test_a_tool_message_must_answer_an_earlier_call(grammars):
    call = st.ToolCall(id="call_1", function=st.FunctionCall(name="get_weather", arguments="{}"))
    answered = WEATHER + [dict(role="assistant", content=None, tool_calls=[call]),
                          dict(role="tool", tool_call_id="call_1", content="sunny")]
    st.Spec(grammars, tools=TOOLS).prompt(answered)
    for bad in ("call_2", None):
        with pytest.raises(st.RequestError, match="tool_call_id"):
            st.Spec(grammars, tools=TOOLS).prompt(answered[:2]
                                                  + [dict(role="tool", tool_call_id=bad,
                                                          content="x")])


def test_a_template_without_tools_gets_the_generic_format(tok, grammars):
    assert not tok.has_tool_format()  # SmolLM2-135M-Instruct's template
    call = st.ToolCall(id="call_1", function=st.FunctionCall(name="get_weather",
                                                             arguments='{"city": "Paris"}'))
    messages = [dict(role="system", content="Be brief.")] + WEATHER + [
        dict(role="assistant", content=None, tool_calls=[call]),
        dict(role="tool", tool_call_id="call_1", content="21")]
    text = render(tok, st.Spec(grammars, tools=TOOLS), messages)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and text.count("<|im_start|>system") == 1
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather", ' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n21\n</tool_response><|im_end|>\n') in text
    # no tools (or tool_choice none): the prompt is the plain conversation's
    for spec in (st.Spec(grammars), st.Spec(grammars, tools=TOOLS, tool_choice="none")):
        assert render(tok, spec, WEATHER) == tok.apply_chat_template(WEATHER)


def test_a_template_with_tools_renders_them_itself(tok, grammars, monkeypatch):
    template = ("{% if tools %}TOOLS{{ tools | map(attribute='function.name') | list | tojson }}{% endif %}"
                "{% for m in messages %}[{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}"
                "{{ c.function.name }}{{ c.function.arguments.city }}{% endfor %}]{% endfor %}")
    monkeypatch.setattr(tok, "chat_template", template)
    assert tok.has_tool_format()
    call = st.ToolCall(id="c", function=st.FunctionCall(name="get_weather",
                                                        arguments='{"city": "Oslo"}'))
    messages = WEATHER + [dict(role="assistant", content=None, tool_calls=[call]),
                          dict(role="tool", tool_call_id="c", content="21")]
    assert render(tok, st.Spec(grammars, tools=TOOLS), messages, add_generation_prompt=False) == \
        f'TOOLS["get_weather", "get_person"][user:{WEATHER[0]["content"]}][assistant:get_weatherOslo][tool:21]'


# --------------------------------------------------------------------------------------------------
# The mask

def test_the_mask_leaves_allowed_logits_as_they_were_and_forbids_the_rest(tok, grammars):
    constraint = st.Spec(grammars, json_schema(Weather)).constraint()
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(0))
    masked = constraint.mask(logits)
    allowed = masked > -torch.inf
    assert torch.equal(masked[allowed], logits[allowed]) and logits is not masked
    starts = [tok.decode([i]) for i in allowed.nonzero().flatten().tolist()]
    # the reply can only begin so
    assert starts and all('{"city": '.startswith(s) for s in starts), starts
    # padded vocabularies: never past it
    assert constraint.mask(torch.randn(49160))[49152:].eq(-torch.inf).all()


@pytest.mark.parametrize("seed", range(2))
def test_any_draw_under_the_mask_is_valid_json_of_the_schema(tok, grammars, seed):
    """Random logits, sampled: whatever the model would say, the reply parses and validates."""
    g = torch.Generator().manual_seed(seed)
    constraint, out = st.Spec(grammars, json_schema(Badge)).constraint(), []
    while not constraint.done and len(out) < 200:
        token = int(torch.multinomial(torch.softmax(constraint.mask(torch.randn(49152, generator=g) * 3), -1), 1,
                                      generator=g))
        out.append(token)
        constraint.accept(token)
    assert constraint.done
    Badge.model_validate_json(tok.decode([t for t in out if t not in tok.eos_ids]))


# --------------------------------------------------------------------------------------------------
# The real model, greedy, under the mask

def test_greedy_json_schema_reply_validates(decode, grammars):
    person = [dict(role="user", content="Describe Ada, a 36 year old admin, as JSON.")]
    text = decode(st.Spec(grammars, json_schema(Person)), person)
    assert Person.model_validate_json(text) == Person(name="Ada", age=36, role="admin"), text


def test_greedy_json_object_reply_is_json(decode, grammars):
    text = decode(st.Spec(grammars, st.ResponseFormat(type="json_object")),
                  [dict(role="user", content="List three colors as a JSON object.")])
    assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("choice", ["required",
                                    st.NamedToolChoice(type="function", function=st.FunctionName(
    name="get_weather"))])
def test_greedy_required_or_named_tool_call_has_arguments_of_its_schema(decode, grammars, choice):
    spec = st.Spec(grammars, tools=TOOLS, tool_choice=choice)
    content, calls = parse(spec.parser(), decode(spec, WEATHER))
    assert content == "" and [c[1] for c in calls] == ["get_weather"]
    assert Weather.model_validate(calls[0][2]) == Weather(city="Paris", unit="celsius")

