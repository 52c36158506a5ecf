"""Speculative decoding: a cheap proposer guesses k tokens, the target checks all of them in one
forward pass.

    python generate.py --draft_checkpoint_path checkpoints/ORG/SMALL/model.pth --speculate_k 5   # a draft model
    python generate.py --draft int4                                 # the target quantized to int4 as its own draft
    python generate.py --prompt_lookup 3                            # copy what followed an earlier occurrence

The output follows the target's distribution exactly, whatever the proposer (Leviathan et al. 2023,
Chen et al. 2023): draft token i, drawn from q_i, is kept with probability min(1, p_i / q_i); the
first one rejected is replaced by a sample of normalize(max(0, p_i - q_i)); when all k are kept the
target's distribution after them gives one more token for free. p and q are the processed
distributions (temperature, top-k, top-p); at temperature 0 both are one-hot argmaxes and the rule
keeps a draft token exactly when it is the target's argmax. Prompt lookup proposes deterministically
(q is one-hot): a token is kept with probability p(token), else the replacement is drawn from p
without it.

Caches: the verify pass writes the target's keys/values for the last token taken and the k draft
tokens; after `a` are kept, the positions beyond are stale and are overwritten before anything
attends to them. The draft model has been fed the last token and the first k - 1 draft tokens; when
all k are kept it is fed the k-th too, so both caches always hold every position before the last
token taken (the invariant plain decoding has). One sequence at a time: rows of a batch would keep
different numbers of tokens, hence sit at different positions.

Under torchrun (tp.py) the target is split as always; a draft model is split the same way when the
number of processes divides its heads and feed-forward width (and its int4 groups), else every rank
runs a whole copy. Every rank takes the same decisions without exchanging them: the logits are
identical on all ranks after the all-reduces, the replicated parts compute the same on each, and the
random draws (draft sampling, the acceptance test's uniforms, the replacement tokens) all come from
the global generator, which tp.maybe_init_dist seeds alike on every rank and which every rank then
advances through the same calls.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import quant
import tp
from cpu import positions_alone
from checkpoint import load_config, load_model, load_state_dict, save_checkpoint
from cli import BriskError
from engine import compile_step, decode_one_token, sync
from model import Transformer
from sampling import draw, processed_probs

DEFAULT_K = 5
SELF_DRAFTS = ("int4", "int8")


# --------------------------------------------------------------------------------------------------
# The acceptance rule


def accept(draft: Tensor, q: Tensor, p: Tensor, greedy: bool = False) -> Tensor:
    """The tokens [a + 1] one verification yields: the first a draft tokens kept, then one from the
    target.

    draft: [k] tokens drawn from q: [k, Vq]; p: [k + 1, Vp], the target's distributions after the
    last token taken and after each draft token. Vocabularies padded to different sizes are compared
    with zeros in the padding."""
    k = draft.numel()
    V = max(p.size(-1), q.size(-1))
    p, q = F.pad(p, (0, V - p.size(-1))), F.pad(q, (0, V - q.size(-1)))
    i = torch.arange(k, device=p.device)
    ratio = p[i, draft] / q[i, draft]  # q > 0 where the draft drew from
    # u < ratio: kept with probability min(1, ratio)
    rejected = (torch.rand(k, device=p.device) >= ratio).nonzero()
    if rejected.numel() == 0:
        return torch.cat([draft, draw(p[k:], greedy).view(1)])  # the bonus token
    a = int(rejected[0])
    residual = (p[a] - q[a]).clamp(min=0)
    # a rejection implies p(d) < q(d), so the residual has mass; the fallback only guards against
    # rounding
    residual = torch.where(residual.sum() > 0, residual, p[a])
    return torch.cat([draft[:a], draw(residual[None], greedy).view(1)])


def verify(model: Transformer, x: Tensor, input_pos: Tensor, attend_len: Optional[int] = None,
           **sampling) -> Tensor:
    # x: [1, k + 1] (the last token taken, then the k draft tokens) at input_pos: [k + 1] -> p: [k +
    # 1, V]
    return processed_probs(model(x, input_pos, attend_len=attend_len)[0], **sampling)


def step_at(decode_fn: Callable, model: Transformer, token: Tensor, pos: int, sampling: dict):
    # one decode step of token [1, 1] at host position pos, attending to the cache as far as a
    # compiled step should
    return decode_fn(model, token, torch.tensor([pos], device=token.device),
                     attend_len=model.attend_len(pos), **sampling)


# --------------------------------------------------------------------------------------------------
# Proposers


class Proposer(Protocol):
    """What guesses the next k tokens: a draft model (DraftModel: another model, or the target
    quantized) or the sequence itself (PromptLookup)."""

    def prefill(self, x: Tensor, input_pos: Tensor) -> None:
        """Read the prompt x [1, T] at input_pos [T] (the positions before them are read
        already)."""

    def propose(self, history: list, cur_token: Tensor, pos: int, k: int, greedy: bool,
                sampling: dict) -> Optional[tuple[Tensor, Optional[Tensor]]]:
        """(draft [k], q [k, V], the distributions drawn from, or None: drawn deterministically)
        after the sequence `history`, whose last token cur_token [1, 1] sits at pos; None: no
        proposal, a plain decode step follows."""

    def catch_up(self, token: Tensor, pos: int, sampling: dict) -> None:
        """Feed token [1, 1] at pos, which the proposer has not seen."""


class DraftModel:
    """A smaller model (or the target quantized) drafts k tokens one by one with its own KV
    cache."""

    def __init__(self, model: Transformer, decode_fn: Callable = decode_one_token):
        self.model, self.decode_fn = model, decode_fn

    def prefill(self, x: Tensor, input_pos: Tensor) -> None:
        self.model(x, input_pos, logits_to_keep=1)  # only the cache is wanted

    def propose(self, history: list, cur_token: Tensor, pos: int, k: int, greedy: bool,
                sampling: dict):
        if pos + k >= self.model.max_seq_length:  # room for the k draft tokens and a catch-up
            return None
        tokens, qs = [], []
        for i in range(k):
            cur_token, q = step_at(self.decode_fn, self.model, cur_token, pos + i, sampling)
            # a CUDA graph's outputs are overwritten by its next replay
            cur_token = cur_token.clone()
            tokens.append(cur_token.view(1))
            if not greedy:
                qs.append(q.clone())
        draft = torch.cat(tokens)  # [k]
        q = F.one_hot(draft.long(), self.model.config.vocab_size).float() if greedy else torch.cat(qs)  # [k, V]
        return draft, q

    def catch_up(self, token: Tensor, pos: int, sampling: dict) -> None:
        # through the (compiled) decode step, as its sampled token is merely not used: a plain
        # forward would run the draft eagerly once per fully accepted draft
        step_at(self.decode_fn, self.model, token, pos, sampling)


class PromptLookup:
    """Proposes the k tokens that followed the most recent earlier occurrence of the sequence's last
    n tokens, trying n = max_n down to 1 (prompt-lookup decoding: cheap, and strong where the output
    copies its input)."""

    def __init__(self, max_n: int):
        self.max_n = max_n

    def prefill(self, x: Tensor, input_pos: Tensor) -> None:
        pass

    def propose(self, history: list, cur_token: Tensor, pos: int, k: int, greedy: bool,
                sampling: dict):
        draft = lookup(history, self.max_n, k)
        if draft is None:
            return None
        draft = torch.tensor(draft, dtype=torch.int, device=cur_token.device)
        # deterministic: Speculator makes q one-hot at the target's vocabulary size
        return draft, None

    def catch_up(self, token: Tensor, pos: int, sampling: dict) -> None:
        pass


def lookup(seq: list, max_n: int, k: int) -> Optional[list]:
    """The k tokens after the latest j < len(seq) - 1 with seq[j-n+1..j] == seq[-n:], n from max_n
    down to 1, or None. Past the end of seq the copy continues with its own output (seq looks
    periodic from j on)."""
    L = len(seq)
    for n in range(min(max_n, L - 1), 0, -1):
        suffix, last = seq[-n:], seq[-1]
        for j in range(L - 2, n - 2, -1):
            if seq[j] == last and seq[j - n + 1:j + 1] == suffix:
                out = seq[j + 1:j + 1 + k]
                # (seq + out)[j + 1 + len(out)]: past the end, out repeats with period L-1-j
                while len(out) < k:
                    out.append(out[j + 1 + len(out) - L])
                return out
    return None


# --------------------------------------------------------------------------------------------------
# The decode loop


class Speculator:
    """Pass as generate(..., speculator=...): after the target's prefill, prefill(prompt, start_pos)
    lets the proposer read the prompt; decode(...) then stands in for decode_n_tokens, yielding
    [1, n] tokens per step. `stats` counts the current generation's verifications and kept draft
    tokens; `step_sizes` lists the tokens each of its decode steps yielded."""

    def __init__(self, proposer: Proposer, k: int = DEFAULT_K, verify_fn: Callable = verify):
        self.proposer, self.k, self.verify_fn = proposer, k, verify_fn
        self.history: list = []
        self.stats: dict = {}
        self.step_sizes: list = []

    def prefill(self, prompt: Tensor, start_pos: int = 0) -> None:
        # prompt: [T], of which positions before start_pos are already in the caches
        pos = torch.arange(start_pos, prompt.size(0), device=prompt.device)
        self.proposer.prefill(prompt[start_pos:].view(1, -1), pos)
        self.history = prompt.tolist()
        self.stats = dict(verifications=0, accepted=0, plain_steps=0)
        self.step_sizes = []

    def decode(self, model: Transformer, cur_token: Tensor, input_pos: Tensor, num_new_tokens: int,
               decode_fn: Callable = decode_one_token, **sampling) -> Iterator[Tensor]:
        greedy, k, device = sampling.get("temperature", 1.0) == 0, self.k, cur_token.device
        pos, left = int(input_pos), num_new_tokens
        self.history.append(int(cur_token))
        while left > 0:
            proposal = None
            if pos + k < model.max_seq_length:  # the verify pass writes positions pos..pos+k
                proposal = self.proposer.propose(self.history, cur_token, pos, k, greedy, sampling)
            if proposal is None:
                self.proposer.catch_up(cur_token, pos, sampling)
                new = step_at(decode_fn, model, cur_token, pos, sampling)[0].clone().view(1)
                self.stats["plain_steps"] += 1
            else:
                draft, q = proposal
                x = torch.cat([cur_token.view(1), draft]).view(1, -1)  # [1, k + 1]
                with positions_alone():  # eagerly each position is reduced as its decode step is
                    p = self.verify_fn(model, x, torch.arange(pos, pos + k + 1, device=device),
                                       attend_len=model.attend_len(pos + k), **sampling)
                if q is None:
                    q = F.one_hot(draft.long(), p.size(-1)).float()
                new = accept(draft, q, p, greedy)
                if new.numel() == k + 1:  # all kept: the draft has not yet seen the last of them
                    self.proposer.catch_up(draft[-1:].view(1, 1), pos + k, sampling)
                self.stats["verifications"] += 1
                self.stats["accepted"] += new.numel() - 1
            new = new[:left]
            self.history += new.tolist()
            self.step_sizes.append(new.numel())
            pos, left = pos + new.numel(), left - new.numel()
            cur_token = new[-1:].view(1, 1)
            yield new.view(1, -1)


# --------------------------------------------------------------------------------------------------
# Command line: generate.py's --draft_checkpoint_path, --draft, --prompt_lookup, --speculate_k


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (batch size 1; exact: the output follows the target's distribution)")
    g.add_argument("--draft_checkpoint_path", type=Path, default=None,
                   help="model.pth of a smaller model with the same vocabulary that proposes tokens")
    g.add_argument("--draft", choices=SELF_DRAFTS, default=None,
                   help="self-speculation: the target quantized proposes (model_int4.g32.pth or model_int8.pth "
                        "beside it, written as quantize.py does if missing)")
    g.add_argument("--prompt_lookup", type=int, default=None, metavar="N",
                   help="propose the tokens that followed the latest earlier occurrence of the last N..1 tokens")
    g.add_argument("--speculate_k", type=int, default=None,
                   help=f"tokens proposed per verification (default {DEFAULT_K})")


@dataclass(frozen=True)
class Speculation:
    """Checked speculation flags (speculation()): one proposer, and k, the tokens proposed per
    verification, which are also the cache positions a verify pass writes past the last token taken.
    build() makes the Speculator once the target's caches are set up (engine.Engine.setup)."""
    checkpoint_path: Path  # the target's
    k: int = DEFAULT_K
    draft_checkpoint_path: Optional[Path] = None
    draft: Optional[str] = None  # SELF_DRAFTS: the target quantized
    prompt_lookup: Optional[int] = None

    def draft_path(self) -> Optional[Path]:
        """The draft model's checkpoint (a self-draft's beside the target's); None for prompt
        lookup."""
        if self.draft is not None:
            return self_draft_path(self.checkpoint_path, self.draft)
        return self.draft_checkpoint_path

    def build(self, device: torch.device, dtype: torch.dtype, max_seq_length: int,
              compile: bool = False, kv_cache_dtype: Optional[torch.dtype] = None) -> Speculator:
        """The Speculator: a draft model is loaded (made first if --draft's file is missing: by rank
        0 alone under torchrun), split across the processes if it can be, and given a cache of
        max_seq_length positions in kv_cache_dtype (the target's: engine.load)."""
        verify_fn, decode_fn = verify, decode_one_token
        if compile:  # k is fixed, so the verify pass has a static shape
            verify_fn = compile_step(verify, device, "the verify pass")  # of the target
            # set up below
            decode_fn = compile_step(decode_one_token, device, "the draft's decode step")
        if self.prompt_lookup is not None:
            return Speculator(PromptLookup(self.prompt_lookup), self.k, verify_fn)
        path = self.draft_path()
        if self.draft is not None:
            tp.rank0_first(lambda: make_self_draft(self.checkpoint_path, self.draft, path))
        world = dist.get_world_size() if dist.is_initialized() else 1
        refusal = split_refusal(path, world) if world > 1 else None
        if refusal:
            print(f"the draft {path} runs whole on each of the {world} processes, not split: {refusal}",
                  file=sys.stderr)
        t0 = time.perf_counter()
        draft = load_model(path, device, dtype, transform=None if refusal else tp.apply_tp)
        sync(device)
        print(f"loaded draft {path} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
        draft.kv_cache_dtype = kv_cache_dtype
        draft.setup_caches(1, max_seq_length)
        return Speculator(DraftModel(draft, decode_fn), self.k, verify_fn)


def settings(spec: Optional[Speculation]) -> dict:
    """The speculation as the scripts' --json files record it."""
    return dict(draft_checkpoint=spec and spec.draft_checkpoint_path
                and str(spec.draft_checkpoint_path), draft=spec and spec.draft,
                prompt_lookup=spec and spec.prompt_lookup, speculate_k=spec and spec.k)


def vocabulary(directory: Path):
    """What fixes the meaning of token ids: tokenizer.json's vocabulary and added tokens,
    tokenizer.model or vocab.json."""
    path = directory / "tokenizer.json"
    if path.is_file():
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise BriskError(f"{path}: not a tokenizer ({e})") from None
        vocab = d.get("model", {}).get("vocab")
        if isinstance(vocab, list):  # Unigram: [piece, score] pairs
            vocab = [v[0] for v in vocab]
        return "tokenizer.json", vocab, sorted((t["id"], t["content"])
                                               for t in d.get("added_tokens", []))
    for name in ("tokenizer.model", "vocab.json"):  # vocab.json: GPT-2-style, with merges.txt (OPT)
        if (directory / name).is_file():
            return name, (directory / name).read_bytes()
    return None


def speculation(args, config, tokenizer_vocab_size: int, world: int, batch_size: int = 1) -> Optional[Speculation]:
    """The Speculation of the flags (add_args) of a run of batch_size sequences, each flag checked
    here and only here, with no weights loaded (a draft checkpoint: that it shares the target's
    vocabulary); None when no proposer is given."""
    given = [f for f, v in (("--draft_checkpoint_path", args.draft_checkpoint_path),
                            ("--draft", args.draft),
                            ("--prompt_lookup", args.prompt_lookup)) if v is not None]
    if len(given) > 1:
        raise BriskError(f"choose one proposer: {' or '.join(given)}")
    if not given:
        if args.speculate_k is not None:
            raise BriskError("--speculate_k needs --draft_checkpoint_path, --draft or --prompt_lookup")
        return None
    spec = Speculation(args.checkpoint_path,
                       DEFAULT_K if args.speculate_k is None else args.speculate_k,
                       args.draft_checkpoint_path, args.draft, args.prompt_lookup)
    if spec.k < 1:
        raise BriskError(f"--speculate_k must be at least 1, got {spec.k}")
    if spec.prompt_lookup is not None and spec.prompt_lookup < 1:
        raise BriskError(f"--prompt_lookup must be at least 1, got {spec.prompt_lookup}")
    if batch_size != 1:
        raise BriskError("speculative decoding generates one sequence at a time; leave out --batch_size")
    if spec.draft is not None:
        check_self_draft(spec, config, world)
    if spec.draft_checkpoint_path is not None:
        check_draft(spec.draft_checkpoint_path, spec.checkpoint_path,
                    min(config.vocab_size, tokenizer_vocab_size))
    return spec


def check_draft(path: Path, target: Path, needed: int) -> None:
    """Refuse a draft checkpoint that is missing or does not share the target's vocabulary (of
    `needed` ids)."""
    if not path.is_file():
        raise BriskError(f"draft checkpoint not found: {path}")
    target_vocab, draft_vocab = vocabulary(target.parent), vocabulary(path.parent)
    if draft_vocab is None:
        raise BriskError(f"no tokenizer.json, tokenizer.model or vocab.json beside {path}: cannot check that the "
                         "draft shares the target's vocabulary")
    if target_vocab != draft_vocab:
        raise BriskError(f"the draft {path} and the target {target} have different vocabularies "
                         f"(compared their {draft_vocab[0]})")
    draft_size = load_config(path).vocab_size
    if draft_size < needed:
        raise BriskError(f"the draft's vocab_size {draft_size} is smaller than the target's vocabulary ({needed})")


def self_draft_path(checkpoint_path: Path, mode: str) -> Path:
    """Where --draft MODE's quantized copy of the target lies: beside it, named as quantize.py names
    it."""
    return quant.output_path(checkpoint_path, mode,
                             quant.DEFAULT_GROUPSIZE if mode == "int4" else None)


def check_self_draft(spec: Speculation, config, world: int) -> None:
    path, mode, target = spec.draft_path(), spec.draft, spec.checkpoint_path
    if path.resolve() == target.resolve():
        raise BriskError(f"--draft {mode}: {path} is that model already; pass the float model.pth")
    # split like the target (the target's heads and width divide already): int4 groups must fit
    if world > 1:
        try:
            tp.check_divisible(config, world, quant.DEFAULT_GROUPSIZE if mode == "int4" else None)
        except BriskError as e:
            raise BriskError(f"--draft {mode} across {world} processes: {e}; use --draft int8 or fewer "
                             "processes") from None
    if path.is_file():
        return
    # rank 0's file would be on one machine only
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) < world:
        raise BriskError(f"--draft {mode}: {path} is missing; on several machines make it first with "
                         f"quantize.py --mode {mode}")
    if "__quant__" in load_state_dict(target):  # memory-mapped: reads no weights
        raise BriskError(f"--draft {mode}: {path} is missing and {target} is quantized; pass the float model.pth")
    if not os.access(path.parent, os.W_OK):
        raise BriskError(f"--draft {mode}: {path} is missing and {path.parent} is not writable; make it with "
                         "quantize.py")


def make_self_draft(checkpoint_path: Path, mode: str, path: Path) -> None:
    """Unless `path` exists, quantize the float target into it as quantize.py --mode MODE does
    (round-to-nearest, default group size)."""
    if path.is_file():
        return
    sd = load_state_dict(checkpoint_path)
    print(f"{path} not found: writing it for --draft {mode} (as quantize.py --mode {mode} does)",
          file=sys.stderr)
    settings = {"mode": "int8"} if mode == "int8" else {"mode": "int4",
                                                        "groupsize": quant.DEFAULT_GROUPSIZE,
                                                        "method": "rtn"}
    save_checkpoint(quant.quantize_state_dict(sd, load_config(checkpoint_path), settings), path)


def split_refusal(path: Path, world: int) -> Optional[str]:
    """Why tp.apply_tp cannot split the model at `path` across `world` processes; None when it
    can."""
    settings = load_state_dict(path).get("__quant__") or {}  # memory-mapped: reads no weights
    try:
        tp.check_divisible(load_config(path), world, settings.get("groupsize"))
    except BriskError as e:
        return str(e)
    return None
