"""A prefix cache: the keys/values of prompt beginnings seen before, copied back into the KV cache
instead of being computed again, kept in memory within a budget and saved to a file.
generate_prefill.py is its command line (generate_cached); a server keeps one across requests, for
the rows of its batch (PrefixBatch).
"""
import hashlib
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from batch import Batch
from cli import BriskError, save_atomic
from cpu import kv_width
from engine import common_prefix, generate
from report import kv_bytes_per_token
from model import Transformer

CACHE_FORMAT = "brisk-prefix-cache/2"


def fingerprint(checkpoint_path: Path) -> str:
    """sha256 of the checkpoint's size and first and last MiB: tells checkpoints apart without
    reading them whole."""
    path, mib = Path(checkpoint_path), 1 << 20
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(mib))
        f.seek(max(0, size - mib))
        h.update(f.read(mib))
    return h.hexdigest()


def model_meta(model: Transformer, checkpoint_path: Path, rank: int = 0, world: int = 1) -> dict:
    """What a cache file's keys/values belong to: the model (under torchrun: this rank's part) and
    its weights."""
    return dict(config=model.config.to_dict(), fingerprint=fingerprint(checkpoint_path),
                split=dict(rank=rank, world=world))


def split_name(split: dict) -> str:
    return "a single process" if split["world"] == 1 else f"rank {split['rank']} of {split['world']} processes"


def rank_file(path: Path, rank: int, world: int) -> Path:
    """Under torchrun each rank caches its own part of the keys/values, in its own file: c.pt ->
    c.rank0-of-2.pt."""
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class PrefixCache:
    """Keys/values of token prefixes, for one or more models that share a tokenizer (say a model and
    its draft).

    An entry maps a prefix (a tuple of token ids, BOS included) to one tensor per model [n_layer, 2,
    Hkv, n, D]: k and v of batch row 0 at positions 0..n-1, only that slice of the KV cache, as it
    holds them (an int8 cache: [n_layer, 2, Hkv, n, D + 4], values and scales, cpu.kv_store).
    Entries are kept in least-recently-used order and evicted beyond `budget_bytes`; they live on
    `device` (CPU memory by default).
    """

    def __init__(self, models: Sequence[Transformer], metas: Sequence[dict], budget_bytes: int,
                 device="cpu"):
        self.models, self.metas = list(models), list(metas)
        # the draft's is the target's
        self.dtype = models[0].kv_cache_dtype or models[0].norm.weight.dtype
        self.budget, self.device = budget_bytes, torch.device(device)
        # copies from pinned memory to the GPU run asynchronously
        self.pin = self.device.type == "cpu" and models[0].norm.weight.device.type == "cuda"
        self.entries: OrderedDict[tuple, list[Tensor]] = OrderedDict()  # least recently used first
        self.nbytes = 0

    def shape(self, model: Transformer, n: int) -> tuple:
        c = model.config
        # [L, 2, Hkv, n, D (int8: D + 4)]
        return (c.n_layer, 2, c.n_local_heads, n, kv_width(c.head_dim, self.dtype))

    def bytes_per_token(self) -> int:
        return sum(kv_bytes_per_token(m.config, self.dtype) for m in self.models)

    def longest_prefix(self, ids: Sequence[int]) -> tuple[Optional[tuple], int]:
        """The entry sharing the most leading tokens with ids, and how many it shares."""
        best, m = None, 0
        for key in self.entries:
            n = common_prefix(key, ids)
            if n > m:
                best, m = key, n
        return best, m

    def restore(self, ids: Sequence[int], limit: int, row: int = 0) -> int:
        """Copy the keys/values of the longest cached prefix of ids, at most `limit` tokens, into
        batch row `row` of the models' KV caches in place (compiled code and CUDA graphs keep their
        buffers); returns the number of positions."""
        key, m = self.longest_prefix(ids)
        m = min(m, limit)
        if m == 0:
            return 0
        self.entries.move_to_end(key)
        for model, kv in zip(self.models, self.entries[key]):
            for layer, t in zip(model.layers, kv):  # t: [2, Hkv, n, D]
                cache = layer.attention.kv_cache
                cache.k_cache[row, :, :m].copy_(t[0, :, :m], non_blocking=True)
                cache.v_cache[row, :, :m].copy_(t[1, :, :m], non_blocking=True)
        return m

    def store(self, ids: Sequence[int], row: int = 0) -> bool:
        """Keep the keys/values of ids, which batch row `row` of the models' KV caches holds at
        positions 0..len(ids)-1. An entry that ids extends is replaced; False if they alone exceed
        the budget."""
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
            t = torch.empty(self.shape(model, n), dtype=self.dtype, device=self.device,
                            pin_memory=self.pin)
            for i, layer in enumerate(model.layers):
                t[i, 0].copy_(layer.attention.kv_cache.k_cache[row, :, :n])
                t[i, 1].copy_(layer.attention.kv_cache.v_cache[row, :, :n])
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
            flag = "--kv_cache_dtype int8" if state.get("dtype") == "int8" else f"--dtype {state.get('dtype')}"
            raise BriskError(f"cache file {path} holds {state.get('dtype')} keys/values, this run uses "
                             f"{dtype_name(self.dtype)}: pass {flag} or another --cache_file")
        metas = state.get("models")
        if not (isinstance(metas, list)
                and all(isinstance(m, dict) and isinstance(m.get("config"), dict)
                        for m in metas)):
            raise BriskError(f"cache file {path} is corrupt (no model metadata)")
        if len(metas) != len(self.metas):
            raise BriskError(f"cache file {path} holds the keys/values of {len(metas)} model(s), this run caches "
                             f"{len(self.metas)} (a draft model's are cached with the target's): use another "
                             "--cache_file")
        for theirs, ours in zip(metas, self.metas):
            # another rank's part, or another split of the model
            if theirs.get("split") != ours["split"]:
                split = theirs.get("split")
                made = split_name(split) if isinstance(split, dict) else "unknown processes"
                raise BriskError(f"cache file {path} was made by {made}, this is {split_name(ours['split'])}")
            if theirs["config"] != ours["config"]:
                diff = sorted(k for k in ours["config"]
                              if ours["config"][k] != theirs["config"].get(k))
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
                    and all(isinstance(t, Tensor) and t.dtype == self.dtype
                            and t.shape == self.shape(m, len(tokens))
                            for m, t in zip(self.models, kv))):
                raise BriskError(f"cache file {path} is corrupt (an entry does not match the model)")
            key = tuple(tokens)
            if key not in self.entries and len(tokens) * self.bytes_per_token() <= self.budget:
                self._add(key, [t.pin_memory() if self.pin else t for t in kv])


