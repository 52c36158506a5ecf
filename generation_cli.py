"""The flags that every generating script shares (generate.py, generate_prefill.py): the model,
chat, sampling, cache length, device, compilation, figures file, torchrun and speculative decoding,
and their checks.
"""
import argparse
from pathlib import Path
from typing import Any, Callable, TypeVar


import speculative
import tp
from checkpoint import DEFAULT_CHECKPOINT, check_checkpoint, load_config
from cli import BriskError, add_device_flags, check_at_least_one, check_writable
from engine import INTERACTIVE_MAX_SEQ_LENGTH
from model import ModelArgs
from tokenizer import load_tokenizer

T = TypeVar("T")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The flags of every script that generates (generate.py, generate_prefill.py): the model, chat,
    sampling, cache length, device, compilation, figures file, torchrun and speculative decoding;
    check_generation_args checks them."""
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"model.pth in a checkpoint directory (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template")
    p.add_argument("--interactive", action="store_true",
                   help="multi-turn chat on stdin (--prompt: first message)")
    p.add_argument("--max_new_tokens", type=int, default=200,
                   help="per sample, prompt or turn (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    p.add_argument("--top_k", type=int, default=200,
                   help="sample from the k most likely tokens (default 200)")
    p.add_argument("--top_p", type=float, default=None,
                   help="then from the fewest tokens whose probability reaches p, in (0, 1] (default: off)")
    p.add_argument("--stop", nargs="+", default=[],
                   help="stop when one of these strings is generated")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for sampling and random prompts")
    add_device_flags(p)
    p.add_argument("--max_seq_length", type=int, default=None,
                   help=f"KV cache length (default: the longest prompt + max_new_tokens, or "
                        f"{INTERACTIVE_MAX_SEQ_LENGTH} with --interactive; at most the model's block_size)")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--compile_prefill", action="store_true",
                   help="compile prefill too (dynamic shapes)")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.add_argument("--dist_timeout", type=float, default=None,
                   help=f"under torchrun: seconds a rank waits for the others before failing "
                        f"(default {tp.DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    speculative.add_args(p)


def check_generation_args(args: argparse.Namespace) -> None:
    """Checks of add_generation_args's flags that need no model (speculative.speculation checks the
    speculative ones, with the model's config)."""
    check_at_least_one(args, "max_new_tokens", "top_k", "max_seq_length")
    if not 0 <= args.temperature < float("inf"):  # also refuses nan
        raise BriskError(f"--temperature must be >= 0 and finite, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise BriskError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.json is not None:
        check_writable(args.json, args.force)
    check_checkpoint(args.checkpoint_path)


def start(args: argparse.Namespace, check: Callable[[argparse.Namespace], T]) -> tuple[int, int, ModelArgs, Any, T]:
    """What a generation script does before loading weights: join torchrun's process group, check
    the flags with `check`, then against the model's config. Returns (rank, world, config,
    tokenizer, what `check` returned)."""
    # under torchrun; ranks other than 0 print nothing
    rank, world = tp.maybe_init_dist(args.dist_timeout)
    checked = check(args)
    config = load_config(args.checkpoint_path)
    tp.check_divisible(config, world)
    if args.interactive and world > 1:
        raise BriskError("--interactive reads stdin in a single process; run it without torchrun")
    return rank, world, config, load_tokenizer(args.checkpoint_path.parent), checked
