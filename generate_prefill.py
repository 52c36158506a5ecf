"""Generate with prefix caching: the keys/values of prompt beginnings seen before are copied back
into the KV cache instead of being computed again, so a long shared context costs its prefill once
(once ever, with --cache_file).

    python generate_prefill.py --context doc.txt --prompt "Summarize it." --prompt "Who wrote it?" --chat \\
        --cache_file doc.cache

Each prompt is the context followed by the prompt text (with --chat: the context is the system
message). Without --context the cache still serves the longest cached beginning of each prompt.
Generated text goes to stdout; per prompt, the cached and prefilled token counts and the time to
first token go to stderr (and to --json). The other flags are generate.py's. With a draft model
(--draft_checkpoint_path, --draft) its keys/values are cached and restored with the target's, so
neither prefills a cached prefix again. Under torchrun (tp.py) each rank caches its own part of the
keys/values, and --cache_file c.pt becomes one file per rank (c.rank0-of-2.pt, ...).
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import speculative
from cli import (DTYPES, ArgumentParser, BriskError, TextStream, chat, kv_cache_dtype,
                 looks_like_path, parse_device, run_cli, save_json)
from engine import cache_length, check_fits, common_prefix, prepare, tokens_that_fit
from generation_cli import add_generation_args, check_generation_args, start
from prefix_cache import PrefixCache, check_same_entries, generate_cached, model_meta, rank_file
from report import describe_prompt, figures, prefix_summary, speculation_figures

DEFAULT_BUDGET_MB = 2048


def read_context(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file() and looks_like_path(value):
        raise BriskError(f"--context file not found: {value} (text is given as text: with spaces, no file extension)")
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else value
    except (OSError, UnicodeDecodeError) as e:
        raise BriskError(f"cannot read --context file {path}: {e}") from None


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise BriskError(f"cannot read --prompts_file {args.prompts_file}: {e}") from None
        prompts += [line for line in lines if line.strip()]
    return prompts


class Conversation:
    """Token ids of prompts, and how many of their leading tokens are the shared context."""

    def __init__(self, tokenizer, context: Optional[str], chat: bool):
        self.tokenizer, self.context, self.chat = tokenizer, context, chat
        self.messages = [dict(role="system", content=context)] if chat and context is not None else []
        if context is None:
            self.context_ids = []
        elif chat:
            self.context_ids = tokenizer.encode_chat(self.messages, add_generation_prompt=False)
        else:
            self.context_ids = tokenizer.encode(context)

    def encode(self, text: str, history: Sequence[dict] = ()) -> list[int]:
        if self.chat:
            return self.encode_chat([*history, dict(role="user", content=text)])
        return self.context_ids + self.tokenizer.encode(text,
                                                        bos=False if self.context_ids else None)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """A conversation after the context's system message."""
        return self.tokenizer.encode_chat([*self.messages, *messages])

    def shared(self, ids: Sequence[int]) -> int:
        """Leading tokens of ids that belong to the context (a chat template may render them
        slightly apart)."""
        return common_prefix(self.context_ids, ids)


def open_cache(args, engine, spec, context_tokens: int, rank: int, world: int) -> tuple[PrefixCache, Optional[Path]]:
    """The prefix cache of the target (and of a draft model, whose keys/values are cached with the
    target's), loaded from --cache_file (this rank's part) if it exists; returns it and that
    file."""
    models, metas = [engine.model], [model_meta(engine.model, args.checkpoint_path, rank, world)]
    proposer = engine.speculator and engine.speculator.proposer
    if isinstance(proposer, speculative.DraftModel):
        models.append(proposer.model)
        metas.append(model_meta(models[1], spec.draft_path(), rank, world))
    cache = PrefixCache(models, metas, int(args.cache_budget_mb * 2**20), args.cache_device)
    context_bytes = context_tokens * cache.bytes_per_token()
    if context_bytes > cache.budget:
        raise BriskError(f"the context's keys/values take {context_bytes / 2**20:.1f} MiB, more than "
                         f"--cache_budget_mb {args.cache_budget_mb:g}")
    cache_file = args.cache_file and rank_file(args.cache_file, rank, world)
    if cache_file is not None and cache_file.exists():
        cache.load(cache_file)
        print(f"loaded {len(cache.entries)} cached prefixes ({cache.nbytes / 2**20:.1f} MiB) from {cache_file}",
              file=sys.stderr)
    check_same_entries(cache)
    return cache, cache_file


