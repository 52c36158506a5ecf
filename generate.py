"""Generate text with a static KV cache, optionally compiled: completion, chat, interactive chat, benchmarking.

    python generate.py --checkpoint_path checkpoints/ORG/NAME/model.pth --prompt "Hello, my name is"

Generated text goes to stdout; timings go to stderr (and to --json).
"""
import argparse
import json
import resource
import statistics
import sys
import textwrap
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

import tp
from checkpoint import DEFAULT_CHECKPOINT, check_checkpoint, load_config, load_model
from cli import DTYPES, BriskError, check_at_least_one, check_writable, parse_device, run_cli, save_atomic
from cpu import INDUCTOR_OPTIONS
from model import Transformer
from tokenizer import load_tokenizer

INTERACTIVE_MAX_SEQ_LENGTH = 4096  # default cache length for a conversation, whose final length is unknown

# ---------------------------------------------------------------------------------------------------------------
# Sampling


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None) -> Tensor:
    """Next-token distribution [B, V] from logits [B, V]: temperature, then top-k, then top-p (nucleus)."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        pivot = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # [B, 1] k-th largest
        logits = torch.where(logits < pivot, -float("inf"), logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        sorted_probs = sorted_logits.softmax(-1)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens more likely than this one
        # keep the smallest prefix whose mass reaches top_p; the most likely token has before == 0 < top_p
        sorted_logits = sorted_logits.masked_fill(before >= top_p, -float("inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits.softmax(-1)


def multinomial_sample_one_no_sync(probs: Tensor) -> Tensor:
    # argmax(p / E) with E ~ Exponential(1) draws index i with probability p_i, without the host sync of
    # torch.multinomial: [B, V] -> [B, 1]
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(torch.int)


def sample(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(token [B, 1], probs [B, V]) from the last position's logits [B, V]; temperature 0 is greedy and returns
    no probs (a top-k and softmax over the vocabulary cost ~10% of a small model's decode step on a CPU)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True).to(torch.int), None
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return multinomial_sample_one_no_sync(probs), probs


# ---------------------------------------------------------------------------------------------------------------
# Generation


def prefill(model: Transformer, x: Tensor, input_pos: Tensor, kv_len: Optional[int] = None,
            **sampling_kwargs) -> Tensor:
    # x: [B, T] at positions input_pos: [T] -> first new token [B, 1]; kv_len: see Transformer.forward
    logits = model(x, input_pos, logits_to_keep=1, kv_len=kv_len)
    return sample(logits[:, -1], **sampling_kwargs)[0]


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, kv_len: Optional[int] = None,
                     **sampling_kwargs) -> tuple[Tensor, Optional[Tensor]]:
    # x: [B, 1] at input_pos: [1] -> (next token [B, 1], probs [B, V] or None when greedy)
    logits = model(x, input_pos, kv_len=kv_len)
    return sample(logits[:, -1], **sampling_kwargs)


def decode_n_tokens(model: Transformer, cur_token: Tensor, input_pos: Tensor, num_new_tokens: int,
                    decode_fn: Callable = decode_one_token, **sampling_kwargs) -> Iterator[Tensor]:
    """Feed each sampled token back in, yielding the next one [B, 1]; the caller stops early by not asking."""
    pos = int(input_pos[-1])  # read once; the host counts the positions after it
    for _ in range(num_new_tokens):
        next_token, _ = decode_fn(model, cur_token, input_pos, kv_len=model.attend_len(pos), **sampling_kwargs)
        input_pos += 1
        pos += 1
        cur_token = next_token.clone()  # a CUDA graph's output is overwritten by its next replay
        yield cur_token


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, batch_size: int = 1, *,
             eos_ids=(), start_pos: int = 0, on_token: Optional[Callable[[int, int], bool]] = None,
             prefill_fn: Callable = prefill, decode_fn: Callable = decode_one_token, speculator=None,
             **sampling_kwargs):
    """Sample up to max_new_tokens after prompt [T] for batch_size copies of it.

    The caches must already hold max_seq_length >= T + max_new_tokens - 1 positions; positions below start_pos
    are taken as already in the cache (the earlier turns of a conversation) and are not computed again.
    A row stops at an eos id (which it keeps) or when on_token(row, token) returns True for a token it has just
    taken (eos ids are not passed to it); generation ends when every row has stopped.
    A speculator (speculative.Speculator, batch_size 1) proposes tokens that the target verifies several at a time.
    Returns (the new tokens of each row, {"ttft_s", "decode_s", "steps"}).
    """
    device = prompt.device
    T = prompt.size(0)
    x = prompt[start_pos:].view(1, -1).repeat(batch_size, 1)  # [B, T - start_pos]
    input_pos = torch.arange(start_pos, T, device=device)
    rows = [[] for _ in range(batch_size)]
    done = [False] * batch_size

    def take(tokens: Tensor) -> bool:  # tokens: [B, n]; True when every row has stopped
        for i, new in enumerate(tokens.tolist()):  # the host sync that streaming and stopping need
            for t in new:
                if done[i]:
                    break
                rows[i].append(t)
                done[i] = t in eos_ids or (on_token is not None and on_token(i, t))
        return all(done)

    t0 = time.perf_counter()
    token = prefill_fn(model, x, input_pos, kv_len=model.attend_len(T - 1), **sampling_kwargs)
    finished = take(token)
    if speculator is not None:  # even when finished: in a chat the proposer's cache must keep up with the target's
        speculator.prefill(prompt, start_pos)
    t1 = time.perf_counter()
    steps = 0
    if not finished:
        pos = torch.tensor([T], device=device)
        decode = decode_n_tokens if speculator is None else speculator.decode
        for token in decode(model, token, pos, max_new_tokens - 1, decode_fn, **sampling_kwargs):
            steps += 1
            if take(token):
                break
    return rows, {"ttft_s": t1 - t0, "decode_s": time.perf_counter() - t1, "steps": steps}


# ---------------------------------------------------------------------------------------------------------------
# Command line


def compile_step(fn: Callable, device: torch.device) -> Callable:
    """torch.compile(fn) for one model whose weights and caches keep their shapes: a decode step, a verify pass.

    Inductor settings go in `options`, per compiled function, so nothing leaks into other compiled code. Measured on
    SmolLM2-135M's CPU decode (BENCHMARKS.md), A/B in one process: realize_acc_reads_threshold=1 stores each
    pointwise result (a norm's output, say) once instead of recomputing it inside the loop of every consumer, as a
    step's matrix-vector loops otherwise redo the RMSNorm for each row of the weight (int8 +30%, int4 +30%, bf16
    +16%); cpp_wrapper calls the kernels from C++, saving ~3 ms of Python per step (+2-15%); floating-point
    contraction lets the C++ compiler fuse each multiply-add of the matrix-vector loops into one FMA instruction
    (Inductor passes -ffp-contract=off by default: bf16 +5%, int8 +5%, fp32 +3%); freezing was slower (it folds
    every weight.float() into a float32 copy: bf16 -33%), with max-autotune too. Before each call Dynamo would check
    ~500 guards on the modules the step reads (1-1.5 ms, 5-10% of a small model's step on a CPU); they are dropped,
    which is safe because every call here compiles fn afresh (isolate_recompiles: its graphs are its own), so a
    compiled step never meets another model. Callers make a new one after setup_caches. The number of cache
    positions attended to (fn's `kv_len` argument, Transformer.attend_len) is a dynamic size from the first trace
    on: one graph serves every length instead of a recompile when it first changes."""
    if device.type == "cuda":
        options = {"triton.cudagraphs": True}  # mode="reduce-overhead": CUDA graphs remove the per-kernel launches
        # a graph is recorded per attended length, as intended (attend_len keeps them few); this limit is read when
        # a graph is recorded, not at compile time, so it cannot go in `options`: it only silences a warning
        torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit = None
    else:
        options = dict(INDUCTOR_OPTIONS)
    options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    compiled = torch.compile(fn, fullgraph=True, isolate_recompiles=True, options=options)

    traced = False

    def step(*args, **kwargs):
        nonlocal traced
        if traced:
            return compiled(*args, **kwargs)
        # read when tracing, on the first call (a patch costs ~15 us: not on every step); a later retrace without it
        # would take kv_len as static, then as dynamic at its next value: one compile more, never a wrong result
        with torch.compiler.config.patch(dynamic_sources="L['kv_len']"):
            out = compiled(*args, **kwargs)
        traced = True
        return out
    return step


def compile_now(model: Transformer, prompt: Tensor, max_new_tokens: int, batch_size: int, fns: dict, sampling: dict,
                room: int) -> float:
    """Generate a few tokens after prompt so that compilation happens before anything is timed (the caller's caches
    are then overwritten from position 0); reports and returns the seconds it took."""
    n, t0 = min(max_new_tokens, room + 2), time.perf_counter()  # enough tokens for a verify pass too
    generate(model, prompt, n, batch_size, **fns, **sampling)
    compile_s = time.perf_counter() - t0
    print(f"compiled in {compile_s:.1f} s (a {n}-token generation, not counted below)", file=sys.stderr)
    return compile_s


def compiled_fns(device: torch.device, compile: bool, compile_prefill: bool) -> dict:
    """The prefill and decode functions for one model with its caches set up (see compile_step)."""
    fns = dict(prefill_fn=prefill, decode_fn=decode_one_token)
    if compile:
        fns["decode_fn"] = compile_step(decode_one_token, device)
    if compile_prefill:  # the prompt length varies between calls
        fns["prefill_fn"] = torch.compile(prefill, fullgraph=True, dynamic=True)
    return fns


def _load_model(checkpoint_path: Path, device: torch.device, dtype: torch.dtype) -> Transformer:
    t0 = time.perf_counter()
    model = load_model(checkpoint_path, device, dtype, transform=tp.apply_tp)  # under torchrun: this rank's part
    sync(device)
    print(f"loaded {checkpoint_path} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return model


def weight_bytes(model: Transformer) -> int:
    """Bytes of parameters and buffers (quantized weights and scales are buffers) but the token embedding's, of
    which a decode step reads one row; a tied matrix counts once, as the head. Call before setup_caches so the
    KV cache and rotary tables are not counted."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    tensors = {t.data_ptr(): t for name, t in named if not name.startswith("tok_embeddings.")}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class TextStream:
    """The text of one sequence as its tokens arrive, cut before the first stop string. Text is written to `out`
    (if given) once it can no longer turn into a stop string, so a stop string is never printed."""

    def __init__(self, tokenizer, stops=(), out=None):
        self.decoder = tokenizer.stream_decoder()
        self.stops = [s for s in stops if s]
        self.hold = max(map(len, self.stops), default=1) - 1
        self.out, self.text, self.shown, self.stopped = out, "", 0, False

    def push(self, token: int) -> bool:
        """Add a token; True once a stop string has appeared."""
        if not self.stopped:
            self._add(self.decoder.push(token))
        return self.stopped

    def finish(self) -> str:
        if not self.stopped:
            self._add(self.decoder.flush())
        self._show(len(self.text))
        return self.text

    def _add(self, new: str) -> None:
        start = max(0, len(self.text) - self.hold)  # an earlier stop string would have been found already
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        self._show(len(self.text) - (0 if self.stopped else self.hold))

    def _show(self, end: int) -> None:
        if self.out is not None and end > self.shown:
            self.out.write(self.text[self.shown:end])
            self.out.flush()
            self.shown = end


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def figures(model: Transformer, rows: list, timing: dict, prompt_len: int, weights: int, device) -> dict:
    ttft, decode_s = timing["ttft_s"], timing["decode_s"]
    new, total = max(map(len, rows)), ttft + decode_s
    steps = new - 1  # tokens decoded after the first: one per step, or several with speculative decoding
    decode_tps = steps / decode_s if steps else None
    bandwidth = None
    if decode_tps is not None:
        c, cache = model.config, model.layers[0].attention.kv_cache.k_cache
        avg_context = prompt_len + (steps + 1) / 2  # decode step j attends to prompt_len + j positions
        kv = 2 * c.n_layer * len(rows) * c.n_local_heads * c.head_dim * avg_context * cache.element_size()
        bandwidth = (weights + kv) * decode_tps / 1e9
    return dict(new_tokens=new, tokens_generated=sum(map(len, rows)), ttft_s=ttft, decode_s=decode_s,
                total_s=total, decode_tokens_per_s=decode_tps, e2e_tokens_per_s=new / total,
                throughput_tokens_per_s=sum(map(len, rows)) / total, bandwidth_gb_s=bandwidth,
                peak_memory_gb=peak_memory_gb(device))


def summarize(samples: list[dict]) -> dict:
    """Medians over the samples after the first (a warm-up), or over the only one."""
    counted = samples[1:] or samples
    keys = [k for k, v in counted[0].items() if isinstance(v, (int, float))]
    out = {}
    for k in keys:
        values = [s[k] for s in counted if s[k] is not None]
        out[k] = statistics.median(values) if values else None
    return out


def describe(f: dict) -> str:
    def num(v, unit, fmt=".1f"):
        return "n/a" if v is None else f"{v:{fmt}} {unit}"
    return (f"{f['new_tokens']} tokens, time to first token {num(f['ttft_s'], 's', '.3f')}, "
            f"decode {num(f['decode_tokens_per_s'], 'tok/s')}, end-to-end {num(f['e2e_tokens_per_s'], 'tok/s')}, "
            f"throughput {num(f['throughput_tokens_per_s'], 'tok/s')}, "
            f"bandwidth {num(f['bandwidth_gb_s'], 'GB/s', '.2f')}, peak memory {num(f['peak_memory_gb'], 'GB', '.2f')}")


def common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def user_messages(first: Sequence[str] = ()) -> Iterator[str]:
    """The user's messages of an interactive chat: `first` (echoed), then lines read from stdin until Ctrl-D;
    blank ones are skipped."""
    print("chat: type a message and press Enter; Ctrl-D ends", file=sys.stderr)
    for user in first:
        print(f"> {user}")
        if user.strip():
            yield user
    while True:
        try:
            user = input("> ")
        except EOFError:
            print()
            return
        if user.strip():
            yield user


def chat(model, tokenizer, args, device, max_seq_length: int, fns: dict, sampling: dict) -> None:
    """Multi-turn chat in the model's template. Each turn's prompt is the whole conversation; the cache still
    holds the tokens the conversation shares with the previous turn, so only the rest is prefilled."""
    messages, cached = [], []  # cached: the tokens whose keys/values are in the cache, from position 0
    for user in user_messages([] if args.prompt is None else [args.prompt]):
        messages.append(dict(role="user", content=user))
        ids = tokenizer.encode_chat(messages)
        if len(ids) > max_seq_length:
            raise BriskError(f"the conversation ({len(ids)} tokens) no longer fits --max_seq_length {max_seq_length}")
        start = min(common_prefix(cached, ids), len(ids) - 1)
        stream = TextStream(tokenizer, args.stop, sys.stdout)
        max_new_tokens = min(args.max_new_tokens, max_seq_length - len(ids) + 1)
        rows, timing = generate(model, torch.tensor(ids, device=device), max_new_tokens, eos_ids=tokenizer.eos_ids,
                                start_pos=start, on_token=lambda i, t: stream.push(t), **fns, **sampling)
        messages.append(dict(role="assistant", content=stream.finish()))
        print()
        cached = ids + rows[0][:-1]  # the last token was sampled but never fed through the model
        print(f"[{len(ids) - start} prompt tokens prefilled, {start} reused; {len(rows[0])} tokens, "
              f"{len(rows[0]) / (timing['ttft_s'] + timing['decode_s']):.1f} tok/s]", file=sys.stderr)


BANDWIDTH_HELP = (
    "achieved memory bandwidth GB/s = (bytes of weights read per decode step, i.e. the sum of parameter and buffer "
    "bytes of the model but the token embedding's (one row of it is read), a tied matrix counted once as the head, "
    "the KV cache excluded, + average KV cache bytes read "
    "per step, i.e. 2 * n_layer * batch_size * n_kv_heads * head_dim * average context length * the cache's "
    "element size (4 on the CPU, where the cache holds fp32), the average context length being prompt tokens + "
    "(decode steps + 1) / 2) * decode tokens/s")
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


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The flags of every script that generates (generate.py, generate_prefill.py): the model, chat, sampling, cache
    length, device, compilation, figures file, torchrun and speculative decoding; check_generation_args checks them."""
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"model.pth in a checkpoint directory (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--interactive", action="store_true", help="multi-turn chat on stdin (--prompt: first message)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="per sample, prompt or turn (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    p.add_argument("--top_k", type=int, default=200, help="sample from the k most likely tokens (default 200)")
    p.add_argument("--top_p", type=float, default=None,
                   help="then from the fewest tokens whose probability reaches p, in (0, 1] (default: off)")
    p.add_argument("--stop", nargs="+", default=[], help="stop when one of these strings is generated")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling and random prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="default bfloat16")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help=f"KV cache length (default: the longest prompt + max_new_tokens, or "
                        f"{INTERACTIVE_MAX_SEQ_LENGTH} with --interactive; at most the model's block_size)")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill too (dynamic shapes)")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.add_argument("--dist_timeout", type=float, default=None,
                   help=f"under torchrun: seconds a rank waits for the others before failing "
                        f"(default {tp.DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    import speculative  # it imports this module
    speculative.add_args(p)


def check_generation_args(args: argparse.Namespace) -> None:
    """Checks of add_generation_args's flags that need no model (speculative.check_args does the speculative ones);
    turns args.device into a torch.device."""
    check_at_least_one(args, "max_new_tokens", "top_k", "max_seq_length")
    if not 0 <= args.temperature < float("inf"):  # also refuses nan
        raise BriskError(f"--temperature must be >= 0 and finite, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise BriskError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.json is not None:
        check_writable(args.json, args.force)
    check_checkpoint(args.checkpoint_path)
    args.device = parse_device(args.device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=FIGURES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=None,
                   help='text to continue (default "Hello, my name is"); an integer N: a random N-token prompt')
    p.add_argument("--num_samples", type=int, default=1, help="times to generate (default 1; the first is a warm-up)")
    p.add_argument("--batch_size", type=int, default=1, help="copies of the prompt generated at once (default 1)")
    p.add_argument("--profile", type=Path, default=None, help="write a torch.profiler trace of the last sample")
    add_generation_args(p)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_at_least_one(args, "num_samples", "batch_size")
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


def start(args: argparse.Namespace, check: Callable[[argparse.Namespace], None]):
    """What a generation script does before loading weights: join torchrun's process group, check the flags with
    `check`, then check them against the model's config and tokenizer. Returns (rank, world, config, tokenizer)."""
    rank, world = tp.maybe_init_dist(args.dist_timeout)  # under torchrun; ranks other than 0 print nothing
    check(args)
    config = load_config(args.checkpoint_path)
    tp.check_divisible(config, world)
    if args.interactive and world > 1:
        raise BriskError("--interactive reads stdin in a single process; run it without torchrun")
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    import speculative  # it imports this module
    speculative.check_args(args, config, tokenizer.vocab_size, world)  # sets args.speculate_k when speculating
    return rank, world, config, tokenizer


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, config, tokenizer = start(args, check_args)
    import speculative  # it imports this module
    device, dtype = args.device, DTYPES[args.dtype]
    if args.interactive:
        ids, shown = [], None
        max_seq_length = args.max_seq_length or min(config.block_size, INTERACTIVE_MAX_SEQ_LENGTH)
    else:
        ids, shown = encode_prompt(args, tokenizer, min(tokenizer.vocab_size, config.vocab_size))
        max_seq_length = args.max_seq_length or min(len(ids) + args.max_new_tokens, config.block_size)
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
    model = _load_model(args.checkpoint_path, device, dtype)
    weights = weight_bytes(model)
    room = args.speculate_k or 0  # a verify pass writes k positions past the last token taken
    model.setup_caches(args.batch_size, max_seq_length + room)
    fns = compiled_fns(device, args.compile, args.compile_prefill)
    if args.speculate_k:
        fns["speculator"] = speculative.build(args, device, dtype, max_seq_length + room)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    prompt = torch.tensor(ids or [0, 0], device=device)  # a chat has no prompt yet: the warm-up makes one up
    compile_s = None
    if args.compile or args.compile_prefill:  # compile now, so that no sample's (or chat reply's) figures include it
        compile_s = compile_now(model, prompt, max_new_tokens, args.batch_size, fns, sampling, room)
    if args.interactive:  # its first turn prefills from position 0, over what the warm-up left in the cache
        return chat(model, tokenizer, args, device, max_seq_length, fns, sampling)
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
            rows, timing = generate(model, prompt, max_new_tokens, args.batch_size, eos_ids=tokenizer.eos_ids,
                                    on_token=lambda r, t: streams[r].push(t), **fns, **sampling)
        texts = [s.finish() for s in streams]
        if args.batch_size == 1:
            print()
        else:
            for text in texts:
                print((shown or "") + text)
        samples.append(figures(model, rows, timing, len(ids), weights, device))
        label = f"sample {i + 1}" + (" (warm-up)" if i == 0 and args.num_samples > 1 else "")
        print(f"{label}: {describe(samples[-1])}", file=sys.stderr)
        if args.speculate_k:
            samples[-1].update(speculative.figures(fns["speculator"].stats, args.speculate_k))
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
                   weight_bytes=weights, **sampling, compile_s=compile_s, **speculative.settings(args))
        report = dict(config=cfg, samples=samples, summary=summary, bandwidth_formula=BANDWIDTH_HELP)
        save_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=2)), args.force)


if __name__ == "__main__":
    run_cli(main)
