"""Rows of different sequences decoded together in one static KV cache, each at its own position.

    batch = Batch(model, max_rows=4, max_seq_length=512, compile=True)
    row = batch.add(prompt_ids)            # prefilled alone, as a batch of one
    row = batch.add(prompt_ids, n=256)     # chunked: its first 256 tokens now, then fill(row, prompt_ids, 256)
                                           # between steps until it returns True (the row is then ready)
    logits = batch.last_logits(row)        # fp32 [V]
    out = batch.step({row: token, ...})    # one decode step of these rows -> {row: fp32 logits [V]}
    batch.remove(row)                      # frees the row; the others are unaffected

A row's logits do not depend on what else is in the batch (cpu.FEW_ROWS, model.attend): rows can
join and leave between steps (continuous batching), and eager greedy rows give exactly the tokens of
their prompts run alone. Compiled, exactly too where bf16 takes brisk's kernel on a CPU (a lone row
runs as two there: Batch.min_rows; and cpu.INDUCTOR_OPTIONS keeps eager's roundings), else within
rounding (BENCHMARKS.md, "A kernel for bf16 rows"). Sampling happens outside, with sampling.sample,
per row.
"""
import functools
import time
from typing import Callable, Optional

import torch
from torch import Tensor

from cli import BriskError
from cpu import two_rows_cost_one
from engine import check_fits, compile_step
from model import Transformer
from sampling import sample, stop_reason


def rows_step(model: Transformer, x: Tensor, input_pos: Tensor,
              attend_len: Optional[int] = None) -> Tensor:
    # x: [B, 1] tokens at input_pos: [B, 1] -> fp32 logits [B, V]
    return model(x, input_pos, attend_len=attend_len)[:, -1].float()


