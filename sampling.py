"""Sampling: how logits become the next token, and when a sequence stops. One rule for generate(),
batch rows, speculation and the server.

    token, probs = sample(logits, temperature=0.8, top_k=200)          # [B, V] -> [B, 1], [B, V] (None if greedy)
    token, _ = sample(logits, temperature=0.8, generator=g)            # a request's own random draws
    logits = Penalties(presence=0.5, bias={42: -100})(tokens, logits)  # a per-row logits processor, before sample
    reason = stop_reason(token, n, max_tokens, eos_ids, on_token)      # "stop", "length" or None: goes on
"""
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# what an impossible token's log-probability reads as (JSON has no -inf), as OpenAI's do
LOGPROB_FLOOR = -9999.0


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, min_p: Optional[float] = None) -> Tensor:
    """Next-token distribution [B, V] from logits [B, V]: temperature, then top-k, top-p (nucleus),
    min-p (tokens less likely than min_p times the most likely one are dropped): transformers'
    order."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        # [B, 1] k-th largest
        pivot = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = torch.where(logits < pivot, -float("inf"), logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        sorted_probs = sorted_logits.softmax(-1)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens more likely than this one
        # keep the smallest prefix whose mass reaches top_p; the most likely token has before == 0 <
        # top_p
        sorted_logits = sorted_logits.masked_fill(before >= top_p, -float("inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -float("inf"))
    return logits.softmax(-1)


def processed_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, min_p: Optional[float] = None) -> Tensor:
    """Distributions [N, V] that sample draws from, for logits [N, V]; at temperature 0 the one-hot
    argmax."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    return logits_to_probs(logits, temperature, top_k, top_p, min_p)


TOKEN_DTYPE = torch.int  # of the tokens drawn: a decode step's input (engine.Engine.saved_step)


def draw(probs: Tensor, greedy: bool = False,
         generator: Optional[torch.Generator] = None) -> Tensor:
    """One token per row [B, 1] from probs [B, V], which need not be normalized; greedy: the argmax,
    without random numbers. argmax(p / E) with E ~ Exponential(1) draws index i with probability
    p_i, without the host sync of torch.multinomial."""
    if greedy:
        return torch.argmax(probs, dim=-1, keepdim=True).to(TOKEN_DTYPE)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(TOKEN_DTYPE)


def sample(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, min_p: Optional[float] = None,
           generator: Optional[torch.Generator] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(token [B, 1], probs [B, V]) from the last position's logits [B, V]; temperature 0 is greedy
    and returns no probs (a top-k and softmax over the vocabulary are a noticeable share of a small
    model's decode step). generator: the random draws of one request (its seed alone decides them);
    default: the global generator."""
    if temperature == 0:
        return draw(logits, greedy=True), None
    probs = logits_to_probs(logits, temperature, top_k, top_p, min_p)
    return draw(probs, generator=generator), probs


def logprobs(logits: Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of token under softmax(logits) (logits [V]: after a row's processors,
    before temperature and truncation) and the n most likely tokens' (id, log-probability), most
    likely first."""
    lp = logits.float().log_softmax(-1).clamp(min=LOGPROB_FLOOR)
    top = torch.topk(lp, n)
    return float(lp[token]), list(zip(top.indices.tolist(), top.values.tolist()))


class Penalties:
    """OpenAI's presence and frequency penalties and logit_bias as a logits processor (token ids
    generated so far, logits [V]) -> logits: each token's logit minus frequency times its count
    among the generated tokens, minus presence if it occurs there at all, plus its bias."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0,
                 bias: Optional[dict[int, float]] = None):
        self.presence, self.frequency, self.bias = presence, frequency, bias or {}
        self.dense: Optional[Tensor] = None  # bias as [V], made at the first call

    def __call__(self, tokens: Sequence[int], logits: Tensor) -> Tensor:
        if self.bias:
            if self.dense is None:
                self.dense = torch.zeros_like(logits)
                self.dense[list(self.bias)] = torch.tensor(list(self.bias.values())).to(logits)
            logits = logits + self.dense
        if tokens and (self.presence or self.frequency):
            counts = torch.bincount(torch.tensor(tokens, device=logits.device),
                                    minlength=logits.size(-1))  # [V]
            counts = counts.to(logits)
            logits = logits - self.frequency * counts - self.presence * (counts > 0).to(logits)
        return logits


def stop_reason(token: int, n: int, max_tokens: int, eos_ids=(),
                on_token: Optional[Callable[[int], bool]] = None) -> Optional[str]:
    """Why a sequence ends at token, its n-th new token: "stop" at an eos id (which it keeps) or
    when on_token(token) returns True (a stop string; eos ids are not passed to it), "length" at
    max_tokens; None while it goes on."""
    if token in eos_ids or (on_token is not None and on_token(token)):
        return "stop"
    return "length" if n >= max_tokens else None
