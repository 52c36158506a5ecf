"""Greedy decoding of checkpoints on the CPU, alone or under torchrun with tp.py, for
tests/test_tp.py.

    torchrun --standalone --nproc_per_node 2 tests/tp_driver.py --out result.pt CHECKPOINT...

Rank 0 saves {checkpoint: {"logits": [steps, V], "tokens": [steps]} or {"error": message}} to --out.
--stall_after/--crash_after make rank 1 hang/exit after that many decode steps, to check that the
other ranks fail instead of waiting forever.

    torchrun ... tests/tp_driver.py --out result.pt --speculate "--draft int8 --temperature 0.8" ... CHECKPOINT

decodes with engine.generate and the speculator that generate.py's speculation flags (and
--temperature, --seed) build; rank 0 saves {(checkpoint, flags): {"tokens": [each rank's tokens],
"stats": speculator.stats}}.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine  # noqa: E402
import speculative  # noqa: E402
import tp  # noqa: E402
from checkpoint import load_config, load_model  # noqa: E402
from cli import BriskError, run_cli  # noqa: E402

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64]


@torch.no_grad()
def decode(checkpoint_path: Path, steps: int, compile: bool = False, loaded: bool = False,
           on_step=lambda step: None) -> dict:
    """Logits of the last prompt position and of each greedy step after it, [steps, V], and the
    tokens [steps]. `loaded`: split the model after loading it rather than while loading."""
    if loaded:
        model = load_model(checkpoint_path, "cpu", torch.float32)
        tp.apply_tp(model)
    else:
        model = load_model(checkpoint_path, "cpu", torch.float32, transform=tp.apply_tp)
    model.setup_caches(1, len(PROMPT) + steps)
    # aot_eager: the same tracing as Inductor (a graph break fails) without its minute of code
    # generation
    step = torch.compile(model, fullgraph=True, backend="aot_eager") if compile else model
    logits = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))[:, -1]  # [1, V]
    all_logits, tokens = [], []
    for i in range(steps):
        all_logits.append(logits[0])
        tokens.append(int(logits.argmax()))
        on_step(i)
        # a compiled model reads no position on the host: it is given attend_len
        pos = len(PROMPT) + i
        logits = step(torch.tensor([[tokens[-1]]]), torch.tensor([pos]),
                      attend_len=model.attend_len(pos))[:, -1]
    return dict(logits=torch.stack(all_logits), tokens=tokens)


def speculation_flags(text: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--draft_checkpoint_path", type=Path, default=None)
    p.add_argument("--draft", default=None)
    p.add_argument("--prompt_lookup", type=int, default=None)
    p.add_argument("--speculate_k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(text.split())


@torch.no_grad()
def speculate(checkpoint_path: Path, text: str, steps: int, world: int) -> dict:
    """`steps` tokens after PROMPT from engine.generate with the speculator built as generate.py
    builds it."""
    args = speculation_flags(text)
    args.checkpoint_path = checkpoint_path
    config = load_config(checkpoint_path)
    speculation = speculative.speculation(args, config, config.vocab_size, world)
    model = load_model(checkpoint_path, "cpu", torch.float32, transform=tp.apply_tp)
    max_seq_length = len(PROMPT) + steps + speculation.k
    model.setup_caches(1, max_seq_length)
    speculator = speculation.build(torch.device("cpu"), torch.float32, max_seq_length)
    torch.manual_seed(args.seed)
    rows, _ = engine.generate(model, torch.tensor(PROMPT), steps, speculator=speculator,
                              temperature=args.temperature, top_k=None)
    return dict(tokens=rows[0], stats=speculator.stats)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--loaded", action="store_true", help="split after loading")
    p.add_argument("--dist_timeout", type=float, default=None)
    p.add_argument("--stall_after", type=int, default=None)
    p.add_argument("--crash_after", type=int, default=None)
    p.add_argument("--speculate", action="append", default=[], metavar="FLAGS",
                   help="speculation flags as one string (repeatable): decode with them instead")
    args = p.parse_args()
    rank, world = tp.maybe_init_dist(args.dist_timeout)

    def on_step(i: int) -> None:
        if rank == 1 and i == args.stall_after:
            time.sleep(3600)
        if rank == 1 and i == args.crash_after:
            os._exit(3)

    results = {}
    for c in args.checkpoints:
        for text in args.speculate:
            got = speculate(c, text, args.steps, world)
            tokens = [got["tokens"]]
            if world > 1:  # every rank's, to show that they agree
                tokens = [None] * world
                dist.all_gather_object(tokens, got["tokens"])
            results[str(c), text] = dict(got, tokens=tokens)
        if args.speculate:
            continue
        try:
            results[str(c)] = decode(c, args.steps, args.compile, args.loaded, on_step)
        except BriskError as e:  # the same on every rank
            results[str(c)] = dict(error=str(e))
    if rank == 0:
        torch.save(results, args.out)


if __name__ == "__main__":
    run_cli(main)