class Batch:
    def __init__(self, model: Transformer, max_rows: int, max_seq_length: int,
                 compile: bool = False):
        """Set up model's caches for max_rows rows of up to max_seq_length positions each. compile:
        one compiled decode step (engine.compile_step) serves every mix of rows and positions; where
        two rows cost no more than one (cpu.two_rows_cost_one), a lone row steps beside a spare one,
        so that a single graph serves every count and a row's logits never depend on the others
        (bitwise)."""
        model.setup_caches(max_rows, max_seq_length)
        self.model, self.max_rows, self.max_seq_length = model, max_rows, max_seq_length
        self.device = model.norm.weight.device
        # every layer's keys, then values: [max_rows, H, S, D] each
        self.caches = [c for layer in model.layers
                       for c in (layer.attention.kv_cache.k_cache,
                                 layer.attention.kv_cache.v_cache)]
        self.step_fn = compile_step(rows_step, self.device, "the batch step") if compile else rows_step
        # rows a step runs
        self.min_rows = 2 if compile and max_rows > 1 and two_rows_cost_one(model) else 1
        self.pos: dict[int, int] = {}  # row -> tokens in its cache, the position of its next token
        self.logits: dict[int, Tensor] = {}  # row -> fp32 logits [V] after its last token
        # row -> (src, n): its first n positions equal row src's
        self.shares: dict[int, tuple[int, int]] = {}
        self.views: dict[int, list[Tensor]] = {}  # row -> self.views_of(row, self.views_span)
        self.views_span = (0, 0)

    def __len__(self) -> int:
        return len(self.pos)

    def free_rows(self) -> int:
        return self.max_rows - len(self.pos)

    def free_row(self) -> int:
        """The lowest free row; BriskError when every row is taken."""
        row = next((r for r in range(self.max_rows) if r not in self.pos), None)
        if row is None:
            raise BriskError(f"the batch is full ({self.max_rows} rows)")
        return row

    @torch.no_grad()
    def add(self, ids: list[int], start: int = 0, row: Optional[int] = None,
            n: Optional[int] = None) -> int:
        """Prefill a free row (the lowest, or `row`) with ids alone (as a batch of one would be);
        returns the row. The row's cache already holds the first `start` positions (a restored
        prefix): only the rest is computed. n: only the next n positions now (chunked prefill),
        fill() computes the rest; the row steps once ready."""
        if not ids:
            raise BriskError("empty prompt")
        check_fits(len(ids), self.max_seq_length)
        row = self.free_row() if row is None else row
        self.pos[row] = start
        self.fill(row, ids, n)
        return row

    @torch.no_grad()
    def fill(self, row: int, ids: list[int], n: Optional[int] = None) -> bool:
        """Prefill the next n positions of row's prompt ids (None: all the rest) after the
        self.pos[row] its cache holds; True once the whole prompt is in: the row then has its logits
        and is ready to step. Between two fills the row may sit in steps of other rows: those write
        only its spare position."""
        start = self.pos[row]
        end = len(ids) if n is None else min(len(ids), start + n)
        if end > start:
            x = torch.tensor([ids[start:end]], device=self.device)  # [1, end - start]
            logits = self.model(x, torch.arange(start, end, device=self.device), logits_to_keep=1,
                                row=row)
            self.pos[row] = end
            if end == len(ids):
                self.logits[row] = logits[0, -1].float()
        return row in self.logits

    def fork(self, row: int) -> int:
        """A free row holding what row holds (its cache and logits); returns the new row."""
        new = self.free_row()
        self.pos[new], self.logits[new] = self.pos[row], self.logits[row]
        self.reorder({new: row})
        self.share(new, *self.shares.get(row, (row, self.pos[row])))
        return new

    def share(self, row: int, src: int, n: int) -> None:
        """Note that row's first n positions equal row src's (n = 0: none). Beams forked from one
        prompt then read it from one row in brisk's kernel (model.KVCache.prefix), so from memory
        once for all of them."""
        if n:
            self.shares[row] = (src, n)
        else:
            self.shares.pop(row, None)
        for layer in self.model.layers:
            layer.attention.kv_cache.prefix[row, 0], layer.attention.kv_cache.prefix[row, 1] = src - row, n

    @torch.no_grad()
    def reorder(self, parents: dict[int, int], start: int = 0) -> None:
        """Each row r in parents takes the cache positions from start on and the state of row
        parents[r], all at once (beam search; positions before start must already be alike, as a
        shared prompt is). In place: a compiled step keeps its buffers."""
        dst, src = list(parents), list(parents.values())
        end = max(self.pos[r] for r in src)
        # no row written is read: plain copies, in one call (a beam step's)
        if set(dst).isdisjoint(src):
            # up to a block past end: views made once per block
            span = (start, self.model.attend_len(end - 1))
            torch._foreach_copy_([v for r in dst for v in self.views_of(r, span)],
                                 [v for r in src for v in self.views_of(r, span)])
        else:
            for cache in self.caches:
                # the right side is gathered first
                cache[dst, :, start:end] = cache[src, :, start:end]
        for r, (s, n) in list(self.shares.items()):  # positions from start on may now differ
            if (r in parents or s in parents) and n > start:
                self.share(r, s, start)
        state = {r: (self.pos[p], self.logits[p]) for r, p in parents.items()}
        for r, (pos, logits) in state.items():
            self.pos[r], self.logits[r] = pos, logits

    def views_of(self, row: int, span: tuple[int, int]) -> list[Tensor]:
        """Views of row's cache positions span[0]..span[1]-1, keys and values of every layer, kept
        while the span stays (a beam search's copies at each step: making 60 views took longer than
        copying through them)."""
        if self.views_span != span:
            self.views, self.views_span = {}, span
        if row not in self.views:
            self.views[row] = [c[row, :, span[0]:span[1]] for c in self.caches]
        return self.views[row]

    def warm_up(self) -> None:
        """Step one row, then two, twice each (a CUDA graph is recorded on its second run), in an
        empty batch: a compiled step then has both its graphs before the first real step needs
        them."""
        rows = [self.add([0, 0]) for _ in range(min(2, self.max_rows))]
        for n in range(1, len(rows) + 1):
            for _ in range(2):
                self.step({r: 0 for r in rows[:n]})
        for r in rows:
            self.remove(r)

    def last_logits(self, row: int) -> Tensor:
        return self.logits[row]

    def remove(self, row: int) -> None:
        del self.pos[row]
        self.logits.pop(row, None)  # absent while its prompt is being prefilled
        # a row that shared this one's positions reads its own
        for r, (s, _) in list(self.shares.items()):
            if row in (r, s):
                self.share(r, r, 0)

    @torch.no_grad()
    def step(self, tokens: dict[int, int]) -> dict[int, Tensor]:
        """Feed each row its next token; returns each row's fp32 logits [V] after it. Only rows 0 up
        to the highest row in tokens run (add takes the lowest free row, so busy rows sit low): the
        others cost nothing. Rows below it but not in tokens (free ones too) run at the cache's
        spare position, which nothing attends to, and keep their state. Compiled, one graph serves
        one row and one every other count (a dynamic size), or one every count where a lone row runs
        as two (min_rows)."""
        spare = self.model.max_seq_length  # setup_caches's never-attended position
        B = max(max(tokens) + 1, self.min_rows)
        x = torch.zeros(B, 1, dtype=torch.int, device=self.device)  # [B, 1]
        pos = torch.full((B, 1), spare, device=self.device)  # [B, 1]
        for row, token in tokens.items():
            if self.pos[row] >= self.max_seq_length:
                raise BriskError(f"row {row} has filled its {self.max_seq_length} positions")
            x[row, 0], pos[row, 0] = token, self.pos[row]
        attend_len = self.model.attend_len(max(self.pos[r] for r in tokens))
        # compiled: one graph for 2 rows and more, whichever comes first
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(pos, 0)
        logits = self.step_fn(self.model, x, pos, attend_len=attend_len)  # [B, V]
        for row in tokens:
            self.pos[row] += 1
            # a CUDA graph's output is overwritten by its next replay
            self.logits[row] = logits[row].clone()
        return {row: self.logits[row] for row in tokens}


