"""Generate text with a static KV cache, optionally compiled: completion, chat, interactive chat, benchmarking.

    python generate.py --checkpoint_path checkpoints/ORG/NAME/model.pth --prompt "Hello, my name is"

Generated text goes to stdout; timings go to stderr (and to --json).
"""
import argparse
import json
import sys
import textwrap
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

import batch as batching
import speculative
from cli import (DTYPES, ArgumentParser, BriskError, check_at_least_one, check_writable, kv_cache_dtype, run_cli,
                 save_atomic)
from engine import (BANDWIDTH_HELP, INTERACTIVE_MAX_SEQ_LENGTH, Engine, TextStream, cache_length, chat, common_prefix,
                    describe, figures, load, prepare, summarize)
from generation_cli import add_generation_args, check_generation_args, start

def chat_in_cache(engine: Engine, tokenizer, args, sampling: dict) -> None:
    """Multi-turn chat in the model's template. Each turn's prompt is the whole conversation; the cache still
    holds the tokens the conversation shares with the previous turn, so only the rest is prefilled."""
    cached = []  # the tokens whose keys/values are in the cache, from position 0
    max_seq_length = engine.max_seq_length

    def reply(messages: list[dict]) -> str:
        nonlocal cached
        ids = tokenizer.encode_chat(messages)
        if len(ids) > max_seq_length:
            raise BriskError(f"the conversation ({len(ids)} tokens) no longer fits --max_seq_length {max_seq_length}")
        start = min(common_prefix(cached, ids), len(ids) - 1)
        stream = TextStream(tokenizer, args.stop, sys.stdout)
        max_new_tokens = min(args.max_new_tokens, max_seq_length - len(ids) + 1)
        rows, timing = engine.generate(torch.tensor(ids, device=args.device), max_new_tokens,
                                       eos_ids=tokenizer.eos_ids, start_pos=start,
                                       on_token=lambda i, t: stream.push(t), **sampling)
        text = stream.finish()
        print()
        cached = ids + rows[0][:-1]  # the last token was sampled but never fed through the model
        print(f"[{len(ids) - start} prompt tokens prefilled, {start} reused; {len(rows[0])} tokens, "
              f"{len(rows[0]) / (timing['ttft_s'] + timing['decode_s']):.1f} tok/s]", file=sys.stderr)
        return text

    chat(reply, [] if args.prompt is None else [args.prompt])


