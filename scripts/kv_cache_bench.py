"""The int8 KV cache (--kv_cache_dtype int8) against the model's own (bf16): greedy agreement,
memory and decode speed.

    python scripts/kv_cache_bench.py --agreement 100        # greedy continuations of 100 prompts, both caches
    python scripts/kv_cache_bench.py --lengths 1024,8192,32768 --rounds 5

--agreement N: N prompts (the first lines of N pydoc topics, quant.pydoc_text), each continued
greedily by --new_tokens tokens with each cache: the fraction of identical continuations and the
mean length of their common beginning (--against "int8,fp32 weights": also the fp32 model's, a
baseline: how often bf16 rounding flips one); also the error of the keys and values of those prompts
stored with an fp32 scale (brisk's) and with a bf16 one (2 bytes less per position and head).
--lengths: a cache of each length filled with random keys and values (no prefill: any length runs in
seconds), then eager decode steps of one token at its last position, which attend to the whole
cache; the two caches alternate in --rounds rounds of --steps steps (a shared machine drifts alike
for both): median ms per step and the caches' bytes (every layer's keys and values).
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import DEFAULT_CHECKPOINT, load_model  # noqa: E402
from cli import DTYPES, ArgumentParser, BriskError, run_cli  # noqa: E402
from cpu import kv_store  # noqa: E402
from engine import generate  # noqa: E402
from quant import pydoc_text  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

# the kinds of run compared: the model's own cache, the int8 one, and (a baseline of agreement) fp32
# weights and cache
CACHES = {"model dtype": None, "int8": torch.int8, "fp32 weights": None}


def models(args, names: list) -> dict:
    """One model per cache kind of names (the same weights), caches not yet set up."""
    out = {}
    for name in names:
        kv_cache_dtype = CACHES[name]
        dtype = torch.float32 if name == "fp32 weights" else DTYPES[args.dtype]
        out[name] = load_model(args.checkpoint_path, "cpu", dtype)
        out[name].kv_cache_dtype = kv_cache_dtype
    return out


def prompts(n: int) -> list[str]:
    lines = [line.strip() for line in pydoc_text(0).splitlines() if len(line.strip()) >= 60]
    if len(lines) < n:
        raise BriskError(f"only {len(lines)} prompts available")
    return lines[:: len(lines) // n][:n]


def scale_error(model, n: int) -> dict:
    """Relative RMS error of the first n positions' keys and values, as model's own cache holds
    them, stored in int8 with an fp32 scale per vector or a bf16 one."""
    errors = {"fp32 scale": [], "bf16 scale": []}
    for layer in model.layers:
        for c in (layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache):
            x = c[:, :, :n].float()  # [1, Hkv, n, D]
            d = x.abs().amax(-1, keepdim=True) / 127
            for name, scale in (("fp32 scale", d), ("bf16 scale", d.bfloat16().float())):
                y = torch.where(scale > 0, x / scale, 0).round().clamp(-127, 127) * scale
                errors[name].append(((y - x).pow(2).mean() / x.pow(2).mean()).sqrt().item())
    return {k: statistics.mean(v) for k, v in errors.items()}


def agreement(args) -> None:
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    ms = models(args, ["model dtype", *args.against])
    for m in ms.values():
        m.setup_caches(1, 256)
    same, common, errors = dict.fromkeys(args.against, 0), {name: [] for name in args.against}, []
    for text in prompts(args.agreement):
        ids = tokenizer.encode(text)[:48]
        rows = {name: generate(m, torch.tensor(ids), args.new_tokens, temperature=0.0)[0][0]
                for name, m in ms.items()}
        a = rows["model dtype"]
        for name in args.against:
            same[name] += a == rows[name]
            common[name].append(next((i for i, (x, y) in enumerate(zip(a, rows[name])) if x != y),
                                     len(a)))
        errors.append(scale_error(ms["model dtype"], len(ids)))
    n = args.agreement
    for name in args.against:
        print(f"greedy agreement of {name} with the model dtype's cache over {n} prompts, {args.new_tokens} new "
              f"tokens: {same[name]}/{n} identical, common beginning {statistics.mean(common[name]):.1f} tokens")
    for name in errors[0]:
        print(f"keys/values in int8 with a {name}: relative RMS error {statistics.mean(e[name] for e in errors):.5f}")


def speed(args) -> None:
    ms = models(args, ["model dtype", "int8"])
    print("| positions | cache | cache MiB | ms / step | int8 vs model dtype |")
    print("|---|---|---|---|---|")
    for S in args.lengths:
        times = {name: [] for name in ms}
        for m in ms.values():
            m.setup_caches(1, S)
            for layer in m.layers:
                for c in (layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache):
                    c.copy_(kv_store(torch.randn(*c.shape[:-1], m.config.head_dim), c.dtype))
        x, pos = torch.tensor([[1]]), torch.tensor([S - 1])
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, m in ms.items():
                    m(x, pos)  # warm
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        m(x, pos)
                    times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        med = {name: statistics.median(t) for name, t in times.items()}
        for name, m in ms.items():
            caches = [c for layer in m.layers
                      for c in (layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache)]
            mib = sum(c.numel() * c.element_size() for c in caches) / 2**20
            dtype = str(caches[0].dtype).removeprefix("torch.")
            ratio = f"{med['model dtype'] / med[name]:.2f}x speed" if name == "int8" else ""
            print(f"| {S} | {dtype} | {mib:.0f} | {med[name]:.1f} | {ratio} |")
        for m in ms.values():  # free this length's caches before the next
            m.setup_caches(1, 1)


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="default bfloat16")
    p.add_argument("--agreement", type=int, default=None,
                   help="this many prompts for greedy agreement")
    p.add_argument("--against", type=lambda s: s.split(","), default=["int8"],
                   help="agreement: runs compared with the model dtype's, comma-separated: int8, fp32 weights "
                        "(default int8)")
    p.add_argument("--new_tokens", type=int, default=32,
                   help="agreement: tokens per continuation (default 32)")
    p.add_argument("--lengths", type=lambda s: [int(n) for n in s.split(",")], default=None,
                   help="comma-separated cache lengths for memory and speed")
    p.add_argument("--rounds", type=int, default=5, help="speed: alternating rounds (default 5)")
    p.add_argument("--steps", type=int, default=5, help="speed: decode steps per round (default 5)")
    args = p.parse_args(argv)
    if args.agreement is None and args.lengths is None:
        raise BriskError("give --agreement N and/or --lengths")
    if set(args.against) - set(CACHES) - {"model dtype"}:
        raise BriskError(f"--against takes int8 and 'fp32 weights', got {','.join(args.against)}")
    if args.agreement:
        agreement(args)
    if args.lengths:
        speed(args)


if __name__ == "__main__":
    run_cli(main)
