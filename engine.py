"""The generation engine: the prefill and decode steps, generate(), compiled steps, the length
policy of the KV cache, and `prepare`, which every script calls to get a model ready to generate
(an Engine).

    engine = prepare(checkpoint_path, device, dtype, batch_size=1, max_seq_length=512, compile=True)
    rows, timing = engine.generate(prompt, max_new_tokens, temperature=0.8, top_k=200)
"""
import functools
import sys
import time
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

import tp
from checkpoint import load_model
from cli import BriskError
from compile_cache import TALLY, SavedStep
from cpu import INDUCTOR_OPTIONS
from model import Transformer
from report import weight_bytes
from sampling import TOKEN_DTYPE, sample, stop_reason

# default cache length for a conversation, whose final length is unknown
INTERACTIVE_MAX_SEQ_LENGTH = 4096
DEFAULT_SEQ_LENGTH = 1024  # the shortest default cache: see cache_length
# generate() prefills a longer prompt in pieces of this many positions: bounded memory
PREFILL_CHUNK = 2048

# --------------------------------------------------------------------------------------------------
# Generation


def prefill(model: Transformer, x: Tensor, input_pos: Tensor, attend_len: Optional[int] = None,
            **sampling_kwargs) -> Tensor:
    # x: [B, T] at positions input_pos: [T] -> first new token [B, 1]; attend_len: see
    # Transformer.forward
    logits = model(x, input_pos, logits_to_keep=1, attend_len=attend_len)
    return sample(logits[:, -1], **sampling_kwargs)[0]


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor,
                     attend_len: Optional[int] = None, **sampling_kwargs) -> tuple[Tensor, Optional[Tensor]]:
    # x: [B, 1] at input_pos: [1] -> (next token [B, 1], probs [B, V] or None when greedy)
    logits = model(x, input_pos, attend_len=attend_len)
    return sample(logits[:, -1], **sampling_kwargs)


def decode_n_tokens(model: Transformer, cur_token: Tensor, input_pos: Tensor, num_new_tokens: int,
                    decode_fn: Callable = decode_one_token, **sampling_kwargs) -> Iterator[Tensor]:
    """Feed each sampled token back in, yielding the next one [B, 1]; the caller stops early by not
    asking."""
    pos = int(input_pos[-1])  # read once; the host counts the positions after it
    for _ in range(num_new_tokens):
        next_token, _ = decode_fn(model, cur_token, input_pos, attend_len=model.attend_len(pos),
                                  **sampling_kwargs)
        input_pos += 1
        pos += 1
        cur_token = next_token.clone()  # a CUDA graph's output is overwritten by its next replay
        yield cur_token


def cache_length(requested: Optional[int], needed: Optional[int], block_size: int) -> int:
    """The KV cache's length, one length policy for every script: `requested` (--max_seq_length)
    when given, at most block_size; else for `needed` positions DEFAULT_SEQ_LENGTH, or the first
    power of two beyond it that holds them, and for a conversation (needed None), whose final length
    is unknown, INTERACTIVE_MAX_SEQ_LENGTH; at most block_size. A compiled step is made (and saved)
    for one cache size, so that every prompt up to that length runs it: the length attended to, not
    the cache's, follows the prompt."""
    if requested is not None:
        if requested > block_size:
            raise BriskError(f"--max_seq_length {requested} exceeds the model's block_size {block_size}")
        return requested
    n = DEFAULT_SEQ_LENGTH if needed is not None else INTERACTIVE_MAX_SEQ_LENGTH
    while needed is not None and n < needed:
        n *= 2
    return min(n, block_size)


def check_fits(n: int, max_seq_length: int, block_size: Optional[int] = None,
               what: str = "the prompt") -> None:
    """Refuse `what` of n tokens where the cache's max_seq_length positions (block_size's at most)
    cannot hold it."""
    if n > max_seq_length:
        limit = f"--max_seq_length {max_seq_length}"
        if max_seq_length == block_size:
            limit = f"the model's block_size {block_size}"
        raise BriskError(f"{what} has {n} tokens, more than {limit}")