FIGURES_HELP = f"""figures (per sample, and the median over the samples after the first, a warm-up):
  time to first token  prefill, including sampling the first new token
  decode tokens/s      per sequence, the tokens after the first / their decode time (with speculative decoding
                       a target pass yields several: bandwidth below is then an effective figure per token)
  end-to-end tokens/s  per sequence, new tokens / (prefill + decode time)
  throughput           new tokens of all sequences / (prefill + decode time)
  peak memory          torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU
  acceptance rate      speculative decoding: draft tokens accepted / draft tokens proposed, and the mean number
                       of the k draft tokens accepted per verification (each verification also yields one token
                       from the target); plain decode steps: where nothing was proposed (no prompt-lookup match)
{textwrap.fill(BANDWIDTH_HELP, 100, initial_indent="  ", subsequent_indent="    ")}"""


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=FIGURES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", default=None,
                   help='text to continue (default "Hello, my name is"); an integer N: a random N-token prompt. '
                        'Repeated: the prompts run as rows of one batch, each as it would alone')
    p.add_argument("--prompts_file", type=Path, default=None, help="prompts, one a line, run as rows of one batch")
    p.add_argument("--num_samples", type=int, default=1, help="times to generate (default 1; the first is a warm-up)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="copies of the prompt generated at once (default 1); with several prompts, the most rows "
                        "run at once (default: all of them; a row frees for the next prompt when it ends)")
    p.add_argument("--num_beams", type=int, default=1, help="beam search with this many beams (default 1: off)")
    p.add_argument("--length_penalty", type=float, default=1.0,
                   help="beam search: a finished beam scores log-probability / length ** this (default 1.0)")
    p.add_argument("--early_stopping", choices=["false", "true", "never"], default="false",
                   help="beam search, as transformers: true stops once num_beams beams are finished; false when no "
                        "running beam can beat them at its current length; never at its best length (default false)")
    p.add_argument("--num_return_sequences", type=int, default=1,
                   help="beam search: the best beams printed per prompt, at most --num_beams (default 1)")
    p.add_argument("--profile", type=Path, default=None, help="write a torch.profiler trace of the last sample")
    add_generation_args(p)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Also reads --prompts_file: args.prompts holds every prompt, args.prompt the only one (None: several)."""
    check_at_least_one(args, "num_samples", "batch_size", "num_beams", "num_return_sequences")
    if args.num_return_sequences > args.num_beams:
        raise BriskError(f"--num_return_sequences {args.num_return_sequences} exceeds --num_beams {args.num_beams}")
    args.prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise BriskError(f"--prompts_file {args.prompts_file}: no such file")
        lines = args.prompts_file.read_text().splitlines()
        empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if empty or not lines:
            raise BriskError(f"--prompts_file {args.prompts_file}: line {empty[0] if empty else 1} is empty")
        args.prompts += lines
    args.prompt = args.prompts[0] if len(args.prompts) == 1 else None
    several = len(args.prompts) > 1 or args.num_beams > 1
    if several and args.interactive:
        raise BriskError("--interactive takes one first message; leave out the other prompts and --num_beams")
    if len(args.prompts) > 1 and args.batch_size is None:
        args.batch_size = len(args.prompts)
    args.batch_size = args.batch_size or 1
    if args.interactive and args.batch_size != 1:
        raise BriskError("--interactive generates one sequence; leave out --batch_size")
    if args.profile is not None:
        check_writable(args.profile, args.force)
    check_generation_args(args)


def encode_prompt(args, tokenizer, vocab_size: int) -> tuple[list[int], Optional[str]]:
    """Prompt tokens, and the text to print before the generated text (None: print nothing)."""
    text = "Hello, my name is" if args.prompt is None else args.prompt
    if text.strip().isdigit():
        g = torch.Generator().manual_seed(0 if args.seed is None else args.seed)
        return torch.randint(vocab_size, (int(text),), generator=g).tolist(), None
    if args.chat:
        return tokenizer.encode_chat([dict(role="user", content=text)]), None
    return tokenizer.encode(text), text


def run_batch(args: argparse.Namespace, config, tokenizer) -> None:
    """Several prompts as rows of one batch (batch.generate_rows), or beam search (batch.beam_search) for each
    prompt in turn; prints each prompt's text (or num_return_sequences beams) in prompt order."""
    if args.speculate_k:
        raise BriskError("speculative decoding runs one sequence: leave out the draft or --num_beams/other prompts")
    if args.chat:
        prompts = [tokenizer.encode_chat([dict(role="user", content=p)]) for p in args.prompts]
    else:
        prompts = [tokenizer.encode(p) for p in args.prompts]
    longest = max(map(len, prompts))
    max_seq_length = args.max_seq_length or cache_length(longest + args.max_new_tokens, config.block_size)
    for i, ids in enumerate(prompts):
        if not ids:
            raise BriskError(f"prompt {i + 1} is empty")
        if len(ids) > min(max_seq_length, config.block_size):
            raise BriskError(f"prompt {i + 1} has {len(ids)} tokens, more than the cache's "
                             f"{min(max_seq_length, config.block_size)} positions (--max_seq_length, block_size)")
    if max_seq_length > config.block_size:
        raise BriskError(f"--max_seq_length {max_seq_length} exceeds the model's block_size {config.block_size}")
    max_new_tokens = min(args.max_new_tokens, max_seq_length - longest + 1)  # the last token is never fed back
    if args.seed is not None:
        torch.manual_seed(args.seed)
    device = args.device
    model = load(args.checkpoint_path, device, DTYPES[args.dtype], kv_cache_dtype(args))
    rows = args.num_beams if args.num_beams > 1 else min(args.batch_size, len(prompts))
    batch = batching.Batch(model, rows, max_seq_length, compile=args.compile)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.num_beams > 1:
        early = dict(false=False, true=True, never="never")[args.early_stopping]
        for text, ids in zip(args.prompts, prompts):
            t0 = time.perf_counter()
            beams = batching.beam_search(batch, ids, max_new_tokens, args.num_beams, args.length_penalty, early,
                                         args.num_return_sequences, tokenizer.eos_ids)
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
        out, timing = batching.generate_rows(batch, prompts, max_new_tokens, eos_ids=tokenizer.eos_ids,
                                             on_token=lambda r, t: streams[r].push(t), **sampling)
        total = time.perf_counter() - t0
        for text, stream in zip(args.prompts, streams):
            print(("" if args.chat else text) + stream.finish())
        n = sum(map(len, out))
        decode_tps = (n - len(out)) / timing["decode_s"] if timing["steps"] else None
        label = f"sample {i + 1}" + (" (warm-up)" if i == 0 and args.num_samples > 1 else "")
        print(f"{label}: {len(prompts)} prompts, {rows} rows at once, {n} tokens in {total:.2f} s "
              f"(prefill {timing['prefill_s']:.2f} s), decode {decode_tps or 0:.1f} tok/s in all "
              f"({timing['steps']} steps), throughput {n / total:.1f} tok/s", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, config, tokenizer = start(args, check_args)
    device, dtype = args.device, DTYPES[args.dtype]
    if len(args.prompts) > 1 or args.num_beams > 1:
        return run_batch(args, config, tokenizer)
    if args.interactive:
        ids, shown = [], None
        max_seq_length = args.max_seq_length or min(config.block_size, INTERACTIVE_MAX_SEQ_LENGTH)
    else:
        ids, shown = encode_prompt(args, tokenizer, min(tokenizer.vocab_size, config.vocab_size))
        max_seq_length = args.max_seq_length or cache_length(len(ids) + args.max_new_tokens, config.block_size)
        if len(ids) > config.block_size:
            raise BriskError(f"the prompt has {len(ids)} tokens, more than the model's block_size {config.block_size}")
        if len(ids) > max_seq_length:
            raise BriskError(f"the prompt has {len(ids)} tokens, more than --max_seq_length {max_seq_length}")
    if max_seq_length > config.block_size:
        raise BriskError(f"--max_seq_length {max_seq_length} exceeds the model's block_size {config.block_size}")
    max_new_tokens = min(args.max_new_tokens, max_seq_length - len(ids) + 1)  # the last token is never fed back
    if max_new_tokens < args.max_new_tokens and not args.interactive:
        print(f"note: at most {max_new_tokens} new tokens fit in --max_seq_length {max_seq_length}", file=sys.stderr)

    if args.seed is not None:
        torch.manual_seed(args.seed)
    engine = prepare(args.checkpoint_path, device, dtype, args.batch_size, max_seq_length, args.compile,
                     args.compile_prefill, speculative.speculation(args), kv_cache_dtype(args))
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    prompt = torch.tensor(ids or [0, 0], device=device)  # a chat has no prompt yet: the warm-up makes one up
    compile_s = None
    if args.compile or args.compile_prefill:  # compile now, so that no sample's (or chat reply's) figures include it
        compile_s = engine.warm_up(prompt, max_new_tokens, args.batch_size, **sampling)
    if args.interactive:  # its first turn prefills from position 0, over what the warm-up left in the cache
        return chat_in_cache(engine, tokenizer, args, sampling)
    samples = []
    for i in range(args.num_samples):
        last = i == args.num_samples - 1
        streams = [TextStream(tokenizer, args.stop, sys.stdout if args.batch_size == 1 else None)
                   for _ in range(args.batch_size)]
        if args.batch_size == 1 and shown is not None:
            sys.stdout.write(shown)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        profiler = torch.profiler.profile() if args.profile and last else nullcontext()
        with profiler:
            rows, timing = engine.generate(prompt, max_new_tokens, args.batch_size, eos_ids=tokenizer.eos_ids,
                                           on_token=lambda r, t: streams[r].push(t), **sampling)
        texts = [s.finish() for s in streams]
        if args.batch_size == 1:
            print()
        else:
            for text in texts:
                print((shown or "") + text)
        samples.append(figures(engine.model, rows, timing, len(ids), engine.weight_bytes, device))
        label = f"sample {i + 1}" + (" (warm-up)" if i == 0 and args.num_samples > 1 else "")
        print(f"{label}: {describe(samples[-1])}", file=sys.stderr)
        if args.speculate_k:
            samples[-1].update(speculative.figures(engine.speculator.stats, args.speculate_k))
            print(f"{label}: {speculative.describe(samples[-1])}", file=sys.stderr)
        if args.profile and last and rank == 0:
            save_atomic(args.profile, lambda tmp: profiler.export_chrome_trace(str(tmp)), args.force)
            print(f"wrote profiler trace {args.profile}", file=sys.stderr)

    summary = summarize(samples)
    over = f"median of samples 2-{args.num_samples}" if args.num_samples > 1 else "one sample"
    print(f"summary ({over}, batch size {args.batch_size}, {len(ids)} prompt tokens): {describe(summary)}",
          file=sys.stderr)
    if args.speculate_k:
        print(f"summary: {speculative.describe(summary)}", file=sys.stderr)
    if args.json is not None and rank == 0:
        cfg = dict(checkpoint=str(args.checkpoint_path), device=str(device), dtype=args.dtype, compile=args.compile,
                   compile_prefill=args.compile_prefill, batch_size=args.batch_size, prompt_tokens=len(ids),
                   max_new_tokens=max_new_tokens, max_seq_length=max_seq_length, num_samples=args.num_samples,
                   weight_bytes=engine.weight_bytes, **sampling, compile_s=compile_s, **speculative.settings(args))
        report = dict(config=cfg, samples=samples, summary=summary, bandwidth_formula=BANDWIDTH_HELP)
        save_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=2)), args.force)


if __name__ == "__main__":
    run_cli(main)