def check_same_entries(cache: PrefixCache) -> None:
    """Under torchrun every rank must restore the same prefixes (and evict alike), or the ranks
    would run different computations: their caches must hold the same keys in the same order."""
    if not dist.is_initialized():
        return
    digest = int(hashlib.sha256(repr(list(cache.entries)).encode()).hexdigest()[:15], 16)
    t = torch.tensor([digest, -digest])
    dist.all_reduce(t, dist.ReduceOp.MAX)  # [max, -min]
    if t[0] != -t[1]:
        raise BriskError("the ranks' cache files hold different prefixes (one missing, or from another run): "
                         "delete them or use another --cache_file")


def generate_cached(model: Transformer, cache: PrefixCache, ids: list[int], max_new_tokens: int,
                    **kwargs):
    """engine.generate after restoring the longest cached prefix of ids, so only the rest is
    prefilled. Returns (new tokens, timing with time to first token including the restore, number of
    cached tokens)."""
    t0 = time.perf_counter()
    # the last prompt token is always prefilled: it gives the logits
    cached = cache.restore(ids, len(ids) - 1)
    restore_s = time.perf_counter() - t0
    device = model.norm.weight.device
    rows, timing = generate(model, torch.tensor(ids, device=device), max_new_tokens,
                            start_pos=cached, **kwargs)
    timing["ttft_s"] += restore_s
    timing["restore_s"] = restore_s
    return rows[0], timing, cached


class PrefixBatch(Batch):
    """batch.Batch whose rows start from the prefix cache: the longest cached beginning of a prompt
    is copied into its row and only the rest is prefilled; each prompt is then cached in turn.

        row = batch.add(ids, prefix=cache)   # batch.cached[row]: the prompt tokens restored
        row = batch.add(ids, prefix=cache, n=256)   # chunked: batch.fill(row, ids, 256) until True; then cached
    """

    def __init__(self, model: Transformer, max_rows: int, max_seq_length: int,
                 compile: bool = False):
        super().__init__(model, max_rows, max_seq_length, compile)
        self.cached: dict[int, int] = {}  # row -> prompt tokens restored from the prefix cache
        # row -> the cache its prompt goes to once prefilled whole
        self.storing: dict[int, PrefixCache] = {}

    @torch.no_grad()
    def add(self, ids: list[int], prefix: Optional[PrefixCache] = None,
            n: Optional[int] = None) -> int:
        """Batch.add after restoring the longest cached beginning of ids; n: chunked, as there (fill
        does the rest)."""
        row, start = self.free_row(), 0
        if prefix is not None and 0 < len(ids) <= self.max_seq_length:
            # the last token is prefilled: it gives the logits
            start = prefix.restore(ids, len(ids) - 1, row)
            self.storing[row] = prefix
        super().add(ids, start, row, n)
        self.cached[row] = start
        return row

    @torch.no_grad()
    def fill(self, row: int, ids: list[int], n: Optional[int] = None) -> bool:
        ready = super().fill(row, ids, n)
        if ready and row in self.storing:
            self.storing.pop(row).store(ids, row)
        return ready

    def remove(self, row: int) -> None:
        super().remove(row)
        del self.cached[row]
        self.storing.pop(row, None)  # there while its prompt is not all in
