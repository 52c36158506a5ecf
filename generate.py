"""Generate text with a static KV cache, optionally compiled: completion, chat, interactive chat,
benchmarking.

    python generate.py --checkpoint_path checkpoints/ORG/NAME/model.pth --prompt "Hello, my name is"

Generated text goes to stdout; timings go to stderr (and to --json).
"""
import argparse
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

import batch as batching
import speculative
from cli import (DTYPES, ArgumentParser, BriskError, TextStream, chat, check_at_least_one,
                 check_writable, kv_cache_dtype, run_cli, save_atomic, save_json)
from engine import Engine, cache_length, check_fits, common_prefix, load, prepare, tokens_that_fit
from generation_cli import add_generation_args, check_generation_args, start
from report import (BANDWIDTH_HELP, FIGURES_HELP, describe, describe_speculation, figures,
                    speculation_figures, summarize)


def chat_in_cache(engine: Engine, tokenizer, args, first: Optional[str], sampling: dict) -> None:
    """Multi-turn chat in the model's template. Each turn's prompt is the whole conversation; the
    cache still holds the tokens the conversation shares with the previous turn, so only the rest is
    prefilled."""
    cached = []  # the tokens whose keys/values are in the cache, from position 0
    max_seq_length = engine.max_seq_length

    def reply(messages: list[dict]) -> str:
        nonlocal cached
        ids = tokenizer.encode_chat(messages)
        check_fits(len(ids), max_seq_length, what="the conversation")
        start = min(common_prefix(cached, ids), len(ids) - 1)
        stream = TextStream(tokenizer, args.stop, sys.stdout)
        max_new_tokens = tokens_that_fit(args.max_new_tokens, len(ids), max_seq_length)
        rows, timing = engine.generate(torch.tensor(ids, device=args.device), max_new_tokens,
                                       eos_ids=tokenizer.eos_ids, start_pos=start,
                                       on_token=lambda i, t: stream.push(t), **sampling)
        text = stream.finish()
        print()
        cached = ids + rows[0][:-1]  # the last token was sampled but never fed through the model
        print(f"[{len(ids) - start} prompt tokens prefilled, {start} reused; {len(rows[0])} tokens, "
              f"{len(rows[0]) / (timing['ttft_s'] + timing['decode_s']):.1f} tok/s]",
              file=sys.stderr)
        return text

    chat(reply, [] if first is None else [first])


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=FIGURES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", default=None,
                   help='text to continue (default "Hello, my name is"); an integer N: a random N-token prompt. '
                        'Repeated: the prompts run as rows of one batch, each as it would alone')
    p.add_argument("--prompts_file", type=Path, default=None,
                   help="prompts, one a line, run as rows of one batch")
    p.add_argument("--num_samples", type=int, default=1,
                   help="times to generate (default 1; the first is a warm-up)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="copies of the prompt generated at once (default 1); with several prompts, the most rows "
                        "run at once (default: all of them; a row frees for the next prompt when it ends)")
    p.add_argument("--num_beams", type=int, default=1,
                   help="beam search with this many beams (default 1: off)")
    p.add_argument("--length_penalty", type=float, default=1.0,
                   help="beam search: a finished beam scores log-probability / length ** this (default 1.0)")
    p.add_argument("--early_stopping", choices=["false", "true", "never"], default="false",
                   help="beam search, as transformers: true stops once num_beams beams are finished; false when no "
                        "running beam can beat them at its current length; never at its best length (default false)")
    p.add_argument("--num_return_sequences", type=int, default=1,
                   help="beam search: the best beams printed per prompt, at most --num_beams (default 1)")
    p.add_argument("--profile", type=Path, default=None,
                   help="write a torch.profiler trace of the last sample")
    add_generation_args(p)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list[str], int]:
    """Checks the flags; returns the prompts (--prompt's, then --prompts_file's lines) and the batch
    size."""
    check_at_least_one(args, "num_samples", "batch_size", "num_beams", "num_return_sequences")
    if args.num_return_sequences > args.num_beams:
        raise BriskError(f"--num_return_sequences {args.num_return_sequences} exceeds --num_beams {args.num_beams}")
    if not math.isfinite(args.length_penalty):
        raise BriskError(f"--length_penalty must be finite, got {args.length_penalty}")
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise BriskError(f"--prompts_file {args.prompts_file}: no such file")
        lines = args.prompts_file.read_text().splitlines()
        empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if empty or not lines:
            raise BriskError(f"--prompts_file {args.prompts_file}: line {empty[0] if empty else 1} is empty")
        prompts += lines
    if (len(prompts) > 1 or args.num_beams > 1) and args.interactive:
        raise BriskError("--interactive takes one first message; leave out the other prompts and --num_beams")
    batch_size = args.batch_size or (len(prompts) if len(prompts) > 1 else 1)
    if args.interactive and batch_size != 1:
        raise BriskError("--interactive generates one sequence; leave out --batch_size")
    if args.profile is not None:
        check_writable(args.profile, args.force)
    check_generation_args(args)
    return prompts, batch_size


