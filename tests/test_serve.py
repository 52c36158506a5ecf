"""serve.py: one server on a tiny random model, started as a user would, driven by the official
`openai` client (and httpx for what a client library would refuse to send). Greedy answers are
checked against generate() alone."""
import concurrent.futures
import json
import math
import signal
import socket
import threading
import time
from typing import Literal

import httpx
import openai
import pydantic
import pytest
import torch

import serve
import structured
from checkpoint import load_model
from conftest import assert_one_line_error, make_checkpoint, run_script
from helpers import Person, start_server
from cli import TextStream
from engine import generate
from prefix_cache import PrefixBatch, PrefixCache, model_meta
from tokenizer import load_tokenizer

KEY = "test-key"
CONTEXT = 1024  # --max_seq_length
BUDGET_MB = 0.5  # a small prefix cache, full after a few hundred short prompts
PROMPTS = ["The quick brown fox", "Once upon a time", "def forward(self, x):", "Grüße aus München",
           "numbers 0123", "a little model", "jumps over the lazy dog", "emoji 🙂 and"]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", block_size=CONTEXT)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """The running serve.py process."""
    proc = start_server(["--checkpoint_path", ckpt, "--dtype", "float32", "--max_batch_size", 4,
                         "--max_seq_length", CONTEXT, "--cache_budget_mb", BUDGET_MB, "--api_key",
                         KEY],
                        tmp_path_factory.mktemp("log") / "serve.log")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(ckpt):
    """text(ids, max_tokens, stops) -> (text, finish_reason, tokens) of greedy generate() alone."""
    model, tok = load_model(ckpt, "cpu", torch.float32), load_tokenizer(ckpt.parent)
    model.setup_caches(1, CONTEXT)

    def text(ids, max_tokens, stops=()):
        stream = TextStream(tok, stops)
        rows, _ = generate(model, torch.tensor(ids), max_tokens, eos_ids=tok.eos_ids,
                               on_token=lambda r, t: stream.push(t), temperature=0)
        reason = "stop" if rows[0][-1] in tok.eos_ids or stream.stopped else "length"
        return stream.finish(), reason, rows[0]

    @torch.no_grad()
    # log-softmax [len(tokens), V] of the logits each token was chosen from
    def logprobs(ids, tokens):
        logits = model(torch.tensor([ids + tokens]), torch.arange(len(ids) + len(tokens)))[0]
        return logits[len(ids) - 1:-1].float().log_softmax(-1)

    @torch.no_grad()
    # greedy, OpenAI's penalties written out here
    def penalized(ids, max_tokens, presence=0.0, frequency=0.0):
        tokens = []
        while len(tokens) < max_tokens and (not tokens or tokens[-1] not in tok.eos_ids):
            logits = model(torch.tensor([ids + tokens]),
                           torch.arange(len(ids) + len(tokens)))[0, -1]
            counts = torch.bincount(torch.tensor(tokens, dtype=torch.long),
                                    minlength=logits.numel())
            tokens.append(int((logits - frequency * counts - presence * (counts > 0).float()).argmax()))
        return tok.decode([t for t in tokens if t not in tok.eos_ids]), tokens
    text.tok, text.logprobs, text.penalized = tok, logprobs, penalized
    return text


def health(server) -> dict:
    return httpx.get(f"{server.url}/health").json()


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_streamed_or_not_is_greedy_generate_alone(client, reference):
    want, reason, tokens = reference(reference.tok.encode(PROMPTS[0]), 12)
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert got.choices[0].text == want and got.choices[0].finish_reason == reason
    assert got.usage.prompt_tokens == len(reference.tok.encode(PROMPTS[0]))
    assert got.usage.completion_tokens == len(tokens)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert [c.choices[0].finish_reason for c in chunks][-1] == reason


def test_chat_uses_the_models_template_streamed_or_not(client, reference):
    messages = [dict(role="system", content="Be brief."), dict(role="user", content=PROMPTS[1])]
    want, reason, _ = reference(reference.tok.encode_chat(messages), 10)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                         temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].finish_reason == reason
    assert got.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options=dict(include_usage=True)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens and not chunks[-1].choices


def test_a_conversations_next_turn_restores_its_prompt_from_the_prefix_cache(client, reference):
    messages = [dict(role="user",
                     content="A long first message that the second turn repeats. " * 4)]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                           temperature=0)
    messages += [dict(role="assistant", content=first.choices[0].message.content),
                 dict(role="user", content="And?")]
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                            temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert second.choices[0].message.content == reference(reference.tok.encode_chat(messages), 5)[0]


def test_a_long_prompt_joining_a_streamed_request_answers_as_alone(client, reference):
    """The default --prefill_chunk (512) puts a 700-token prompt in over two iterations while a
    streamed request decodes (in-process, test_a_long_prompt_goes_in_chunk_by_chunk_...): each gets
    the answer it gets alone."""
    ids = torch.randint(3, 320, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    kw = dict(model="tiny", prompt=PROMPTS[3], max_tokens=100, temperature=0,
              extra_body=dict(ignore_eos=True))
    stream = client.completions.create(stream=True, **kw)
    text = next(stream).choices[0].text
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=10,
                                    temperature=0).choices[0].text
    text += "".join(c.choices[0].text for c in stream)
    assert got == reference(ids, 10)[0]
    assert text == client.completions.create(**kw).choices[0].text


def test_eight_concurrent_requests_each_get_their_sequential_answer(client, server, reference):
    def ask(i: int) -> str:
        kw = dict(model="tiny", prompt=PROMPTS[i], max_tokens=20 + 5 * i, temperature=0)
        if i % 2:  # half of them streamed
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return client.completions.create(**kw).choices[0].text

    sequential = [ask(i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # 4 rows: half of them queue at first
        concurrent_ = list(pool.map(ask, range(8)))
    assert concurrent_ == sequential
    assert sequential == [reference(reference.tok.encode(p), 20 + 5 * i)[0]
                          for i, p in enumerate(PROMPTS)]
    assert health(server)["rows_busy"] == 0


def test_n_choices_and_seeded_sampling(client, reference):
    greedy = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                       n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text == reference(reference.tok.encode(PROMPTS[2]), 8)[0]
    kw = dict(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=1.0, top_p=0.95, n=2,
              seed=7, extra_body=dict(top_k=50))
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the seed decides
    assert a.choices[0].text != a.choices[1].text  # each choice draws its own tokens
    chunks = list(client.completions.create(stream=True, **kw))
    assert ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i)
            for i in (0, 1)] == \
           [c.text for c in a.choices]


def test_stop_strings_end_the_text_before_them(client, reference):
    full, _, _ = reference(reference.tok.encode(PROMPTS[3]), 30)
    stop = full[10:12]
    want = full[:full.find(stop)]
    got = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=30, temperature=0,
                                    stop=[stop, "@@"])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=30,
                                       temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want


def test_chat_logprobs_are_one_per_token_of_the_models_distribution(client, reference):
    """Each generated token's logprob and its most likely alternatives', as the model alone gives
    them (after a row's processors, before temperature and truncation); the greedy token is the most
    likely one."""
    messages = [dict(role="user", content=PROMPTS[4])]
    want, _, tokens = reference(reference.tok.encode_chat(messages), 12)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                         temperature=0, logprobs=True, top_logprobs=3)
    assert got.choices[0].message.content == want  # logprobs change nothing
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens == len(tokens)
    lp = reference.logprobs(reference.tok.encode_chat(messages), tokens)
    for i, (entry, token) in enumerate(zip(content, tokens)):
        assert entry.token == reference.tok.decode([token]) and bytes(entry.bytes) == entry.token.encode()
        assert entry.logprob == pytest.approx(float(lp[i, token]), abs=1e-4)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(lp[i].topk(3).values.tolist(), abs=1e-4)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                                 temperature=0, logprobs=True, top_logprobs=3,
                                                 stream=True))
    streamed = [e for c in chunks for e in (c.choices[0].logprobs.content or [])]
    # the prompt restored: logits within rounding
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(client, reference):
    ids = reference.tok.encode(PROMPTS[5])
    want, _, tokens = reference(ids, 10)
    got = client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=10, temperature=0,
                                    logprobs=2)
    choice, lp = got.choices[0], reference.logprobs(ids, tokens)
    assert choice.text == want
    assert choice.logprobs.tokens == [reference.tok.decode([t]) for t in tokens]
    assert choice.logprobs.token_logprobs == pytest.approx([float(lp[i, t])
                                                            for i, t in enumerate(tokens)],
                                                           abs=1e-4)
    for i, (token, top) in enumerate(zip(choice.logprobs.tokens, choice.logprobs.top_logprobs)):
        # the greedy token is among the 2 most likely
        assert max(top, key=top.get) == token and len(top) == 2
    offsets = choice.logprobs.text_offset  # where each token's text starts in the choice's text
    assert offsets[0] == 0 and offsets == sorted(offsets)
    # a character split across tokens has no offset of its own
    assert [want[a:b] for a, b in zip(offsets, offsets[1:])] == choice.logprobs.tokens[:len(offsets) - 1] or \
        "\ufffd" in "".join(choice.logprobs.tokens)


def test_logit_bias_forbids_or_forces_tokens(client, reference):
    ids = reference.tok.encode(PROMPTS[0])
    _, _, tokens = reference(ids, 4)
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=0)
    banned = client.completions.create(logit_bias={str(tokens[0]): -100}, **kw).choices[0].logprobs.tokens
    assert banned[0] != reference.tok.decode([tokens[0]])
    forced = reference.tok.encode("fox")[0]
    got = client.completions.create(logit_bias={str(forced): 100}, **kw).choices[0].logprobs
    assert got.tokens == [reference.tok.decode([forced])] * 4
    # the bias is part of the distribution reported
    assert all(lp > -1e-3 for lp in got.token_logprobs)


@pytest.mark.parametrize("penalty", [dict(frequency=1.5), dict(presence=1.5)])
def test_presence_and_frequency_penalties_follow_openais_formula(client, reference, penalty):
    ids = reference.tok.encode(PROMPTS[6])
    want, tokens = reference.penalized(ids, 40, **penalty)
    assert tokens != reference.penalized(ids, 40)[1]  # the penalty changes the answer
    got = client.completions.create(model="tiny", prompt=PROMPTS[6], max_tokens=40, temperature=0,
                                    **{f"{k}_penalty": v for k, v in penalty.items()})
    assert got.choices[0].text == want


def test_min_p_1_keeps_only_the_most_likely_token(client, reference):
    want = reference(reference.tok.encode(PROMPTS[1]), 16)[0]
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=1.5, seed=3)
    assert client.completions.create(extra_body=dict(min_p=1.0), **kw).choices[0].text == want
    assert client.completions.create(**kw).choices[0].text != want  # sampled at 1.5 without it


def long_prompt() -> list:
    return [5] * (CONTEXT + 1)


WEATHER_SCHEMA = dict(type="object", properties=dict(city=dict(type="string", maxLength=20),
                                                    unit=dict(enum=["celsius", "fahrenheit"])),
                      required=["city", "unit"], additionalProperties=False)
WEATHER_TOOL = dict(type="function",
                    function=dict(name="get_weather", description="The weather in a city now",
                                  parameters=WEATHER_SCHEMA))

BAD = [  # (path, body, status, code)
    ("completions", b"{not json", 400, "invalid_json"),
    ("completions", b"[1, 2]", 400, "invalid_value"),
    ("completions", dict(prompt="hi"), 400, "missing_field"),
    ("completions", dict(model="tiny"), 400, "missing_field"),
    ("completions", dict(model="tiny", prompt=5), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", max_tokens="5"), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", max_tokens=0), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", temperature=-1), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", temperature=float("nan")), 400,
     "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", top_p=0), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", top_k=0), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", n=0), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", n=1000), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", stream="yes"), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", stop=["a", "b", "c", "d", "e"]), 400,
     "invalid_value"),
    ("completions", dict(model="tiny", prompt=[10**9]), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt=[]), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt=["a"] * 9, n=8), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="a" * (16 * 2**20)), 413, "body_too_large"),
    ("completions", dict(model="tiny", prompt=long_prompt()), 400, "context_length_exceeded"),
    ("completions", dict(model="gpt-4", prompt="hi"), 404, "model_not_found"),
    ("completions", dict(model="tiny", prompt="hi", echo=True), 400, "unsupported_parameter"),
    ("completions", dict(model="tiny", prompt="hi", logprobs=21), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", logit_bias={"320": 5}), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", logit_bias={"-1": 5}), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", logit_bias={"a": 5}), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", logit_bias={"5": 101}), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", presence_penalty=2.5), 400, "invalid_value"),
    ("completions", dict(model="tiny", prompt="hi", min_p=1.5), 400, "invalid_value"),
    ("chat/completions", dict(model="tiny", messages=[dict(role="user", content="hi")],
                              functions=[{}]), 400,
     "unsupported_parameter"),
    ("completions", dict(model="tiny", prompt="hi", response_format=dict(type="json_object")), 400,
     "unsupported_parameter"),
    ("chat/completions", dict(model="tiny", messages=[dict(role="user", content="hi")],
                              logprobs=True, top_logprobs=21), 400, "invalid_value"),
    ("chat/completions", dict(model="tiny", messages=[dict(role="user", content="hi")],
                              top_logprobs=2), 400,
     "invalid_value"),
    ("chat/completions", dict(model="tiny", messages=[]), 400, "invalid_value"),
    ("chat/completions", dict(model="tiny", messages=[dict(role="robot", content="hi")]), 400,
     "invalid_value"),
    ("chat/completions", dict(model="tiny", messages=[dict(role="user", content=5)]), 400,
     "invalid_value"),
    ("chat/completions", dict(model="tiny", messages="hi"), 400, "invalid_value"),
    ("chat/completions", dict(model="tiny", messages=[dict(role="user", content="x " * 2000)]), 400,
     "context_length_exceeded"),
    ("nowhere", dict(model="tiny"), 404, "not_found"),
    # structured output and tools (structured.py)
    ("chat/completions", dict(model="tiny", messages=[dict(role="user", content="hi")],
                              response_format=dict(
        type="json_schema", json_schema=dict(name="x",
                                             schema=dict(type="object",
                                                         properties=dict(a=dict(type=7)))))),
     400, "invalid_value"),
    ("chat/completions", dict(model="tiny", messages=[dict(role="user", content="hi")],
                              response_format=dict(type="yaml")), 400, "invalid_value"),
    ("chat/completions", dict(model="tiny", messages=[dict(role="user", content="hi")],
                              tools=[WEATHER_TOOL],
                              tool_choice=dict(type="function", function=dict(name="get_time"))),
     400, "invalid_value"),
    ("chat/completions", dict(model="tiny", messages=[dict(role="user", content="hi")],
                              tool_choice="required"), 400,
     "invalid_value"),
    ("chat/completions", dict(model="tiny", messages=[dict(role="user", content="hi"), dict(
        role="tool", tool_call_id="call_1", content="21")], tools=[WEATHER_TOOL]), 400,
     "invalid_value"),
    ("chat/completions", dict(model="tiny", messages=[dict(role="user", content="hi")], tools=[dict(
        type="function", function=dict(name="f", parameters=dict(type="object", required="a")))]),
     400, "invalid_value"),
]


@pytest.mark.parametrize("path,body,status,code", BAD,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, path, body, status,
                                                                       code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/{path}", content=content,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    assert health(server)["status"] == "ok" and server.poll() is None


def metrics(server) -> dict:
    """/metrics parsed: {(sample name, labels as a sorted tuple): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"{server.url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_tokens_latencies_and_cache_hits(server, client, reference):
    """A request moves each counter by what it did: its answer, its prompt, 6 tokens, 1 first-token
    and 5 inter-token latencies, a cache hit (asked before); a bad request is counted by its
    status."""
    kw = dict(model="tiny", prompt="metrics " * 8, max_tokens=6, temperature=0,
              extra_body=dict(ignore_eos=True))
    client.completions.create(**kw)
    before = metrics(server)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**kw, logit_bias={"-3": 1})
    client.completions.create(**kw)
    after = metrics(server)
    moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    prompt = len(reference.tok.encode(kw["prompt"]))
    assert moved[("brisk_requests_total", (("status", "400"),))] == 1
    # the request and the /metrics before it
    assert moved[("brisk_requests_total", (("status", "200"),))] == 1 + 1
    assert moved[("brisk_prompt_tokens_total", ())] == prompt
    assert moved[("brisk_generation_tokens_total", ())] == 6
    assert moved[("brisk_time_to_first_token_seconds_count", ())] == 1
    assert moved[("brisk_inter_token_latency_seconds_count", ())] == 5
    assert moved[("brisk_prefix_cache_hits_total", ())] == 1
    assert moved[("brisk_prefix_cache_hit_tokens_total", ())] == prompt - 1
    assert after[("brisk_rows_busy", ())] == 0 and after[("brisk_queue_length", ())] == 0


@pytest.mark.parametrize("args,message", [
    (["--port", "0"], "--port must be in 1..65535"),
    (["--max_batch_size", "0"], "--max_batch_size must be at least 1"),
    (["--max_seq_length", "5000"], "exceeds the model's block_size 1024"),
    (["--cache_budget_mb", "-1"], "--cache_budget_mb must be >= 0"),
    (["--queue_timeout", "0"], "--queue_timeout must be positive"),
    (["--prefill_chunk", "-1"], "--prefill_chunk must be >= 0"),
    (["--api_key", ""], "--api_key must not be empty"),
    (["--device", "tpu9"], "unknown device"),
    (["--host", "256.1.1.1"], "cannot listen on 256.1.1.1:"),
])
def test_bad_flags_are_one_line_errors(ckpt, args, message):
    assert_one_line_error(run_script("serve.py", "--checkpoint_path", ckpt, *args), message)


def test_the_api_key_is_required(server, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi")
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and the page need no key
    assert "<script>" in httpx.get(server.url).text


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, client, reference):
    before = health(server)["cancelled"]
    # without the disconnect the row would run to the end of its cache
    body = dict(model="tiny", prompt=PROMPTS[5], max_tokens=CONTEXT, ignore_eos=True, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while (h := health(server))["rows_busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h["rows_busy"] == 0 and h["cancelled"] == before + 1
    want = reference(reference.tok.encode(PROMPTS[6]), 10)[0]  # and it still answers correctly
    assert client.completions.create(model="tiny", prompt=PROMPTS[6], max_tokens=10,
                                     temperature=0).choices[0].text \
        == want


def test_a_thousand_short_requests_leak_neither_memory_nor_rows_nor_cache(server, client):
    def ask(i):
        out = client.completions.create(model="tiny", prompt=f"request {i}: hello", max_tokens=2,
                                        temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop")

    for i in range(200):  # fills the prefix cache to its budget; allocator pools warm up
        ask(i)
    start = rss_bytes(server.pid)
    for i in range(200, 1000):
        ask(i)
    grown = rss_bytes(server.pid) - start
    assert grown < 16 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 800 requests"
    h = health(server)
    assert h["rows_busy"] == 0 and h["queued"] == 0
    cache = h["prefix_cache"]
    assert 0 < cache["bytes"] <= cache["budget_bytes"] == int(BUDGET_MB * 2**20)
    assert cache["entries"] < 1000 / 2  # the oldest were evicted


def test_the_load_script_reports_each_level(server, tmp_path):
    out = tmp_path / "load.json"
    proc = run_script("scripts/load_test.py", "--url", server.url, "--api_key", KEY, "--clients", 1,
                      3, "--requests_per_client", 2, "--max_tokens", 5, "--json", out)
    assert proc.returncode == 0, proc.stderr
    levels = json.loads(out.read_text())["levels"]
    assert [(f["clients"], f["requests"]) for f in levels] == [(1, 2), (3, 6)]
    # ignore_eos: all 5
    assert all(r["tokens"] == 5 and r["ttft_s"] > 0 for f in levels for r in f["results"])
    assert len(proc.stdout.splitlines()) == 2 and "req/s" in proc.stdout


def test_the_prefill_latency_script_compares_chunk_sizes(ckpt):
    proc = run_script("scripts/prefill_latency.py", "--chunks", 64, 0, "--repeats", 1,
                      "--prompt_tokens", 300, "--window", 8, "--long_tokens", 2, "--",
                      "--checkpoint_path", ckpt, "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == [f"round 1, --prefill_chunk {c:>4}"
                                                          for c in (64, 0)]
    assert "(32 gaps)" in lines[0] and lines[2].startswith("--prefill_chunk 64 / 0: p50_ms ")


def test_a_constrained_row_leaves_the_plain_rows_beside_it_as_they_were(client, reference):
    """A json_schema request and a required tool call run in the batch with plain greedy ones: the
    plain answers are generate() alone's, the constrained ones follow their grammar (here a random
    model's: only the grammar speaks)."""
    answer = dict(type="json_schema",
                  json_schema=dict(name="answer", schema=dict(enum=["yes", "no"])))
    messages = [dict(role="user", content=p) for p in PROMPTS[:3]]

    def ask(i: int):
        kw = dict(model="tiny", messages=[messages[i % 3]], max_tokens=25, temperature=0)
        if i == 1:
            return client.chat.completions.create(response_format=answer, **kw).choices[0]
        if i == 3:
            return client.chat.completions.create(tools=[WEATHER_TOOL], tool_choice="required",
                                                  **dict(kw, max_tokens=300)).choices[0]
        return client.chat.completions.create(**kw).choices[0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        choices = list(pool.map(ask, range(4)))
    for i in (0, 2):
        assert choices[i].message.content == reference(reference.tok.encode_chat([messages[i]]),
                                                       25)[0]
    assert json.loads(choices[1].message.content) in ("yes", "no") and choices[1].finish_reason == "stop"
    call = choices[3].message.tool_calls[0]
    assert choices[3].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}


def test_a_constrained_rows_logprobs_are_over_the_tokens_its_grammar_allows(client):
    """Logprobs are taken after the grammar's mask: the few tokens that can go on with "yes" share
    all the probability (without the mask, a random model's spreads over its whole vocabulary)."""
    answer = dict(type="json_schema", json_schema=dict(name="answer", schema=dict(const="yes")))
    got = client.chat.completions.create(model="tiny",
                                         messages=[dict(role="user", content=PROMPTS[0])],
                                         max_tokens=10, temperature=0, response_format=answer,
                                         logprobs=True, top_logprobs=20).choices[0]
    assert got.message.content == '"yes"' and got.finish_reason == "stop"
    assert "".join(e.token for e in got.logprobs.content) == got.message.content
    for entry in got.logprobs.content:
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) == pytest.approx(1, abs=1e-3)


def test_sigterm_lets_running_requests_finish_then_exits_0(server, client, reference):
    """Last: it stops the module's server."""
    want = reference(reference.tok.encode(PROMPTS[7]), 100)[0]
    got = {}

    def ask():
        chunks = client.completions.create(model="tiny", prompt=PROMPTS[7], max_tokens=100,
                                           temperature=0, stream=True)
        got["text"] = "".join(c.choices[0].text for c in chunks)
    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + 30
    while not health(server)["rows_busy"] and time.monotonic() < deadline:
        time.sleep(0.01)
    server.send_signal(signal.SIGTERM)
    t.join(60)
    assert server.wait(60) == 0, server.log.read_text()
    assert got["text"] == want
    assert "Traceback" not in server.log.read_text()


# --------------------------------------------------------------------------------------------------
# The engine in-process: the batch's rows, the queue


def test_rows_that_join_and_leave_the_batch_are_each_generate_alone(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint, "cpu", torch.float32), load_tokenizer(tiny_checkpoint.parent)
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    model.setup_caches(1, 64)
    alone = [generate(model, torch.tensor(ids), 12, temperature=0)[0][0] for ids in prompts]
    batch = PrefixBatch(model, 2, 64)
    cache = PrefixCache([model], [model_meta(model, tiny_checkpoint)], 2**20)
    out = {}

    def add(ids):
        row = batch.add(ids, prefix=cache)
        out[row] = [int(batch.last_logits(row).argmax())]
        return row

    def step():
        for row, logits in batch.step({r: t[-1] for r, t in out.items() if len(t) < 12}).items():
            out[row].append(int(logits.argmax()))

    a = add(prompts[0])
    step(), step()
    b = add(prompts[1])  # joins two steps later
    while len(out[a]) < 12:
        step()
    first = out.pop(a)
    batch.remove(a)
    c = add(prompts[0])  # the same prompt again, into the freed row, restored from the prefix cache
    assert batch.cached[c] == len(prompts[0]) - 1
    while any(len(t) < 12 for t in out.values()):
        step()
    assert [first, out[b], out[c]] == [alone[0], alone[1], alone[0]]


def test_a_request_that_waits_too_long_for_a_row_gets_an_error(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint, "cpu", torch.float32), load_tokenizer(tiny_checkpoint.parent)
    scheduler = serve.Scheduler(PrefixBatch(model, 1, 256), tok, 1, None, queue_timeout=0.05)
    events = []

    def seq(index, max_tokens):  # ignore_eos: the first holds the only row for all its 250 tokens
        return serve.Seq(tok.encode("hi"), index, max_tokens, events.append, dict(temperature=0.0),
                         ignore_eos=True)
    loop = threading.Thread(target=scheduler.run)
    loop.start()
    try:
        scheduler.submit([seq(0, 250)])
        scheduler.submit([seq(1, 5)])
        deadline = time.monotonic() + 60
        while not any(isinstance(e, serve.Done) for e in events) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
        loop.join()
    errors = [e.error for e in events if isinstance(e, serve.Failed)]
    assert len(errors) == 1 and errors[0].status == 503 and errors[0].code == "queue_timeout"
    assert [(e.index, e.reason) for e in events if isinstance(e, serve.Done)] == [(0, "length")]


@pytest.mark.parametrize("chunk", [16, 0])
def test_a_long_prompt_goes_in_chunk_by_chunk_between_the_steps_of_a_streaming_row(tiny_checkpoint, chunk):
    """--prefill_chunk 16: a 100-token prompt joins a row that streams and goes into its own row 16
    tokens an iteration, the streaming row taking a token between every two chunks; its row decodes
    once it is all in. A prompt extending it is restored from the prefix cache: only its last 40
    tokens go in, chunked too. One cancelled after its first chunk frees its row and is not cached.
    0: each prompt at once. The scheduler is driven one iteration at a time; greedy answers are
    generate() alone's (chunks round differently, within fp32 rounding: test_batch.py, and move no
    argmax of this model's peaked logits)."""
    model, tok = load_model(tiny_checkpoint, "cpu", torch.float32), load_tokenizer(tiny_checkpoint.parent)
    g = torch.Generator().manual_seed(0)
    short, long, more, other = (torch.randint(3, 320, (n,), generator=g).tolist()
                                for n in (5, 100, 40, 100))
    prompts = [short, long, long + more, other]
    model.setup_caches(1, 256)
    alone = [generate(model, torch.tensor(ids), 12 if i else 90, temperature=0)[0][0]
             for i, ids in enumerate(prompts)]
    batch, cache = PrefixBatch(model, 3, 256), PrefixCache([model],
                                                           [model_meta(model, tiny_checkpoint)],
                                                           2**20)
    scheduler = serve.Scheduler(batch, tok, 3, cache, queue_timeout=60, prefill_chunk=chunk)
    seqs = [serve.Seq(ids, i, 12 if i else 90, lambda e: None, dict(temperature=0.0),
                      ignore_eos=True)
            for i, ids in enumerate(prompts)]
    fills = []  # (prompt, first position computed, end, tokens the streaming row has then)
    fill = batch.fill

    def logged(row, ids, n=None):
        start, ready = batch.pos[row], fill(row, ids, n)
        if batch.pos[row] > start:
            fills.append((prompts.index(ids), start, batch.pos[row], len(seqs[0].tokens)))
        return ready
    batch.fill = logged

    def run(until):
        while not until():
            scheduler.iteration()
    for i, until in enumerate([lambda: len(seqs[0].tokens) == 3, lambda: len(seqs[1].tokens) == 12,
                               lambda: len(seqs[2].tokens) == 12,
                               lambda: any(f[0] == 3 for f in fills)]):
        scheduler.submit([seqs[i]])
        run(until)
    seqs[3].cancelled = True
    run(lambda: len(seqs[0].tokens) == 90)
    spans = [[f[1:3] for f in fills if f[0] == i] for i in range(4)]
    assert spans[0] == [(0, 5)] and [s.cached for s in seqs] == [0, 0, 100, 0] and scheduler.cancelled == 1
    assert [s.tokens for s in seqs[:3]] == alone[:3] and len(batch) == 0
    if chunk:
        assert spans[1:] == [[(s, min(s + 16, 100)) for s in range(0, 100, 16)],
                             [(100, 116), (116, 132), (132, 140)], [(0, 16)]]
        streamed = [[f[3] for f in fills if f[0] == i] for i in (1, 2)]
        # one token between two chunks
        assert all(t == list(range(t[0], t[0] + len(t))) for t in streamed)
        # the cancelled prompt is not cached
        assert not seqs[3].tokens and cache.longest_prefix(other)[1] < 16
    else:
        assert spans[1:] == [[(0, 100)], [(100, 140)], [(0, 100)]]


def test_call_events_turn_a_choices_text_into_content_and_calls():
    events = []
    sink = serve.CallEvents(events.append,
                            {0: structured.ToolParser({"f"}), 1: structured.ToolParser({"f"})})
    failed = serve.Failed(serve.ServeError(500, "x"))
    for e in [serve.Text(0, "hi <tool", []), serve.Text(1, "no call", []),
              serve.Text(0, '_call>{"name": "f", "arguments": {}}', []),
              serve.Done(1, "stop", 3, 0, []), serve.Text(0, "</tool_call>", []),
              serve.Done(0, "stop", 9, 0, []), failed]:
        sink(e)
    assert [(type(e).__name__, getattr(e, "index", None)) for e in events] == [
        ("Text", 0), ("Text", 1), ("Done", 1), ("Calls", 0), ("Done", 0), ("Failed", None)]
    assert events[0].text == "hi " and events[2].reason == "stop" and events[4] == serve.Done(0, "tool_calls", 9, 0, [])
    assert events[3].calls[0]["function"] == dict(name="f", arguments="{}") and events[5] is failed
    message = structured.message("", events[3].calls)
    assert message["content"] is None and "index" not in message["tool_calls"][0]


def test_the_listening_socket_is_tcp_so_each_connection_sends_without_delay():
    """asyncio sets TCP_NODELAY only on sockets made with proto IPPROTO_TCP; with proto 0
    (socket.socket's default) Nagle's algorithm held each response's second segment until the
    client's delayed ACK: 40 ms a request."""
    sock = serve.listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


# --------------------------------------------------------------------------------------------------
# Structured output and tool calls with the real model, through the official client

class Weather(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str
    unit: Literal["celsius", "fahrenheit"]


ADA = [dict(role="user", content="Describe Ada, a 36 year old admin, as JSON.")]
PARIS = [dict(role="user", content="What is the weather in Paris, in celsius?")]


@pytest.fixture(scope="module")
def real_client(real_checkpoint, tmp_path_factory):
    """serve.py on SmolLM2-135M-Instruct, whose template has no tool format (the generic one
    serves)."""
    proc = start_server(["--checkpoint_path", real_checkpoint, "--dtype", "float32",
                         "--max_batch_size", 2, "--max_seq_length", 1024],
                        tmp_path_factory.mktemp("log") / "serve.log")
    yield openai.OpenAI(base_url=f"{proc.url}/v1", api_key="none", max_retries=0, timeout=300)
    proc.kill()
    proc.wait()


def chat(client, **kw):
    return client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, **kw)


def test_parse_returns_the_pydantic_object_streamed_or_not(real_client):
    got = real_client.chat.completions.parse(model="SmolLM2-135M-Instruct", messages=ADA,
                                             response_format=Person, temperature=0, max_tokens=100)
    assert got.choices[0].message.parsed == Person(name="Ada", age=36, role="admin")
    schema = dict(type="json_schema",
                  json_schema=dict(name="Person", schema=Person.model_json_schema(), strict=True))
    chunks = list(chat(real_client, messages=ADA, response_format=schema, max_tokens=100,
                       stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert Person.model_validate_json(text) == got.choices[0].message.parsed
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_content_is_json(real_client):
    got = chat(real_client, messages=[dict(role="user",
                                           content="List three colors as a JSON object.")],
               response_format=dict(type="json_object"), max_tokens=100)
    assert isinstance(json.loads(got.choices[0].message.content), dict)


@pytest.mark.parametrize("choice", ["required",
                                    dict(type="function", function=dict(name="get_weather"))])
def test_a_required_or_named_tool_call_then_its_result(real_client, choice):
    time_tool = dict(type="function",
                     function=dict(name="get_time", parameters=dict(type="object", properties={})))
    tools = [time_tool, WEATHER_TOOL]
    got = chat(real_client, messages=PARIS, tools=tools, tool_choice=choice,
               max_tokens=100).choices[0]
    assert got.finish_reason == "tool_calls" and got.message.content is None
    (call,) = got.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert Weather.model_validate_json(call.function.arguments) == Weather(city="Paris", unit="celsius")
    result = PARIS + [got.message, dict(role="tool", tool_call_id=call.id,
                                        content='{"celsius": 21, "sky": "sunny"}')]
    after = chat(real_client, messages=result, tools=tools, max_tokens=30).choices[0]
    assert after.message.content and after.finish_reason in ("stop", "length")


def test_a_streamed_tool_call_arrives_as_deltas(real_client):
    chunks = list(chat(real_client, messages=PARIS, tools=[WEATHER_TOOL], tool_choice="required",
                       max_tokens=100, stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert deltas and {d.index for d in deltas} == {0} and deltas[0].id.startswith("call_")
    assert deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert Weather.model_validate_json(arguments).city == "Paris"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
