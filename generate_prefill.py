"""Generate with prefix caching: the keys/values of prompt beginnings seen before are copied back into the KV cache
instead of being computed again, so a long shared context costs its prefill once (once ever, with --cache_file).

    python generate_prefill.py --context doc.txt --prompt "Summarize it." --prompt "Who wrote it?" --chat \\
        --cache_file doc.cache

Each prompt is the context followed by the prompt text (with --chat: the context is the system message). Without
--context the cache still serves the longest cached beginning of each prompt. Generated text goes to stdout; per
prompt, the cached and prefilled token counts and the time to first token go to stderr (and to --json).
The other flags are generate.py's. With a draft model (--draft_checkpoint_path, --draft) its keys/values are cached
and restored with the target's, so neither prefills a cached prefix again. Under torchrun (tp.py) each rank caches
its own part of the keys/values, and --cache_file c.pt becomes one file per rank (c.rank0-of-2.pt, ...).
"""
import argparse
import hashlib
import json
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

import generate as gen
import speculative
from cli import BriskError, run_cli, save_atomic
from model import Transformer

CACHE_FORMAT = "brisk-prefix-cache/2"
DEFAULT_BUDGET_MB = 2048

# ---------------------------------------------------------------------------------------------------------------
# The cache


def fingerprint(checkpoint_path: Path) -> str:
    """sha256 of the checkpoint's size and first and last MiB: tells checkpoints apart without reading them whole."""
    path, mib = Path(checkpoint_path), 1 << 20
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(mib))
        f.seek(max(0, size - mib))
        h.update(f.read(mib))
    return h.hexdigest()


def model_meta(model: Transformer, checkpoint_path: Path, rank: int = 0, world: int = 1) -> dict:
    """What a cache file's keys/values belong to: the model (under torchrun: this rank's part) and its weights."""
    return dict(config=model.config.to_dict(), fingerprint=fingerprint(checkpoint_path),
                split=dict(rank=rank, world=world))


def split_name(split: dict) -> str:
    return "a single process" if split["world"] == 1 else f"rank {split['rank']} of {split['world']} processes"