def generate_rows(batch: Batch, prompts: list[list[int]], max_new_tokens: int, *, eos_ids=(),
                  on_token: Optional[Callable[[int, int], bool]] = None, **sampling_kwargs):
    """Sample up to max_new_tokens after each prompt, as many at once as the batch has rows: a
    prompt takes a row as soon as one is free. A row stops as sampling.stop_reason says,
    on_token(prompt index, token) telling whether a token it has just taken ends it. Returns (the
    new tokens of each prompt, in prompt order, {"prefill_s", "decode_s", "steps"}): the seconds
    spent prefilling prompts and in decode steps."""
    out = [[] for _ in prompts]
    timing = dict(prefill_s=0.0, decode_s=0.0, steps=0)
    waiting = list(range(len(prompts)))[::-1]  # popped from the end: prompt order
    running: dict[int, int] = {}  # row -> prompt index

    # samples row's next token; frees the row if it stops there
    def advance(row: int, logits: Tensor) -> None:
        i = running[row]
        token = int(sample(logits[None], **sampling_kwargs)[0])
        out[i].append(token)
        stops = on_token and functools.partial(on_token, i)
        if stop_reason(token, len(out[i]), max_new_tokens, eos_ids, stops):
            batch.remove(row)
            del running[row]

    while waiting or running:
        while waiting and batch.free_rows():
            t0 = time.perf_counter()
            i = waiting.pop()
            row = batch.add(prompts[i])
            running[row] = i
            advance(row, batch.last_logits(row))
            timing["prefill_s"] += time.perf_counter() - t0
        if running:
            t0 = time.perf_counter()
            for row, logits in batch.step({r: out[i][-1] for r, i in running.items()}).items():
                advance(row, logits)
            timing["decode_s"] += time.perf_counter() - t0
            timing["steps"] += 1
    return out, timing


