"""Prefill on the CPU: brisk's kernels against aten's many-row path, and a model's eager prefill
time.

    python scripts/prefill_bench.py products [--rows 16,64,512,2048] [--threads 2]
    python scripts/prefill_bench.py prefill --checkpoint_path P [--tokens 16,512,4096] [--threads 2]

`products`: SmolLM2-135M's shapes (576 -> 1728, 1728 -> 576, 576 -> 960), brisk's bf16, int8 and
int4 products (cpu_kernels.cpp, cpu_int4.cpp) against F.linear in bf16 and dequantize + GEMM,
alternated in one process, best of each; `prefill`: the model's forward over a random prompt from
position 0 (logits of the last position only), best of --repeats. One thread is timed in CPU time (a
shared machine's other processes do not count), more in wall time. Figures: BENCHMARKS.md,
"Split-invariant prefill".
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cpu  # noqa: E402
import quant  # noqa: E402
from checkpoint import load_model  # noqa: E402

SHAPES = [(576, 1728), (1728, 576), (576, 960)]  # (K, N) of SmolLM2-135M's w1/w3, w2 and wqkv


def best(f, clock, n: int) -> float:
    f()
    times = []
    for _ in range(n):
        start = clock()
        f()
        times.append(clock() - start)
    return min(times)


def products(rows: list, clock, repeats: int) -> None:
    isa = cpu.kernel_isa()
    for m in rows:
        for k, n in SHAPES:
            x, w = torch.randn(m, k).bfloat16(), (torch.randn(n, k) * 0.05).bfloat16()
            wq, scales = quant.int8_quantize(w.float())
            q, s, z = quant.int4_quantize(w.float(), 32)
            packed = torch.ops.brisk.int4_pack(q, quant.to_scales_and_zeros(s, z), 32)
            pairs = {  # (aten's many-row path, brisk's kernel)
                "bf16": (lambda: F.linear(x, w), lambda: torch.ops.brisk.rows_product(x, w, isa)),
                "int8": (lambda: F.linear(x, wq.to(x.dtype)) * scales.bfloat16(),
                         lambda: torch.ops.brisk.int8_rows_product(x, wq, scales.bfloat16(), isa)),
                "int4": (lambda: F.linear(x, quant.int4_dequantize(q, s, z, torch.bfloat16)),
                         lambda: torch.ops.brisk.int4_product(x, packed, 32, isa)),
            }
            for name, (aten, kernel) in pairs.items():
                ta = tb = float("inf")
                for _ in range(3):  # alternated
                    ta, tb = min(ta, best(aten, clock, repeats)), min(tb,
                                                                      best(kernel, clock, repeats))
                print(f"{name} rows {m:5d} {k:5d} -> {n:5d}: aten {ta * 1e3:7.2f} ms, kernel {tb * 1e3:7.2f} ms, "
                      f"kernel / aten {tb / ta:.2f}", flush=True)


def prefill(path: Path, tokens: list, clock, repeats: int) -> None:
    model = load_model(path, "cpu", torch.bfloat16)
    model.setup_caches(1, max(tokens))
    for t in tokens:
        ids = torch.randint(0, model.config.vocab_size, (1, t))
        with torch.no_grad():
            s = best(lambda: model(ids, torch.arange(t), logits_to_keep=1), clock, repeats)
        print(f"{path.name} prefill {t} tokens: {s * 1e3:.1f} ms", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["products", "prefill"])
    p.add_argument("--rows", default="16,64,512,2048")
    p.add_argument("--tokens", default="16,512,4096")
    p.add_argument("--checkpoint_path", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.what == "prefill" and args.checkpoint_path is None:
        p.error("prefill needs --checkpoint_path")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    if args.what == "products":
        products([int(r) for r in args.rows.split(",")], clock, args.repeats)
    else:
        prefill(args.checkpoint_path, [int(t) for t in args.tokens.split(",")], clock, args.repeats)


if __name__ == "__main__":
    main()