def tokens_that_fit(max_new_tokens: int, prompt_len: int, max_seq_length: int) -> int:
    """How many of max_new_tokens fit after a prompt of prompt_len tokens: the last token is never
    fed back."""
    return min(max_new_tokens, max_seq_length - prompt_len + 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, batch_size: int = 1, *,
             eos_ids=(), start_pos: int = 0, on_token: Optional[Callable[[int, int], bool]] = None,
             prefill_fn: Callable = prefill, decode_fn: Callable = decode_one_token,
             speculator=None, **sampling_kwargs):
    """Sample up to max_new_tokens after prompt [T] for batch_size copies of it.

    The caches must already hold max_seq_length >= T + max_new_tokens - 1 positions; positions below
    start_pos are taken as already in the cache (the earlier turns of a conversation) and are not
    computed again. A row stops as sampling.stop_reason says, on_token(row, token) telling whether a
    token it has just taken ends it (eos ids are not passed to it); generation ends when every row
    has stopped. A speculator (speculative.Speculator, batch_size 1) proposes tokens that the target
    verifies several at a time. Returns (the new tokens of each row, {"ttft_s", "decode_s", "steps",
    "load_s": the seconds the decode step took to load, left out of decode_s}).
    """
    device = prompt.device
    T = prompt.size(0)
    input_pos = torch.arange(T, device=device)
    rows = [[] for _ in range(batch_size)]
    done = [False] * batch_size
    # row i's on_token(token)
    stops = [on_token and functools.partial(on_token, i) for i in range(batch_size)]

    def append(tokens: Tensor) -> bool:  # tokens: [B, n] -> rows; True when every row has stopped
        for i, new in enumerate(tokens.tolist()):  # the host sync that streaming and stopping need
            for t in new:
                if done[i]:
                    break
                rows[i].append(t)
                done[i] = bool(stop_reason(t, len(rows[i]), max_new_tokens, eos_ids, stops[i]))
        return all(done)

    # a SavedStep (CPU) loads a saved step at its first call
    saved = getattr(decode_fn, "compiled", None)
    load_s, t0 = getattr(saved, "load_s", 0.0), time.perf_counter()
    starts, C = range(start_pos, T, PREFILL_CHUNK), PREFILL_CHUNK
    # a long prompt in pieces: the activations' memory does not grow with its length
    for s in starts[:-1]:
        x = prompt[s:s + C].repeat(batch_size, 1)  # [B, C]
        model(x, input_pos[s:s + C], attend_len=model.attend_len(s + C - 1, C), logits_to_keep=1)
    s = starts[-1]
    x = prompt[s:].repeat(batch_size, 1)  # [B, T - s]
    token = prefill_fn(model, x, input_pos[s:], attend_len=model.attend_len(T - 1, T - s),
                       **sampling_kwargs)
    finished = append(token)
    # even when finished: in a chat the proposer's cache must keep up with the target's
    if speculator is not None:
        speculator.prefill(prompt, start_pos)
    t1 = time.perf_counter()
    steps = 0
    if not finished:
        pos = torch.tensor([T], device=device)
        decode = decode_n_tokens if speculator is None else speculator.decode
        for token in decode(model, token, pos, max_new_tokens - 1, decode_fn, **sampling_kwargs):
            steps += 1
            if append(token):
                break
    load_s = getattr(saved, "load_s", 0.0) - load_s  # not decode time (Engine.warm_up)
    return rows, {"ttft_s": t1 - t0, "decode_s": time.perf_counter() - t1 - load_s,
                  "load_s": load_s, "steps": steps}


# --------------------------------------------------------------------------------------------------
# Compiled steps