@torch.no_grad()
def beam_search(batch: Batch, ids: list[int], max_new_tokens: int, num_beams: int,
                length_penalty: float = 1.0, early_stopping=False, num_return_sequences: int = 1,
                eos_ids=(), on_step: Optional[Callable[[], None]] = None
                ) -> list[tuple[list[int], float]]:
    """Beam search as transformers' generate(num_beams=..., do_sample=False) does it, for one
    prompt, in num_beams rows of an empty batch: the best num_return_sequences (new tokens, score)
    by score. A finished hypothesis (ended by an eos id, kept, or by the length) scores its
    log-probability / its length ** length_penalty. early_stopping: True stops once num_beams
    hypotheses are finished; False stops when no running beam could beat the worst finished one at
    its current length; "never" at the best length length_penalty allows. on_step() is called as
    each position's tokens are chosen (first-token and next-token latency)."""
    n, eos = num_beams, torch.tensor(sorted(eos_ids), dtype=torch.long)
    # candidates kept per step: enough to leave n running beyond the eos ones
    K = max(2, 1 + len(eos)) * n
    rows = [batch.add(ids)]
    rows += [batch.fork(rows[0]) for _ in range(n - 1)]
    running = torch.zeros(n, max_new_tokens, dtype=torch.long)  # the beams' new tokens
    running_scores = torch.full((n,), -1e9)
    running_scores[0] = 0  # the beams start alike: only the first one's continuations count
    done = torch.zeros(n, max_new_tokens, dtype=torch.long)  # the finished hypotheses, best first
    done_scores, done_len = torch.full((n,), -1e9), torch.zeros(n, dtype=torch.long)
    is_done, improvable = torch.zeros(n, dtype=torch.bool), True
    first_n = torch.arange(K) < n  # only the n best candidates may finish
    logits = torch.stack([batch.last_logits(r) for r in rows])  # [n, V]
    for cur in range(max_new_tokens):
        V = logits.shape[-1]
        scores = (logits.log_softmax(-1) + running_scores[:, None]).view(-1)  # [n * V]
        top_scores, top = torch.topk(scores, K)
        parent, token = top // V, top % V  # [K]
        seqs = running[parent]
        seqs[:, cur] = token
        hits = torch.isin(token, eos) | (cur + 1 >= max_new_tokens)  # [K]: candidates that finish here
        # the n best candidates that do not finish run on
        run_scores = top_scores + hits.float() * -1e9
        keep = torch.topk(run_scores, n).indices
        running, running_scores, parents = seqs[keep], run_scores[keep], parent[keep]
        # finished candidates among the n best join the finished hypotheses if they beat them
        final = top_scores / ((cur + 1) ** length_penalty)
        final += float(bool(is_done.all()) and early_stopping is True) * -1e9
        final += float(not improvable) * -1e9
        final += (~(hits & first_n)).float() * -1e9
        merged = torch.topk(torch.cat([done_scores, final]), n).indices
        done = torch.cat([done, seqs])[merged]
        done_scores = torch.cat([done_scores, final])[merged]
        done_len = torch.cat([done_len, torch.full((K,), cur + 1)])[merged]
        is_done = torch.cat([is_done, hits & first_n])[merged]
        if on_step is not None:
            on_step()
        best_len = max_new_tokens if early_stopping == "never" and length_penalty > 0 else cur + 1
        best_running = running_scores[0] / (best_len ** length_penalty)
        worst_done = torch.where(is_done, done_scores.min(), -1e9)
        improvable = improvable and bool((best_running > worst_done).any())
        if not improvable or (bool(is_done.all()) and early_stopping is True) or bool(hits.all()):
            break
        rows, copies = follow(rows, parents.tolist())
        if copies:
            batch.reorder(copies, start=len(ids))
        out = batch.step({rows[j]: int(running[j, cur]) for j in range(n)})
        logits = torch.stack([out[r] for r in rows])
    for r in rows:
        batch.remove(r)
    return [(done[i, :done_len[i]].tolist(), float(done_scores[i]))
            for i in range(num_return_sequences)]


def follow(rows: list[int], parents: list[int]) -> tuple[list[int], dict[int, int]]:
    """The rows of the next beams, beam j the child of beam parents[j] (in rows[parents[j]]): a
    parent's first child takes its row as it is, another takes the row of a beam without children
    and a copy of its parent's. Returns (the new beams' rows, {row: row to copy from})."""
    new: list[Optional[int]] = [None] * len(parents)
    for j, p in enumerate(parents):
        if rows[p] not in new:
            new[j] = rows[p]
    spare = [r for r in rows if r not in new]
    copies = {}
    for j, p in enumerate(parents):
        if new[j] is None:
            new[j] = spare.pop(0)
            copies[new[j]] = rows[p]
    return new, copies