def rank_file(path: Path, rank: int, world: int) -> Path:
    """Under torchrun each rank caches its own part of the keys/values, in its own file: c.pt -> c.rank0-of-2.pt."""
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class PrefixCache:
    """Keys/values of token prefixes, for one or more models that share a tokenizer (say a model and its draft).

    An entry maps a prefix (a tuple of token ids, BOS included) to one tensor per model [n_layer, 2, Hkv, n, D]:
    k and v of batch row 0 at positions 0..n-1, only that slice of the KV cache. Entries are kept in
    least-recently-used order and evicted beyond `budget_bytes`; they live on `device` (CPU memory by default).
    """

    def __init__(self, models: Sequence[Transformer], metas: Sequence[dict], budget_bytes: int, device="cpu"):
        self.models, self.metas = list(models), list(metas)
        self.dtype = models[0].norm.weight.dtype
        self.budget, self.device = budget_bytes, torch.device(device)
        # copies from pinned memory to the GPU run asynchronously
        self.pin = self.device.type == "cpu" and models[0].norm.weight.device.type == "cuda"
        self.entries: OrderedDict[tuple, list[Tensor]] = OrderedDict()  # least recently used first
        self.nbytes = 0

    def shape(self, model: Transformer, n: int) -> tuple:
        c = model.config
        return (c.n_layer, 2, c.n_local_heads, n, c.head_dim)  # [L, 2, Hkv, n, D]

    def bytes_per_token(self) -> int:
        size = self.dtype.itemsize
        return sum(2 * m.config.n_layer * m.config.n_local_heads * m.config.head_dim * size for m in self.models)

    def longest_prefix(self, ids: Sequence[int]) -> tuple[Optional[tuple], int]:
        """The entry sharing the most leading tokens with ids, and how many it shares."""
        best, m = None, 0
        for key in self.entries:
            n = gen.common_prefix(key, ids)
            if n > m:
                best, m = key, n
        return best, m

    def restore(self, ids: Sequence[int], limit: int) -> int:
        """Copy the keys/values of the longest cached prefix of ids, at most `limit` tokens, into the models' KV
        caches in place (compiled code and CUDA graphs keep their buffers); returns the number of positions."""
        key, m = self.longest_prefix(ids)
        m = min(m, limit)
        if m == 0:
            return 0
        self.entries.move_to_end(key)
        for model, kv in zip(self.models, self.entries[key]):
            for layer, t in zip(model.layers, kv):  # t: [2, Hkv, n, D]
                cache = layer.attention.kv_cache
                cache.k_cache[0, :, :m].copy_(t[0, :, :m], non_blocking=True)
                cache.v_cache[0, :, :m].copy_(t[1, :, :m], non_blocking=True)
        return m

    def store(self, ids: Sequence[int]) -> bool:
        """Keep the keys/values of ids, which the models' KV caches hold at positions 0..len(ids)-1. An entry that
        ids extends is replaced; False if they alone exceed the budget."""
        key, n = tuple(ids), len(ids)
        for k in self.entries:
            if len(k) >= n and k[:n] == key:  # already cached
                self.entries.move_to_end(k)
                return True
        if n == 0 or n * self.bytes_per_token() > self.budget:
            return False
        for k in [k for k in self.entries if key[:len(k)] == k]:
            self._drop(k)
        kv = []
        for model in self.models:
            t = torch.empty(self.shape(model, n), dtype=self.dtype, device=self.device, pin_memory=self.pin)
            for i, layer in enumerate(model.layers):
                t[i, 0].copy_(layer.attention.kv_cache.k_cache[0, :, :n])
                t[i, 1].copy_(layer.attention.kv_cache.v_cache[0, :, :n])
            kv.append(t)
        self._add(key, kv)
        return True

    def _add(self, key: tuple, kv: list[Tensor]) -> None:
        self.entries[key] = kv
        self.nbytes += sum(t.numel() * t.element_size() for t in kv)
        while self.nbytes > self.budget:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple) -> None:
        self.nbytes -= sum(t.numel() * t.element_size() for t in self.entries.pop(key))

    def state(self) -> dict:
        """Plain tensors, token lists and metadata: loadable with torch.load(weights_only=True)."""
        return dict(format=CACHE_FORMAT, dtype=dtype_name(self.dtype), models=self.metas,
                    entries=[dict(tokens=list(k), kv=kv) for k, kv in self.entries.items()])

    def save(self, path: Path) -> None:
        save_atomic(path, lambda tmp: torch.save(self.state(), tmp), force=True)

    def load(self, path: Path) -> None:
        """Add the entries of a cache file written by save() for the same checkpoints and dtype."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # truncated, not a zip, or pickled objects
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BriskError(f"cannot read cache file {path}: {why}") from None
        if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT:
            raise BriskError(f"{path} is not a prefix cache file of this version ({CACHE_FORMAT})")
        if state.get("dtype") != dtype_name(self.dtype):
            raise BriskError(f"cache file {path} holds {state.get('dtype')} keys/values, this run uses "
                             f"{dtype_name(self.dtype)}: pass --dtype {state.get('dtype')} or another --cache_file")
        metas = state.get("models")
        if not (isinstance(metas, list) and all(isinstance(m, dict) and isinstance(m.get("config"), dict)
                                                for m in metas)):
            raise BriskError(f"cache file {path} is corrupt (no model metadata)")
        if len(metas) != len(self.metas):
            raise BriskError(f"cache file {path} holds the keys/values of {len(metas)} model(s), this run caches "
                             f"{len(self.metas)} (a draft model's are cached with the target's): use another "
                             "--cache_file")
        for theirs, ours in zip(metas, self.metas):
            if theirs.get("split") != ours["split"]:  # another rank's part, or another split of the model
                made = split_name(theirs["split"]) if isinstance(theirs.get("split"), dict) else "unknown processes"
                raise BriskError(f"cache file {path} was made by {made}, this is {split_name(ours['split'])}")
            if theirs["config"] != ours["config"]:
                diff = sorted(k for k in ours["config"] if ours["config"][k] != theirs["config"].get(k))
                raise BriskError(f"cache file {path} was made for another model (config differs in {', '.join(diff)})")
            if theirs.get("fingerprint") != ours["fingerprint"]:
                raise BriskError(f"cache file {path} was made from another checkpoint (same config, other weights)")
        entries = state.get("entries")
        if not (isinstance(entries, list) and all(isinstance(e, dict) for e in entries)):
            raise BriskError(f"cache file {path} is corrupt (no entry list)")
        for e in entries:
            tokens, kv = e.get("tokens"), e.get("kv")
            if not (isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens)
                    and isinstance(kv, list) and len(kv) == len(self.models)
                    and all(isinstance(t, Tensor) and t.dtype == self.dtype and t.shape == self.shape(m, len(tokens))
                            for m, t in zip(self.models, kv))):
                raise BriskError(f"cache file {path} is corrupt (an entry does not match the model)")
            key = tuple(tokens)
            if key not in self.entries and len(tokens) * self.bytes_per_token() <= self.budget:
                self._add(key, [t.pin_memory() if self.pin else t for t in kv])


# ---------------------------------------------------------------------------------------------------------------
# Generation


def check_same_entries(cache: PrefixCache) -> None:
    """Under torchrun every rank must restore the same prefixes (and evict alike), or the ranks would run different
    computations: their caches must hold the same keys in the same order."""
    if not dist.is_initialized():
        return
    digest = int(hashlib.sha256(repr(list(cache.entries)).encode()).hexdigest()[:15], 16)
    t = torch.tensor([digest, -digest])
    dist.all_reduce(t, dist.ReduceOp.MAX)  # [max, -min]
    if t[0] != -t[1]:
        raise BriskError("the ranks' cache files hold different prefixes (one missing, or from another run): "
                         "delete them or use another --cache_file")


def generate_cached(model: Transformer, cache: PrefixCache, ids: list[int], max_new_tokens: int, **kwargs):
    """gen.generate after restoring the longest cached prefix of ids, so only the rest is prefilled. Returns
    (new tokens, timing with time to first token including the restore, number of cached tokens)."""
    t0 = time.perf_counter()
    cached = cache.restore(ids, len(ids) - 1)  # the last prompt token is always prefilled: it gives the logits
    restore_s = time.perf_counter() - t0
    device = model.norm.weight.device
    rows, timing = gen.generate(model, torch.tensor(ids, device=device), max_new_tokens, start_pos=cached, **kwargs)
    timing["ttft_s"] += restore_s
    timing["restore_s"] = restore_s
    return rows[0], timing, cached


def read_context(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    path = Path(value)
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
            return self.tokenizer.encode_chat([*self.messages, *history, dict(role="user", content=text)])
        return self.context_ids + self.tokenizer.encode(text, bos=False if self.context_ids else None)

    def shared(self, ids: Sequence[int]) -> int:
        """Leading tokens of ids that belong to the context (a chat template may render them slightly apart)."""
        return gen.common_prefix(self.context_ids, ids)


def describe(i: int, s: dict, draft: bool = False) -> str:
    """One prompt's figures; with a draft model, its cache is restored and prefilled exactly as the target's."""
    tps = "n/a" if s["decode_tokens_per_s"] is None else f"{s['decode_tokens_per_s']:.1f} tok/s"
    both = " (each for the target and the draft)" if draft else ""
    line = (f"[prompt {i}: {s['prompt_tokens']} tokens, {s['cached_tokens']} cached, {s['prefilled_tokens']} "
            f"prefilled{both}; time to first token {s['ttft_s']:.3f} s; {s['new_tokens']} new tokens, decode {tps}]")
    return line if "verifications" not in s else f"{line}\n[prompt {i}: {speculative.describe(s)}]"


def summary(stats: list[dict]) -> dict:
    """Median time to first token of the prompts prefilled from scratch (cold) and of those that hit the cache."""
    cold = [s["ttft_s"] for s in stats if s["cached_tokens"] == 0]
    hot = [s["ttft_s"] for s in stats if s["cached_tokens"] > 0]
    out = dict(cold_prompts=len(cold), cached_prompts=len(hot),
               cold_ttft_s=statistics.median(cold) if cold else None,
               cached_ttft_s=statistics.median(hot) if hot else None)
    out["speedup"] = out["cold_ttft_s"] / out["cached_ttft_s"] if cold and hot else None
    return out


def interactive(conv: Conversation, run_turn, first: list[str]) -> None:
    """Multi-turn chat; each turn's prompt is the whole conversation, whose cached beginning is restored."""
    history = []
    for user in gen.user_messages(first):
        reply = run_turn(conv.encode(user, history), keep=None)
        history += [dict(role="user", content=user), dict(role="assistant", content=reply)]


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", default=None,
                   help="a file, or text: the shared beginning of every prompt (with --chat: the system message)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompts_file", type=Path, default=None, help="a file with one prompt per line")
    p.add_argument("--cache_file", type=Path, default=None,
                   help="load the prefix cache from this file if it exists, and save it there at the end")
    p.add_argument("--cache_budget_mb", type=float, default=DEFAULT_BUDGET_MB,
                   help="memory for cached keys/values, MiB; least recently used entries go first "
                        f"(default {DEFAULT_BUDGET_MB})")
    p.add_argument("--cache_device", default="cpu", help="where cached keys/values live (default cpu)")
    gen.add_generation_args(p)
    p.set_defaults(batch_size=1)  # one sequence per prompt (speculative.check_args reads it)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    gen.check_generation_args(args)
    if args.cache_budget_mb <= 0:
        raise BriskError(f"--cache_budget_mb must be positive, got {args.cache_budget_mb}")
    try:
        args.cache_device = torch.device(args.cache_device)
    except RuntimeError:
        raise BriskError(f"unknown device {args.cache_device!r}") from None
    if args.cache_file is not None:
        if args.cache_file.is_dir() or not args.cache_file.parent.is_dir():
            raise BriskError(f"--cache_file {args.cache_file}: not a file in an existing directory")


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, config, tokenizer = gen.start(args, check_args)
    device, dtype = args.device, gen.DTYPES[args.dtype]
    conv = Conversation(tokenizer, read_context(args.context), args.chat or args.interactive)
    prompts = read_prompts(args)
    if not prompts and not args.interactive and not conv.context_ids:
        raise BriskError("nothing to do: give --prompt, --prompts_file, --context or --interactive")
    all_ids = [] if args.interactive else [conv.encode(p) for p in prompts] or [conv.context_ids]
    longest = max(map(len, all_ids), default=0)
    if args.interactive:
        max_seq_length = args.max_seq_length or min(config.block_size, gen.INTERACTIVE_MAX_SEQ_LENGTH)
    else:
        max_seq_length = args.max_seq_length or min(longest + args.max_new_tokens, config.block_size)
    if max_seq_length > config.block_size:
        raise BriskError(f"--max_seq_length {max_seq_length} exceeds the model's block_size {config.block_size}")
    if len(conv.context_ids) >= max_seq_length:
        raise BriskError(f"the context has {len(conv.context_ids)} tokens, more than the KV cache holds with "
                         f"a prompt after it (--max_seq_length {max_seq_length})")
    if longest > max_seq_length:
        raise BriskError(f"a prompt has {longest} tokens, more than --max_seq_length {max_seq_length}")

    if args.seed is not None:
        torch.manual_seed(args.seed)
    model = gen._load_model(args.checkpoint_path, device, dtype)
    weights = gen.weight_bytes(model)
    room = args.speculate_k or 0  # a verify pass writes k positions past the last token taken
    model.setup_caches(1, max_seq_length + room)
    fns = gen.compiled_fns(device, args.compile, args.compile_prefill)
    models, metas = [model], [model_meta(model, args.checkpoint_path, rank, world)]
    if args.speculate_k:
        speculator = fns["speculator"] = speculative.build(args, device, dtype, max_seq_length + room)
        if isinstance(speculator.proposer, speculative.DraftModel):  # its keys/values are cached with the target's
            models.append(speculator.proposer.model)
            draft_path = args.draft_checkpoint_path or speculative.self_draft_path(args)
            metas.append(model_meta(models[1], draft_path, rank, world))
    cache = PrefixCache(models, metas, int(args.cache_budget_mb * 2**20), args.cache_device)
    context_bytes = len(conv.context_ids) * cache.bytes_per_token()
    if context_bytes > cache.budget:
        raise BriskError(f"the context's keys/values take {context_bytes / 2**20:.1f} MiB, more than "
                         f"--cache_budget_mb {args.cache_budget_mb:g}")
    cache_file = args.cache_file and rank_file(args.cache_file, rank, world)
    if cache_file is not None and cache_file.exists():
        cache.load(cache_file)
        print(f"loaded {len(cache.entries)} cached prefixes ({cache.nbytes / 2**20:.1f} MiB) from {cache_file}",
              file=sys.stderr)
    check_same_entries(cache)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    compile_s = None
    if args.compile or args.compile_prefill:  # before the first prompt, so that its cold figures do not include it
        compile_s = gen.compile_now(model, torch.tensor([0, 0], device=device), max_seq_length - 1, 1, fns, sampling,
                                    room)
    stats = []

    def run_turn(ids: list[int], keep: Optional[int], max_new_tokens: int = args.max_new_tokens,
                 show: bool = True) -> str:
        """Generate after ids and cache their first `keep` tokens (None: the whole conversation so far)."""
        if len(ids) > max_seq_length:
            raise BriskError(f"the conversation ({len(ids)} tokens) no longer fits --max_seq_length {max_seq_length}")
        stream = gen.TextStream(tokenizer, args.stop, sys.stdout if show else None)
        new, timing, cached = generate_cached(
            model, cache, ids, min(max_new_tokens, max_seq_length - len(ids) + 1), eos_ids=tokenizer.eos_ids,
            on_token=lambda _, t: stream.push(t), **fns, **sampling)
        text = stream.finish()
        if show:
            print()
        if not cache.store(ids + new[:-1] if keep is None else ids[:keep]):  # the last token never went through
            print("warning: this prompt's keys/values exceed --cache_budget_mb; not cached", file=sys.stderr)
        f = gen.figures(model, [new], timing, len(ids), weights, device)
        stats.append(dict(prompt_tokens=len(ids), cached_tokens=cached, prefilled_tokens=len(ids) - cached,
                          restore_s=timing["restore_s"], **f))
        if args.speculate_k:
            stats[-1].update(speculative.figures(speculator.stats, args.speculate_k))
        print(describe(len(stats), stats[-1], len(models) > 1), file=sys.stderr)
        return text

    if args.interactive:
        interactive(conv, run_turn, prompts)
    elif prompts:
        for text, ids in zip(prompts, all_ids):
            print(f"> {text}")
            run_turn(ids, keep=conv.shared(ids) if conv.context is not None else len(ids))
    else:  # only a context: prefill it into the cache (and --cache_file) for later runs
        run_turn(conv.context_ids, keep=len(conv.context_ids), max_new_tokens=1, show=False)

    s = summary(stats)
    if s["cold_ttft_s"] is not None and s["cached_ttft_s"] is not None:
        print(f"time to first token: cold {s['cold_ttft_s']:.3f} s (median of {s['cold_prompts']}), cached "
              f"{s['cached_ttft_s']:.3f} s (median of {s['cached_prompts']}): {s['speedup']:.1f}x faster",
              file=sys.stderr)
    print(f"prefix cache: {len(cache.entries)} entries, {cache.nbytes / 2**20:.1f} MiB of {args.cache_budget_mb:g} MiB",
          file=sys.stderr)
    if cache_file is not None:
        cache.save(cache_file)
        others = " (and the other ranks' parts beside it)" if world > 1 else ""
        print(f"saved the prefix cache to {cache_file}{others}", file=sys.stderr)
    if args.json is not None and rank == 0:
        cfg = dict(checkpoint=str(args.checkpoint_path), device=str(device), dtype=args.dtype, compile=args.compile,
                   compile_prefill=args.compile_prefill, compile_s=compile_s, context_tokens=len(conv.context_ids),
                   max_new_tokens=args.max_new_tokens, max_seq_length=max_seq_length, **sampling,
                   cache_file=str(args.cache_file) if args.cache_file else None, cache_budget_mb=args.cache_budget_mb,
                   **speculative.settings(args), cached_models=len(models))
        report = dict(config=cfg, prompts=stats, summary=s,
                      cache=dict(entries=len(cache.entries), bytes=cache.nbytes))
        save_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=2)), args.force)


if __name__ == "__main__":
    run_cli(main)
