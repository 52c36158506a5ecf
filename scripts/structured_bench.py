"""The cost of structured output: a grammar's mask per token in-process, and json_schema requests
against plain ones on a running OpenAI-compatible server (serve.py, llama-server), alternated in one
run.

    python scripts/structured_bench.py --mask                      # llguidance on the default model's vocabulary
    python scripts/structured_bench.py --url http://127.0.0.1:8000 --rounds 5

--mask: build the default model's grammar vocabulary, compile a JSON schema, then force a reply of
that schema token by token through the model (eager, one row): the time of Constraint.mask (the
llguidance bitmask and its -inf fill of a [V] logits row), of accept, and of the decode step beside
them. --url: greedy chat requests streamed one at a time, a plain one (ignore_eos, the same
max_tokens) then one with response_format json_schema, --rounds times; per request the decode rate
(tokens - 1) / (last text - first text), medians printed side by side. Needs httpx
(requirements-test.txt).
"""
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402
import structured  # noqa: E402
from batch import Batch  # noqa: E402
from checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from cli import DTYPES, ArgumentParser, BriskError, run_cli  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

SCHEMA = dict(type="object", additionalProperties=False,
              required=["name", "age", "role", "email", "city", "skills"],
              properties=dict(name=dict(type="string"), age=dict(type="integer"),
                              role=dict(enum=["admin", "user"]), email=dict(type="string"),
                              city=dict(type="string"),
                              skills=dict(type="array", items=dict(type="string"), maxItems=3)))
REPLY = dict(name="Ada Lovelace", age=36, role="admin", email="ada@example.com", city="London",
             skills=["mathematics", "engines", "poetry"])
MESSAGES = [dict(role="user",
                 content="Describe Ada Lovelace, a 36 year old admin from London, as JSON with her "
                         "email and three skills.")]


def mask_cost(rounds: int, dtype: str) -> None:
    tok = load_tokenizer(DEFAULT_CHECKPOINT.parent)
    t0 = time.perf_counter()
    grammars = structured.Grammars(tok)
    grammars.lltok
    print(f"vocabulary of {tok.vocab_size} tokens built in {time.perf_counter() - t0:.2f} s")
    batch = Batch(engine.load(DEFAULT_CHECKPOINT, torch.device("cpu"), DTYPES[dtype]), 1, 512)
    fmt = structured.ResponseFormat(type="json_schema",
                                    json_schema=structured.JsonSchema(schema=SCHEMA))
    ids, prompt = tok.encode(json.dumps(REPLY)), tok.encode_chat(MESSAGES)
    compiles, steps, masks, accepts = [], [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        constraint = structured.Spec(grammars, fmt).constraint()
        compiles.append(time.perf_counter() - t0)
        row = batch.add(prompt)
        logits = batch.last_logits(row)
        for token in ids:  # the reply forced token by token: a step, its mask, the accept
            t0 = time.perf_counter()
            constraint.mask(logits)
            t1 = time.perf_counter()
            constraint.accept(token)
            t2 = time.perf_counter()
            logits = batch.step({row: token})[row]
            masks.append(t1 - t0), accepts.append(t2 - t1), steps.append(time.perf_counter() - t2)
        batch.remove(row)
        if constraint.matcher.is_error():
            raise BriskError(f"the reply does not follow the schema: {constraint.matcher.get_error()}")
    us = lambda xs: f"median {statistics.median(xs) * 1e6:.0f} us, mean {statistics.mean(xs) * 1e6:.0f} us"  # noqa
    print(f"schema compiled (checked, matcher made): {us(compiles)}")
    print(f"mask per token ({len(ids)} tokens x {rounds}): {us(masks)}, max {max(masks) * 1e6:.0f} us")
    print(f"accept per token: {us(accepts)}")
    print(f"decode step ({dtype}, eager, 1 row): {us(steps)}; mask + accept / step: "
          f"{(sum(masks) + sum(accepts)) / sum(steps):.2%} (sums), "
          f"{(statistics.median(masks) + statistics.median(accepts)) / statistics.median(steps):.2%} (medians)")


def rate(client: httpx.Client, model: str, max_tokens: int, schema: bool) -> tuple:
    """(tokens, decode tokens/s) of one streamed greedy chat request."""
    body = dict(model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options=dict(include_usage=True))
    if schema:
        body["response_format"] = dict(type="json_schema",
                                       json_schema=dict(name="person", schema=SCHEMA, strict=True))
    else:
        body["ignore_eos"] = True
    first = last = usage = None
    text = ""
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise BriskError(f"HTTP {r.status_code}: {r.read()[:300].decode(errors='replace')}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                text += chunk["choices"][0]["delta"]["content"]
                first, last = first or time.perf_counter(), time.perf_counter()
    if schema:
        json.loads(text)  # the reply must be whole JSON: else raise
    return usage["completion_tokens"], (usage["completion_tokens"] - 1) / (last - first)


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mask", action="store_true", help="measure the mask in-process")
    p.add_argument("--url", default=None, help="a running server's address")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="the model's id on the server")
    p.add_argument("--rounds", type=int, default=5,
                   help="pairs of requests (or mask walks) (default 5)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="--mask's model (default bf16)")
    args = p.parse_args(argv)
    if args.mask:
        mask_cost(args.rounds, args.dtype)
    if args.url:
        # a connection per request: llama-server closes kept-alive ones after a few requests
        with httpx.Client(base_url=args.url, timeout=600,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            rate(client, args.model, 8, False)  # warm-up
            n, _ = rate(client, args.model, 200, True)
            plain, constrained = [], []
            for _ in range(args.rounds):
                plain.append(rate(client, args.model, n, False)[1])
                constrained.append(rate(client, args.model, 200, True)[1])
        a, b = statistics.median(plain), statistics.median(constrained)
        print(f"{args.url}: plain {a:.1f} tok/s, json_schema {b:.1f} tok/s ({n} tokens; json_schema/plain {b / a:.3f})")


if __name__ == "__main__":
    run_cli(main)
