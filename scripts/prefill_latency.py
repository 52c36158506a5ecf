"""Inter-token latency of streaming clients while a long prompt arrives, with and without chunked
prefill.

    python scripts/prefill_latency.py [--chunks 512 0] [--repeats 2] [-- SERVE.PY FLAGS, e.g. --compile]

Starts serve.py once per --chunks value (its --prefill_chunk; 0: each prompt at once), each on its
own port (an idle server costs nothing), then runs a trial on each in turn, --repeats rounds:
--clients clients stream greedy completions (ignore_eos); once each has its first --lead tokens, a
--prompt_tokens-token prompt (random ids, others each trial, so that the prefix cache holds none of
it) is sent for --long_tokens tokens. The gaps between the pieces of text each client receives, over
its next --window tokens from then on, are the inter-token latencies: p50, p99 and the longest, per
trial, beside the long prompt's time to first token. Ratios compare the trials of one round, run one
after the other. Needs httpx (requirements-test.txt).
"""
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli import ArgumentParser, BriskError, run_cli  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(chunk: int, serve_args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """serve.py --prefill_chunk chunk on a free port, once its /health answers: (process, url)."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", str(port),
                                 "--prefill_chunk", str(chunk), *serve_args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise BriskError(f"serve.py exited with {proc.returncode}: see {log}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                raise BriskError(f"serve.py did not answer in 900 s: see {log}") from None
            time.sleep(0.5)


async def stream(client: httpx.AsyncClient, body: dict, arrivals: list[float]) -> None:
    """A streamed completion: the time each piece of text arrives is appended to arrivals."""
    async with client.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
        if r.status_code != 200:
            raise BriskError(f"HTTP {r.status_code}: {(await r.aread())[:300].decode(errors='replace')}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices")
                if choices and choices[0].get("text"):
                    arrivals.append(time.perf_counter())


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def trial(url: str, model: str, args, seed: int) -> dict:
    """Clients stream; the long prompt joins them: the gaps of each client's next args.window
    tokens."""
    rng = random.Random(seed)
    # ids every vocabulary has
    long_ids = [rng.randrange(3, 256) for _ in range(args.prompt_tokens)]
    async with httpx.AsyncClient(base_url=url, timeout=None,
                                 limits=httpx.Limits(max_connections=16)) as client:
        arrivals = [[] for _ in range(args.clients)]
        bodies = [dict(model=model,
                       prompt=f"Story {seed}-{i}. Write a long story about a lighthouse keeper.",
                       max_tokens=args.lead + args.window + 16, temperature=0, ignore_eos=True)
                  for i in range(args.clients)]
        clients = [asyncio.create_task(stream(client, b, a)) for b, a in zip(bodies, arrivals)]
        while min(map(len, arrivals)) < args.lead:
            if any(c.done() for c in clients):
                await asyncio.gather(*clients)  # raises its error
            await asyncio.sleep(0.005)
        sent, long_arrivals = time.perf_counter(), []
        await stream(client, dict(model=model, prompt=long_ids, max_tokens=args.long_tokens,
                                  temperature=0),
                     long_arrivals)
        await asyncio.gather(*clients)
    gaps = []
    for a in arrivals:
        after = [i for i, t in enumerate(a) if t > sent]
        # the gap that ends at the first token after the prompt was sent counts
        first = max(after[0], 1)
        gaps += [a[i] - a[i - 1] for i in range(first, min(first + args.window, len(a)))]
    return dict(p50_ms=1000 * statistics.median(gaps), p99_ms=1000 * percentile(gaps, 0.99),
                max_ms=1000 * max(gaps), long_ttft_s=long_arrivals[0] - sent, gaps=len(gaps))


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 0],
                   help="the servers' --prefill_chunk values (default 512 0)")
    p.add_argument("--repeats", type=int, default=2, help="trials per server, in turn (default 2)")
    p.add_argument("--clients", type=int, default=4, help="streaming clients (default 4)")
    p.add_argument("--prompt_tokens", type=int, default=2000,
                   help="the long prompt's length (default 2000)")
    p.add_argument("--long_tokens", type=int, default=16,
                   help="tokens generated after it (default 16)")
    p.add_argument("--lead", type=int, default=8,
                   help="tokens each client has before it is sent (default 8)")
    p.add_argument("--window", type=int, default=64,
                   help="tokens of each client measured from then on (default 64)")
    p.epilog = "flags after -- go to serve.py (e.g. -- --compile --dtype float32)"
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.serve_args = argv[cut + 1:]
    if min(args.chunks) < 0 or min(args.repeats, args.clients, args.prompt_tokens, args.lead,
                                   args.window, args.long_tokens) < 1:
        raise BriskError("--chunks must be >= 0; the other counts at least 1")
    logs = Path(tempfile.mkdtemp(prefix="prefill_latency_"))
    servers = []
    try:
        # one after the other: a --compile server builds its step once, the next loads it
        for c in args.chunks:
            servers.append(start(c, args.serve_args, logs / f"serve_chunk{c}.log"))
        model = httpx.get(f"{servers[0][1]}/v1/models").json()["data"][0]["id"]
        print(f"{model}, {args.clients} streaming clients, a {args.prompt_tokens}-token prompt; serve.py "
              f"{' '.join(args.serve_args) or '(eager)'}; logs in {logs}", file=sys.stderr)
        # warm-up: first allocations, the prefill of a long prompt
        for i, (_, url) in enumerate(servers):
            asyncio.run(trial(url, model, args, seed=-1 - i))
        results = {c: [] for c in args.chunks}
        for r in range(args.repeats):
            for c, (_, url) in zip(args.chunks, servers):
                f = asyncio.run(trial(url, model, args,
                                      seed=r * len(args.chunks) + args.chunks.index(c)))
                results[c].append(f)
                print(f"round {r + 1}, --prefill_chunk {c:>4}: inter-token p50 {f['p50_ms']:6.1f} ms, "
                      f"p99 {f['p99_ms']:7.1f} ms, max {f['max_ms']:7.1f} ms ({f['gaps']} gaps); "
                      f"long prompt's TTFT {f['long_ttft_s']:.2f} s", flush=True)
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(60)
    base = args.chunks[-1]
    for c in args.chunks[:-1]:
        for key in ("p50_ms", "p99_ms", "max_ms", "long_ttft_s"):
            ratios = [a[key] / b[key] for a, b in zip(results[c], results[base])]
            print(f"--prefill_chunk {c} / {base}: {key} " + " ".join(f"{x:.2f}x" for x in ratios))


if __name__ == "__main__":
    run_cli(main)