def encode_prompt(text: Optional[str], args, tokenizer, vocab_size: int) -> tuple[list[int], Optional[str]]:
    """The tokens of prompt `text` (None: the default one), and the text to print before the
    generated text (None: print nothing)."""
    text = "Hello, my name is" if text is None else text
    if text.strip().isdigit():
        g = torch.Generator().manual_seed(0 if args.seed is None else args.seed)
        return torch.randint(vocab_size, (int(text),), generator=g).tolist(), None
    if args.chat:
        return tokenizer.encode_chat([dict(role="user", content=text)]), None
    return tokenizer.encode(text), text


def run_batch(args: argparse.Namespace, texts: list[str], batch_size: int, config,
              tokenizer) -> None:
    """Several prompts as rows of one batch (batch.generate_rows), or beam search
    (batch.beam_search) for each prompt in turn; prints each prompt's text (or num_return_sequences
    beams) in prompt order."""
    if args.chat:
        prompts = [tokenizer.encode_chat([dict(role="user", content=p)]) for p in texts]
    else:
        prompts = [tokenizer.encode(p) for p in texts]
    longest = max(map(len, prompts))
    max_seq_length = cache_length(args.max_seq_length, longest + args.max_new_tokens,
                                  config.block_size)
    for i, ids in enumerate(prompts):
        if not ids:
            raise BriskError(f"prompt {i + 1} is empty")
        check_fits(len(ids), max_seq_length, config.block_size, f"prompt {i + 1}")
    max_new_tokens = tokens_that_fit(args.max_new_tokens, longest, max_seq_length)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    device = args.device
    model = load(args.checkpoint_path, device, DTYPES[args.dtype], kv_cache_dtype(args))
    rows = args.num_beams if args.num_beams > 1 else min(batch_size, len(prompts))
    batch = batching.Batch(model, rows, max_seq_length, compile=args.compile)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.num_beams > 1:
        early = dict(false=False, true=True, never="never")[args.early_stopping]
        for text, ids in zip(texts, prompts):
            t0 = time.perf_counter()
            beams = batching.beam_search(batch, ids, max_new_tokens, args.num_beams,
                                         args.length_penalty, early, args.num_return_sequences,
                                         tokenizer.eos_ids)
            for tokens, score in beams:
                stream = TextStream(tokenizer, args.stop)
                for t in tokens:
                    if t in tokenizer.eos_ids or stream.push(t):
                        break
                print(("" if args.chat else text) + stream.finish())
                print(f"[beam score {score:.4f}, {len(tokens)} tokens]", file=sys.stderr)
            print(f"beam search: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
        return
    for i in range(args.num_samples):
        streams = [TextStream(tokenizer, args.stop) for _ in prompts]
        t0 = time.perf_counter()
        out, timing = batching.generate_rows(batch, prompts, max_new_tokens,
                                             eos_ids=tokenizer.eos_ids,
                                             on_token=lambda r, t: streams[r].push(t), **sampling)
        total = time.perf_counter() - t0
        for text, stream in zip(texts, streams):
            print(("" if args.chat else text) + stream.finish())
        n = sum(map(len, out))
        decode_tps = (n - len(out)) / timing["decode_s"] if timing["steps"] else None
        label = f"sample {i + 1}" + (" (warm-up)" if i == 0 and args.num_samples > 1 else "")
        print(f"{label}: {len(prompts)} prompts, {rows} rows at once, {n} tokens in {total:.2f} s "
              f"(prefill {timing['prefill_s']:.2f} s), decode {decode_tps or 0:.1f} tok/s in all "
              f"({timing['steps']} steps), throughput {n / total:.1f} tok/s", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, config, tokenizer, (texts, batch_size) = start(args, check_args)
    spec = speculative.speculation(args, config, tokenizer.vocab_size, world, batch_size)
    if len(texts) > 1 or args.num_beams > 1:
        if spec is not None:
            raise BriskError("speculative decoding runs one sequence: leave out the draft or --num_beams/other prompts")
        return run_batch(args, texts, batch_size, config, tokenizer)
    device, dtype, first = args.device, DTYPES[args.dtype], texts[0] if texts else None
    ids, echo = [], None  # a chat has no prompt yet
    if not args.interactive:
        ids, echo = encode_prompt(first, args, tokenizer,
                                  min(tokenizer.vocab_size, config.vocab_size))
    needed = None if args.interactive else len(ids) + args.max_new_tokens
    max_seq_length = cache_length(args.max_seq_length, needed, config.block_size)
    check_fits(len(ids), max_seq_length, config.block_size)
    max_new_tokens = tokens_that_fit(args.max_new_tokens, len(ids), max_seq_length)
    if max_new_tokens < args.max_new_tokens and not args.interactive:
        print(f"note: at most {max_new_tokens} new tokens fit in --max_seq_length {max_seq_length}",
              file=sys.stderr)

    if args.seed is not None:
        torch.manual_seed(args.seed)
    engine = prepare(args.checkpoint_path, device, dtype, batch_size, max_seq_length, args.compile,
                     args.compile_prefill, spec, kv_cache_dtype(args))
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    prompt = torch.tensor(ids or [0, 0], device=device)  # a chat's warm-up makes one up
    compile_s = None
    if args.compile or args.compile_prefill:  # now, so that no sample's or reply's figures include it
        compile_s = engine.warm_up(prompt, max_new_tokens, batch_size, **sampling)
    # its first turn prefills from position 0, over what the warm-up left in the cache
    if args.interactive:
        return chat_in_cache(engine, tokenizer, args, first, sampling)
    samples = []
    for i in range(args.num_samples):
        last = i == args.num_samples - 1
        streams = [TextStream(tokenizer, args.stop, sys.stdout if batch_size == 1 else None)
                   for _ in range(batch_size)]
        if batch_size == 1 and echo is not None:
            sys.stdout.write(echo)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        profiler = torch.profiler.profile() if args.profile and last else nullcontext()
        with profiler:
            rows, timing = engine.generate(prompt, max_new_tokens, batch_size,
                                           eos_ids=tokenizer.eos_ids,
                                           on_token=lambda r, t: streams[r].push(t), **sampling)
        outs = [s.finish() for s in streams]
        if batch_size == 1:
            print()
        else:
            print("\n".join((echo or "") + text for text in outs))
        samples.append(figures(engine.model, rows, timing, len(ids), engine.weight_bytes, device))
        label = f"sample {i + 1}" + (" (warm-up)" if i == 0 and args.num_samples > 1 else "")
        print(f"{label}: {describe(samples[-1])}", file=sys.stderr)
        if spec is not None:
            samples[-1].update(speculation_figures(engine.speculator.stats, spec.k))
            print(f"{label}: {describe_speculation(samples[-1])}", file=sys.stderr)
        if args.profile and last and rank == 0:
            save_atomic(args.profile, lambda tmp: profiler.export_chrome_trace(str(tmp)),
                        args.force)
            print(f"wrote profiler trace {args.profile}", file=sys.stderr)

    summary = summarize(samples)
    over = f"median of samples 2-{args.num_samples}" if args.num_samples > 1 else "one sample"
    print(f"summary ({over}, batch size {batch_size}, {len(ids)} prompt tokens): {describe(summary)}",
          file=sys.stderr)
    if spec is not None:
        print(f"summary: {describe_speculation(summary)}", file=sys.stderr)
    if args.json is not None and rank == 0:
        cfg = dict(checkpoint=str(args.checkpoint_path), device=str(device), dtype=args.dtype,
                   compile=args.compile, compile_prefill=args.compile_prefill,
                   batch_size=batch_size, prompt_tokens=len(ids),
                   max_new_tokens=max_new_tokens, max_seq_length=max_seq_length,
                   num_samples=args.num_samples, weight_bytes=engine.weight_bytes, **sampling,
                   compile_s=compile_s, **speculative.settings(spec))
        report = dict(config=cfg, samples=samples, summary=summary,
                      bandwidth_formula=BANDWIDTH_HELP)
        save_json(args.json, report, args.force)


if __name__ == "__main__":
    run_cli(main)