def compile_step(fn: Callable, device: torch.device, what: str = "the decode step") -> Callable:
    """torch.compile(fn) for one model whose weights and caches keep their shapes: a decode step, a
    verify pass. fn(model, ...) takes the model first; `what` names it in the line printed while it
    compiles.

    On the CPU (one process) the compiled step is saved and the next run loads it instead of
    compiling (compile_cache.SavedStep). Inductor settings go in `options`, per compiled function,
    so nothing leaks into other compiled code (the CPU's are cpu.INDUCTOR_OPTIONS). Dynamo's guards
    on the modules the step reads are dropped (they cost a noticeable share of a small model's step:
    BENCHMARKS.md, "Compiled decode step"), which is safe because every call here compiles fn afresh
    (isolate_recompiles) and the step refuses a model whose KV cache is not the one it was traced
    with: make a new step after setup_caches reallocates (Engine.setup does). The number of cache
    positions attended to (fn's `attend_len` argument) is a dynamic size from the first trace on:
    one graph serves every length."""
    if device.type == "cuda":
        # mode="reduce-overhead": CUDA graphs remove the per-kernel launches. Coordinate descent
        # tuning, as gpt-fast sets it: only with it does Inductor write a one-row product as its own
        # reduction (its decomposition of aten.mm), which reaches peak bandwidth and fuses int8's
        # conversion into the product instead of writing a bf16 copy of each weight on every step
        # for cuBLAS
        options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
        # a graph is recorded per attended length, as intended (attend_len keeps them few); this
        # limit is read when a graph is recorded, not at compile time, so it cannot go in `options`:
        # it only silences a warning
        torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit = None
    else:
        options = dict(INDUCTOR_OPTIONS)
    # ranks' collectives are not saved
    if device.type == "cpu" and not torch.distributed.is_initialized():
        compiled = SavedStep(fn, options, what, dynamic=("attend_len",))
    else:
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        compiled = torch.compile(fn, fullgraph=True, isolate_recompiles=True, options=options)
    traced_with = None  # the KV cache of the model the step was traced with
    shapes = set()  # the input shapes seen: a new one may trace a graph (batch.Batch's row count)

    def step(model: Transformer, *args, **kwargs):
        nonlocal traced_with
        cache = model.layers[0].attention.kv_cache
        shape = tuple(a.shape for a in args if isinstance(a, Tensor))
        if cache is traced_with and shape in shapes:
            return compiled(model, *args, **kwargs)
        if traced_with is not None and cache is not traced_with:
            raise BriskError("a compiled step ran against a KV cache other than the one it was traced with "
                             "(setup_caches reallocated it, or another model): compile a new step")
        # read when tracing (a patch costs ~15 us: not on every step); a trace without it would take
        # attend_len as static, then as dynamic at its next value: one compile more, never a wrong
        # result
        with torch.compiler.config.patch(dynamic_sources="L['attend_len']"):
            out = compiled(model, *args, **kwargs)
        traced_with = cache
        shapes.add(shape)
        return out
    step.compiled = compiled
    return step


# --------------------------------------------------------------------------------------------------
# A model ready to generate


