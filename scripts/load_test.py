"""Load an OpenAI-compatible server with concurrent streaming clients: requests/s, time to first
token and tokens/s.

    python serve.py --compile &
    python scripts/load_test.py --url http://127.0.0.1:8000 --clients 1 4 16
    llama-server -m model.gguf -np 8 --port 8001 &   # llama.cpp's server with 8 parallel sequences, a peer
    python scripts/load_test.py --url http://127.0.0.1:8001 --clients 1 4 16

For each number of clients, that many clients each send --requests_per_client streamed completions
one after another (different prompts, greedy, --max_tokens each, `ignore_eos` for servers that honor
it), after one warm-up request. Figures per level:
  requests/s            completed requests / wall time of the level
  total tokens/s        generated tokens of all requests / wall time
  time to first token   request sent -> first text received (median and 90th percentile)
  tokens/s per request  (tokens - 1) / (last text - first text), median: each client's decode rate
Tokens are the server's usage counts when it sends them (stream_options.include_usage), else text
chunks. Needs httpx (requirements-test.txt).
"""
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import ArgumentParser, BriskError, run_cli, save_atomic  # noqa: E402

TOPICS = ["a lighthouse keeper", "the first train to the coast", "a robot learning to paint",
          "an old map", "a city under snow", "a violin maker", "the last bookshop",
          "a comet over the desert", "a lost cat",
          "a chess tournament", "the night market", "a river that flows uphill", "a beekeeper",
          "a broken clock", "a letter from the future", "a mountain rescue"]


def prompt(i: int) -> str:
    return f"Story {i}. Write a short story about {TOPICS[i % len(TOPICS)]}. It begins:"


async def one(client: httpx.AsyncClient, args, i: int) -> dict:
    body = dict(model=args.model, prompt=prompt(i), max_tokens=args.max_tokens, temperature=0,
                stream=True, ignore_eos=True, stream_options=dict(include_usage=True))
    t0, first, chunks, usage = time.perf_counter(), None, 0, None
    for retry in (False, True):
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise BriskError(f"{args.url}: HTTP {r.status_code}: "
                                     f"{(await r.aread())[:300].decode(errors='replace')}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        chunks += 1
                        first = first or time.perf_counter()
            break
        except httpx.RemoteProtocolError:
            # a kept-alive connection the server closed (llama-server: after 5
            if retry or first is not None:  # requests): sent again once, as the openai client does
                raise
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    first = first or end
    return dict(ttft_s=first - t0, tokens=tokens, latency_s=end - t0,
                decode_tps=(tokens - 1) / (end - first) if tokens > 1 and end > first else None)


async def level(args, clients: int) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=None,
                                 limits=limits) as client:
        await one(client, args, 0)  # warm-up: a compile, a first allocation
        ids = iter(range(1, 1 + clients * args.requests_per_client))
        results = []

        async def worker():
            for i in ids:  # a shared iterator: each request goes to the next free client
                results.append(await one(client, args, i))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft_s"] for r in results)
    rates = [r["decode_tps"] for r in results if r["decode_tps"] is not None]
    return dict(clients=clients, requests=len(results), wall_s=wall,
                requests_per_s=len(results) / wall,
                total_tokens_per_s=sum(r["tokens"] for r in results) / wall,
                mean_tokens=statistics.mean(r["tokens"] for r in results),
                ttft_median_s=statistics.median(ttft),
                ttft_p90_s=ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
                tokens_per_s_per_request=statistics.median(rates) if rates else None,
                results=results)


def describe(f: dict) -> str:
    per = "n/a" if f["tokens_per_s_per_request"] is None else f"{f['tokens_per_s_per_request']:.1f}"
    return (f"{f['clients']:>3} clients: {f['requests']} requests in {f['wall_s']:.1f} s, "
            f"{f['requests_per_s']:.2f} req/s, {f['total_tokens_per_s']:.1f} tok/s total, "
            f"TTFT median {f['ttft_median_s'] * 1000:.0f} ms (p90 {f['ttft_p90_s'] * 1000:.0f} ms), "
            f"{per} tok/s per request, {f['mean_tokens']:.1f} tokens/request")


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--model", default=None,
                   help="model id (default: the first of the server's /v1/models)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16],
                   help="concurrency levels (default 1 4 16)")
    p.add_argument("--requests_per_client", type=int, default=4, help="default 4")
    p.add_argument("--max_tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--api_key", default=None)
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.add_argument("--force", action="store_true", help="overwrite --json")
    args = p.parse_args(argv)
    if min(args.clients) < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        raise BriskError("--clients, --requests_per_client and --max_tokens must be at least 1")
    if args.json is not None and args.json.exists() and not args.force:
        raise BriskError(f"{args.json} exists; pass --force to overwrite it")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=30)
    except httpx.TransportError as e:
        raise BriskError(f"cannot reach {args.url}: {e}") from None
    if models.status_code != 200:
        raise BriskError(f"{args.url}/v1/models: HTTP {models.status_code}: {models.text[:300]}")
    args.model = args.model or models.json()["data"][0]["id"]
    print(f"{args.url} serving {args.model}; {args.max_tokens} tokens per request", file=sys.stderr)
    levels = []
    for clients in args.clients:
        levels.append(asyncio.run(level(args, clients)))
        print(describe(levels[-1]))
    if args.json is not None:
        report = dict(url=args.url, model=args.model, max_tokens=args.max_tokens,
                      requests_per_client=args.requests_per_client, levels=levels)
        save_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=2)), args.force)


if __name__ == "__main__":
    run_cli(main)