def close_cache(args, cache: PrefixCache, cache_file: Optional[Path], stats: list[dict],
                world: int) -> dict:
    """Print the prompts' summary and the cache's size, save the cache to cache_file; returns the
    summary."""
    s = prefix_summary(stats)
    if s["cold_ttft_s"] is not None and s["cached_ttft_s"] is not None:
        print(f"time to first token: cold {s['cold_ttft_s']:.3f} s (median of {s['cold_prompts']}), cached "
              f"{s['cached_ttft_s']:.3f} s (median of {s['cached_prompts']}): {s['speedup']:.1f}x faster",
              file=sys.stderr)
    print(f"prefix cache: {len(cache.entries)} entries, {cache.nbytes / 2**20:.1f} MiB of "
          f"{args.cache_budget_mb:g} MiB", file=sys.stderr)
    if cache_file is not None:
        cache.save(cache_file)
        others = " (and the other ranks' parts beside it)" if world > 1 else ""
        print(f"saved the prefix cache to {cache_file}{others}", file=sys.stderr)
    return s


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", default=None,
                   help="a file, or text: the shared beginning of every prompt (with --chat: the system message); "
                        "one word with a / or a file extension is a file, and an error if there is none")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompts_file", type=Path, default=None,
                   help="a file with one prompt per line")
    p.add_argument("--cache_file", type=Path, default=None,
                   help="load the prefix cache from this file if it exists, and save it there at the end")
    p.add_argument("--cache_budget_mb", type=float, default=DEFAULT_BUDGET_MB,
                   help="memory for cached keys/values, MiB; least recently used entries go first "
                        f"(default {DEFAULT_BUDGET_MB})")
    p.add_argument("--cache_device", type=parse_device, default="cpu",
                   help="where cached keys/values live (default cpu)")
    add_generation_args(p)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_generation_args(args)
    if args.cache_budget_mb <= 0:
        raise BriskError(f"--cache_budget_mb must be positive, got {args.cache_budget_mb}")
    if args.cache_file is not None:
        if args.cache_file.is_dir() or not args.cache_file.parent.is_dir():
            raise BriskError(f"--cache_file {args.cache_file}: not a file in an existing directory")


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, config, tokenizer, _ = start(args, check_args)
    spec = speculative.speculation(args, config, tokenizer.vocab_size, world)
    device, dtype = args.device, DTYPES[args.dtype]
    conv = Conversation(tokenizer, read_context(args.context), args.chat or args.interactive)
    prompts = read_prompts(args)
    if not prompts and not args.interactive and not conv.context_ids:
        raise BriskError("nothing to do: give --prompt, --prompts_file, --context or --interactive")
    all_ids = [] if args.interactive else [conv.encode(p) for p in prompts] or [conv.context_ids]
    longest = max(map(len, all_ids), default=0)
    needed = None if args.interactive else longest + args.max_new_tokens
    max_seq_length = cache_length(args.max_seq_length, needed, config.block_size)
    if len(conv.context_ids) >= max_seq_length:
        raise BriskError(f"the context has {len(conv.context_ids)} tokens, more than the KV cache holds with "
                         f"a prompt after it (--max_seq_length {max_seq_length})")
    check_fits(longest, max_seq_length, config.block_size, "a prompt")

    if args.seed is not None:
        torch.manual_seed(args.seed)
    engine = prepare(args.checkpoint_path, device, dtype, 1, max_seq_length, args.compile,
                     args.compile_prefill, spec, kv_cache_dtype(args))
    model, speculator = engine.model, engine.speculator
    cache, cache_file = open_cache(args, engine, spec, len(conv.context_ids), rank, world)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    compile_s = None
    # before the first prompt, so that its cold figures do not include it
    if args.compile or args.compile_prefill:
        compile_s = engine.warm_up(torch.tensor([0, 0], device=device), max_seq_length - 1, 1,
                                   **sampling)
    stats = []

    def run_turn(ids: list[int], keep: Optional[int], max_new_tokens: int = args.max_new_tokens,
                 show: bool = True) -> str:
        """Generate after ids and cache their first `keep` tokens (None: the whole conversation so
        far)."""
        check_fits(len(ids), max_seq_length, what="the conversation")
        stream = TextStream(tokenizer, args.stop, sys.stdout if show else None)
        new, timing, cached = generate_cached(
            model, cache, ids, tokens_that_fit(max_new_tokens, len(ids), max_seq_length),
            eos_ids=tokenizer.eos_ids, on_token=lambda _, t: stream.push(t),
            prefill_fn=engine.prefill_fn, decode_fn=engine.decode_fn,
            speculator=speculator, **sampling)
        text = stream.finish()
        if show:
            print()
        # the last token never went through
        if not cache.store(ids + new[:-1] if keep is None else ids[:keep]):
            print("warning: this prompt's keys/values exceed --cache_budget_mb; not cached",
                  file=sys.stderr)
        f = figures(model, [new], timing, len(ids), engine.weight_bytes, device)
        stats.append(dict(prompt_tokens=len(ids), cached_tokens=cached,
                          prefilled_tokens=len(ids) - cached, restore_s=timing["restore_s"], **f))
        if spec is not None:
            stats[-1].update(speculation_figures(speculator.stats, spec.k))
        print(describe_prompt(len(stats), stats[-1], len(cache.models) > 1), file=sys.stderr)
        return text

    # each turn's prompt is the whole conversation, whose cached beginning is restored
    if args.interactive:
        chat(lambda messages: run_turn(conv.encode_chat(messages), keep=None), prompts)
    elif prompts:
        for text, ids in zip(prompts, all_ids):
            print(f"> {text}")
            run_turn(ids, keep=conv.shared(ids) if conv.context is not None else len(ids))
    else:  # only a context: prefill it into the cache (and --cache_file) for later runs
        run_turn(conv.context_ids, keep=len(conv.context_ids), max_new_tokens=1, show=False)

    s = close_cache(args, cache, cache_file, stats, world)
    if args.json is not None and rank == 0:
        cfg = dict(checkpoint=str(args.checkpoint_path), device=str(device), dtype=args.dtype,
                   compile=args.compile, compile_prefill=args.compile_prefill, compile_s=compile_s,
                   context_tokens=len(conv.context_ids), max_new_tokens=args.max_new_tokens,
                   max_seq_length=max_seq_length, **sampling,
                   cache_file=str(args.cache_file) if args.cache_file else None,
                   cache_budget_mb=args.cache_budget_mb, **speculative.settings(spec),
                   cached_models=len(cache.models))
        report = dict(config=cfg, prompts=stats, summary=s,
                      cache=dict(entries=len(cache.entries), bytes=cache.nbytes))
        save_json(args.json, report, args.force)


if __name__ == "__main__":
    run_cli(main)