def load(checkpoint_path, device: torch.device, dtype: torch.dtype,
         kv_cache_dtype: Optional[torch.dtype] = None) -> Transformer:
    """load_model under torchrun (this rank's part, tp.py) or alone, reporting the time it took; its
    KV cache will hold kv_cache_dtype (torch.int8), or by default the model's dtype
    (model.Transformer.kv_cache_dtype)."""
    t0 = time.perf_counter()
    model = load_model(checkpoint_path, device, dtype, transform=tp.apply_tp)
    model.kv_cache_dtype = kv_cache_dtype
    sync(device)
    print(f"loaded {checkpoint_path} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return model


class Engine:
    """A loaded model with its KV caches, its prefill and decode steps (compiled or not) and, when
    speculating, its speculator. setup() sizes it for a batch size and sequence length; generate()
    runs generate() with it."""

    def __init__(self, model: Transformer, compile: bool = False, compile_prefill: bool = False,
                 speculation=None):
        self.model, self.compile, self.compile_prefill, self.speculation = model, compile, compile_prefill, speculation
        self.device, self.dtype = model.norm.weight.device, model.norm.weight.dtype
        self.weight_bytes = weight_bytes(model)  # before the caches exist, so they are not counted
        self.prefill_fn, self.decode_fn, self.speculator = prefill, decode_one_token, None
        self.max_seq_length = 0

    def setup(self, batch_size: int, max_seq_length: int) -> None:
        """Caches for batch_size sequences of max_seq_length positions (plus the k positions a
        verify pass writes past the last token taken), new steps compiled for them, and the
        speculator with a cache as long."""
        ahead = self.speculation.k if self.speculation else 0
        self.model.setup_caches(batch_size, max_seq_length + ahead)
        self.max_seq_length = max_seq_length
        self.prefill_fn, self.decode_fn = prefill, decode_one_token
        if self.compile:
            self.decode_fn = compile_step(decode_one_token, self.device)
        if self.compile_prefill:  # the prompt length varies between calls
            self.prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True)
        if self.speculation:
            self.speculator = self.speculation.build(self.device, self.dtype,
                                                     max_seq_length + ahead, self.compile,
                                                     self.model.kv_cache_dtype)

    def generate(self, prompt: Tensor, max_new_tokens: int, batch_size: int = 1, **kwargs):
        """generate() with this engine's steps and speculator."""
        return generate(self.model, prompt, max_new_tokens, batch_size, prefill_fn=self.prefill_fn,
                        decode_fn=self.decode_fn, speculator=self.speculator, **kwargs)

    def warm_up(self, prompt: Tensor, max_new_tokens: int, batch_size: int, **sampling) -> float:
        """Generate a few tokens after prompt so that compilation happens before anything is timed
        (the caches are then overwritten from position 0); reports and returns the seconds it took.
        A plain generation whose decode step is saved (a warm start) skips it: the step loads at its
        first call, after the first token, which then comes without waiting for it."""
        if self.saved_step(prompt, batch_size, **sampling):
            print("brisk: the compiled decode step is saved: it loads after the first token",
                  file=sys.stderr)
            return 0.0
        k = self.speculation.k if self.speculation else 0
        # enough tokens for a verify pass too
        n, t0 = min(max_new_tokens, k + 2), time.perf_counter()
        before = dict(TALLY)
        self.generate(prompt, n, batch_size, **sampling)
        compile_s = time.perf_counter() - t0
        loaded, built = (TALLY[k] - before[k] for k in ("loaded", "compiled"))
        saved = f"{loaded} step{'s' * (loaded != 1)} loaded, {built} compiled; " if loaded + built else ""
        print(f"compiled in {compile_s:.1f} s ({saved}a {n}-token generation, not counted below)",
              file=sys.stderr)
        return compile_s

    def saved_step(self, prompt: Tensor, batch_size: int, **sampling) -> bool:
        """True where every step a plain generation compiles is saved: the decode step
        (SavedStep.saved), and no speculator's or compiled prefill."""
        saved = getattr(self.decode_fn, "compiled", None)
        if not isinstance(saved, SavedStep) or self.speculator is not None or self.compile_prefill:
            return False
        T = prompt.numel()
        x = torch.zeros(batch_size, 1, dtype=TOKEN_DTYPE, device=self.device)  # [B, 1], as drawn
        pos = torch.tensor([T], device=self.device)  # [1]
        return saved.saved(self.model, x, pos, attend_len=self.model.attend_len(T), **sampling)


def prepare(checkpoint_path, device: torch.device, dtype: torch.dtype,
            batch_size: Optional[int] = None, max_seq_length: Optional[int] = None,
            compile: bool = False, compile_prefill: bool = False,
            speculation=None, kv_cache_dtype: Optional[torch.dtype] = None) -> Engine:
    """Load the checkpoint (this rank's part under torchrun), count its weight bytes, and, given the
    sizes, set it up for batch_size sequences of max_seq_length positions (else call Engine.setup
    before generating). `speculation` (speculative.Speculation) has `k`, the positions a verify pass
    writes past the last token taken, and build(device, dtype, max_seq_length, compile,
    kv_cache_dtype) -> its Speculator. kv_cache_dtype: see load."""
    engine = Engine(load(checkpoint_path, device, dtype, kv_cache_dtype), compile, compile_prefill,
                    speculation)
    if batch_size is not None:
        engine.setup(batch_size, max_seq_length)
    return engine


def common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
