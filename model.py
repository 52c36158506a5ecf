"""The model: one config table for the Llama family and a static-KV-cache transformer.

Weights use the Hugging Face layout for q/k (rotate-half rotary), so converted Hugging Face checkpoints need no
permutation. Names follow gpt-fast: `wqkv` is q, k and v fused along the output dimension.
"""
import difflib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class BriskError(Exception):
    """A problem with the user's input: scripts print it as one line and exit with status 1."""


@dataclass
class ModelArgs:
    block_size: int = 2048  # longest context the model was trained for
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32  # query heads
    dim: int = 4096  # residual stream width
    intermediate_size: Optional[int] = None  # SwiGLU hidden width; None: Llama's rule from dim
    n_local_heads: int = -1  # key/value heads (GQA); -1: same as n_head
    head_dim: Optional[int] = None  # None: dim // n_head
    rope_base: float = 10000.0  # rotary theta
    norm_eps: float = 1e-5
    rope_scaling: Optional[dict] = None  # Llama-3.1 style: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    tie_embeddings: bool = False  # output head shares the token embedding
    qkv_bias: bool = False  # a bias on q, k and v (Qwen2, GPT-NeoX, OPT, BLOOM, GPT-2, ...)
    # switches for the families beyond Llama (defaults: Llama)
    norm: str = "rmsnorm"  # or "layernorm" (with a bias)
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX, GPT-J)
    shared_norm: bool = False  # one norm feeds both attention and MLP (GPT-J)
    mlp: str = "swiglu"  # w2(silu(w1 x) * w3 x); or "gelu", "gelu_tanh", "relu": w2(act(w1 x)), no w3
    mlp_bias: bool = False  # biases on w1 (w3) and w2
    wo_bias: bool = False  # a bias on the attention output projection
    head_bias: bool = False  # a bias on the output head (GPT-J)
    positions: str = "rope"  # "rope", "learned" (an absolute table added to the embedding) or "alibi" (BLOOM)
    rope_dim: Optional[int] = None  # rotary dims, the first of each head (GPT-NeoX rotary_pct); None: head_dim
    pos_offset: int = 0  # the learned table's row for position 0 (OPT: 2)
    embed_norm: bool = False  # a norm right after the embedding (BLOOM)

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size is None:
            hidden = 4 * self.dim
            n_hidden = int(2 * hidden / 3)
            self.intermediate_size = n_hidden + (256 - n_hidden % 256) % 256
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head
        if self.rope_dim is None:
            self.rope_dim = self.head_dim
        for name, value, known in (("norm", self.norm, NORMS), ("mlp", self.mlp, ACTIVATIONS),
                                   ("positions", self.positions, ("rope", "learned", "alibi"))):
            if value not in known:
                raise BriskError(f"unknown {name} {value!r}; known: {', '.join(known)}")
        if self.n_head % self.n_local_heads:
            raise BriskError(f"n_head {self.n_head} is not a multiple of n_local_heads {self.n_local_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        return cls(**transformer_configs[find_preset(name)])

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def find_preset(name: str) -> str:
    """Exact name first, then the longest preset name found (case-insensitively) inside `name`."""
    if name in transformer_configs:
        return name
    low = name.lower()
    hits = [k for k in transformer_configs if k.lower() in low]
    if hits:
        return max(hits, key=len)
    close = difflib.get_close_matches(name, list(transformer_configs), n=5, cutoff=0.3)
    raise BriskError(f"unknown model {name!r}; close names: {', '.join(close) or 'none'}")


_L31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_L32 = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

transformer_configs = {
    "Llama-2-7b": dict(block_size=4096, n_layer=32, n_head=32, dim=4096),
    "Llama-2-13b": dict(block_size=4096, n_layer=40, n_head=40, dim=5120),
    "Llama-2-70b": dict(block_size=4096, n_layer=80, n_head=64, dim=8192, n_local_heads=8, intermediate_size=28672),
    "CodeLlama-7b": dict(block_size=16384, vocab_size=32016, n_layer=32, dim=4096, rope_base=1000000),
    "CodeLlama-13b": dict(block_size=16384, vocab_size=32016, n_layer=40, n_head=40, dim=5120, rope_base=1000000),
    "CodeLlama-34b": dict(block_size=16384, n_layer=48, n_head=64, dim=8192, vocab_size=32000, n_local_heads=8, intermediate_size=22016, rope_base=1000000),
    "Meta-Llama-3-8B": dict(block_size=8192, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, vocab_size=128256, rope_base=500000),
    "Meta-Llama-3-70B": dict(block_size=8192, n_layer=80, n_head=64, n_local_heads=8, dim=8192, intermediate_size=28672, vocab_size=128256, rope_base=500000),
    "Llama-3.1-8B": dict(block_size=131072, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, vocab_size=128256, rope_base=500000, rope_scaling=_L31),
    "Llama-3.1-70B": dict(block_size=131072, n_layer=80, n_head=64, n_local_heads=8, dim=8192, intermediate_size=28672, vocab_size=128256, rope_base=500000, rope_scaling=_L31),
    "Llama-3.1-405B": dict(block_size=131072, n_layer=126, n_head=128, n_local_heads=8, dim=16384, intermediate_size=53248, vocab_size=128256, rope_base=500000, rope_scaling=_L31),
    "Llama-3.2-1B": dict(block_size=131072, n_layer=16, n_head=32, n_local_heads=8, dim=2048, intermediate_size=8192, vocab_size=128256, rope_base=500000, rope_scaling=_L32, tie_embeddings=True),
    "Llama-3.2-3B": dict(block_size=131072, n_layer=28, n_head=24, n_local_heads=8, dim=3072, intermediate_size=8192, vocab_size=128256, rope_base=500000, rope_scaling=_L32, tie_embeddings=True),
    "Mistral-7B": dict(block_size=32768, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, vocab_size=32000),
    "TinyLlama-1.1B": dict(block_size=2048, n_layer=22, n_head=32, n_local_heads=4, dim=2048, intermediate_size=5632),
    "llama-68m": dict(block_size=2048, n_layer=2, n_head=12, dim=768, intermediate_size=3072),
    "llama-160m": dict(block_size=2048, n_layer=12, n_head=12, dim=768, intermediate_size=3072),
    "SmolLM2-135M": dict(block_size=8192, n_layer=30, n_head=9, n_local_heads=3, dim=576, intermediate_size=1536, vocab_size=49152, rope_base=100000, tie_embeddings=True),
    "SmolLM2-360M": dict(block_size=8192, n_layer=32, n_head=15, n_local_heads=5, dim=960, intermediate_size=2560, vocab_size=49152, rope_base=100000, tie_embeddings=True),
    "SmolLM2-1.7B": dict(block_size=8192, n_layer=24, n_head=32, n_local_heads=32, dim=2048, intermediate_size=8192, vocab_size=49152, rope_base=130000, tie_embeddings=True),
    "Qwen2-0.5B": dict(block_size=32768, n_layer=24, n_head=14, n_local_heads=2, dim=896, intermediate_size=4864, vocab_size=151936, rope_base=1000000, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    "Qwen2-1.5B": dict(block_size=32768, n_layer=28, n_head=12, n_local_heads=2, dim=1536, intermediate_size=8960, vocab_size=151936, rope_base=1000000, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    "Qwen2-7B": dict(block_size=32768, n_layer=28, n_head=28, n_local_heads=4, dim=3584, intermediate_size=18944, vocab_size=152064, rope_base=1000000, norm_eps=1e-6, qkv_bias=True),
    "Qwen2.5-0.5B": dict(block_size=32768, n_layer=24, n_head=14, n_local_heads=2, dim=896, intermediate_size=4864, vocab_size=151936, rope_base=1000000, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    "Qwen2.5-1.5B": dict(block_size=32768, n_layer=28, n_head=12, n_local_heads=2, dim=1536, intermediate_size=8960, vocab_size=151936, rope_base=1000000, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    "Qwen2.5-3B": dict(block_size=32768, n_layer=36, n_head=16, n_local_heads=2, dim=2048, intermediate_size=11008, vocab_size=151936, rope_base=1000000, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    "Qwen2.5-7B": dict(block_size=32768, n_layer=28, n_head=28, n_local_heads=4, dim=3584, intermediate_size=18944, vocab_size=152064, rope_base=1000000, norm_eps=1e-6, qkv_bias=True),
}


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_length: int, n_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, head_dim)  # [B, Hkv, S, D]
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos: [T], k/v: [B, Hkv, T, D]; writes in place so compiled graphs keep their buffers
        B = k.shape[0]
        self.k_cache[:B, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[:B, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache[:B], self.v_cache[:B]


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        learned = config.positions == "learned"
        self.pos_embeddings = nn.Embedding(config.block_size + config.pos_offset, config.dim) if learned else None
        self.embed_norm = make_norm(config) if config.embed_norm else None
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.output = Linear(config.dim, config.vocab_size, bias=config.head_bias)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1
        # ALiBi: this model's heads among all heads (tp.apply_tp gives each rank its own)
        self.alibi_heads = (0, config.n_head, config.n_head)  # (first, count, of all)

    @classmethod
    def from_name(cls, name: str) -> "Transformer":
        return cls(ModelArgs.from_name(name))

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the KV cache and the rotary/mask tables for up to `max_seq_length` positions."""
        if self.max_seq_length >= max_seq_length and self.max_batch_size >= max_batch_size:
            return
        c = self.config
        self.max_seq_length, self.max_batch_size = max_seq_length, max_batch_size
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        # One spare position, never written: a compiled step's attended prefix (attend_len) is then never the
        # whole cache, whose view would be contiguous where every shorter one is not: a second graph.
        S = max_seq_length + 1
        # Attention computes in the cache's dtype (Attention.forward): fp32 on the CPU, whose attention kernel runs
        # bf16/fp16 several times slower than fp32 (BENCHMARKS.md). Holding fp32 rather than converting the attended
        # keys/values on every step made a bf16 decode step near position 3000 32.7 -> 43.7 tok/s, for twice a bf16
        # cache's memory; the values stored are the model dtype's, so the results are the same.
        cache_dtype = torch.float32 if device.type == "cpu" else dtype
        for b in self.layers:
            b.attention.kv_cache = KVCache(max_batch_size, S, c.n_local_heads, c.head_dim, cache_dtype).to(device)
        cos, sin = rope_tables(S, c.rope_dim, c.rope_base, c.rope_scaling, max_seq_length)
        self.register_buffer("rope_cos", cos.to(device=device, dtype=dtype), persistent=False)  # [S, R/2]
        self.register_buffer("rope_sin", sin.to(device=device, dtype=dtype), persistent=False)  # [S, R/2]
        first, count, total = self.alibi_heads
        slopes = alibi_slopes(total)[first:first + count]
        self.register_buffer("alibi_slopes", slopes.to(device=device, dtype=cache_dtype), persistent=False)  # [H]
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)  # [S, S]

    def attend_len(self, last_pos: int) -> int:
        """How many cache positions a compiled pass whose last input sits at last_pos attends to: last_pos + 1
        rounded up to a block of 64 positions (from 1024 on, 1/16 of the position's power of two), at most
        max_seq_length. A compiled step takes it as its one dynamic size, so it reads the cache written so far
        (at most ~6% more) instead of all of it, and CUDA graphs, recorded once per length, stay few."""
        n = last_pos + 1
        block = max(64, 1 << max(0, n.bit_length() - 5))
        return min(-(-n // block) * block, self.max_seq_length)

    def forward(self, idx: Tensor, input_pos: Tensor, logits_to_keep: int = 0, kv_len: Optional[int] = None) -> Tensor:
        # idx: [B, T] token ids at positions input_pos: [T]; returns logits [B, T, V], or [B, logits_to_keep, V]
        # for the last positions only: a prefill needs one row of the head's product, not T
        assert self.max_seq_length > 0, "call setup_caches() first"
        # The positions (ascending) attend to the cache up to the last of them only, as the keys past it are masked
        # out. Eagerly that is exactly input_pos[-1] + 1 positions, and a prompt from position 0 is plain causal
        # attention, which SDPA does without a mask in half the work. Compiled code cannot read input_pos on the
        # host: it attends to kv_len positions (attend_len(input_pos[-1]), a dynamic size of its graph), or to the
        # whole cache when none is given.
        T = idx.shape[1]
        if torch.compiler.is_compiling():
            end = self.max_seq_length if kv_len is None else kv_len
            mask = self.causal_mask[None, None, input_pos, :end]  # [1, 1, T, end]
        else:
            end = int(input_pos[-1]) + 1
            mask = None if end == T else self.causal_mask[None, None, input_pos, :end]  # [1, 1, T, end]; None: causal
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [T, R/2]
        x = self.tok_embeddings(idx)  # [B, T, dim]
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(input_pos + self.config.pos_offset)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.config.positions == "alibi":  # a per-head bias slope * (key pos - query pos) on causal scores
            causal = self.causal_mask[None, None, input_pos, :end]  # [1, 1, T, end]
            rel = torch.arange(end, device=idx.device) - input_pos[:, None]  # [T, end]
            mask = (self.alibi_slopes[:, None, None] * rel).masked_fill(~causal, float("-inf"))  # [1, H, T, end]
        for layer in self.layers:
            x = layer(x, input_pos, cos, sin, mask)
        return self.output(self.norm(x[:, -logits_to_keep:]))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = make_norm(config)
        self.ffn_norm = None if config.shared_norm else make_norm(config)
        self.parallel_residual = config.parallel_residual

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor]) -> Tensor:
        h = self.attention_norm(x)
        a = self.attention(h, input_pos, cos, sin, mask)
        if self.parallel_residual:
            return x + a + self.feed_forward(h if self.ffn_norm is None else self.ffn_norm(x))
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        self.wqkv = Linear(config.dim, qkv_dim, bias=config.qkv_bias)
        self.wo = Linear(config.n_head * config.head_dim, config.dim, bias=config.wo_bias)
        self.rotary = config.positions == "rope"
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor]) -> Tensor:
        B, T, _ = x.shape
        # n_head etc. come from the weights' shapes so that a tensor-parallel shard runs unchanged
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        if self.rotary:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = self.kv_cache.update(input_pos, k, v)  # [B, Hkv, S, D]
        end = T if mask is None else mask.shape[-1]  # the cache positions attended to
        k, v = k[:, :, :end], v[:, :, :end]
        q = q.to(k.dtype)  # attention computes in the cache's dtype (fp32 on the CPU: setup_caches)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_head != self.n_local_heads)
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # [B, T, H*D]
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        bias = config.mlp_bias
        self.act = ACTIVATIONS[config.mlp]
        self.w1 = Linear(config.dim, config.intermediate_size, bias=bias)  # gate (SwiGLU), else the up projection
        self.w3 = Linear(config.dim, config.intermediate_size, bias=bias) if config.mlp == "swiglu" else None  # up
        self.w2 = Linear(config.intermediate_size, config.dim, bias=bias)  # down

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.w1(x))
        return self.w2(h if self.w3 is None else h * self.w3(x))


ACTIVATIONS = {"swiglu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


# weight dtypes whose one-row product Inductor's loop (below) computes faster than aten's kernel, by CPU capability
# (torch.backends.cpu.get_cpu_capability()); measured on 49152x576 weights at 2 threads (BENCHMARKS.md). Without
# AVX-512, Inductor's bf16 and int8 conversions are slow (bf16 8 GB/s against aten's 12, int8 2 against its int8
# kernel's 4.5) while fp32 still wins (13 against 7); capabilities not measured get that choice too.
ROW_LOOP_DTYPES = {"AVX512": {torch.float32, torch.bfloat16, torch.float16, torch.int8}, "AVX2": {torch.float32}}
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()  # read once: torch.compile cannot trace the call


def one_row_on_cpu(x: Tensor, weight: Optional[Tensor] = None) -> bool:
    """True while torch.compile traces a product of a single row (a decode step) on the CPU, with a weight whose
    dtype Inductor's loop handles faster than aten does on this CPU (ROW_LOOP_DTYPES); any weight if None.

    There aten's mm moves a weight at 6-8 GB/s (bf16) or ~15 GB/s (fp32) at 2 threads on AVX-512 CPUs, while
    Inductor turns `(x * w).sum(-1)` into a vectorized loop over the rows of w that reaches ~17-21 GB/s, the
    memory's speed (measured on a 1536x576 weight; BENCHMARKS.md). Eagerly the same expression would build x * w
    in memory."""
    if not (torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]):
        return False
    return weight is None or weight.dtype in ROW_LOOP_DTYPES.get(CPU_CAPABILITY, ROW_LOOP_DTYPES["AVX2"])


def gemm_dtype(x: Tensor) -> torch.dtype:
    """The dtype to multiply x's rows in: fp32 for 32 or more bf16 rows on an AVX2 CPU, where torch's bf16 GEMM
    runs 2-5x slower than converting both operands to fp32 (a 1536x576 weight, 2 threads: 32 rows 4.3 against
    1.8 ms, 512 rows 60 against 11; 16 rows gain nothing); x's own dtype otherwise."""
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and CPU_CAPABILITY == "AVX2"
            and x.numel() >= 32 * x.shape[-1]):
        return torch.float32
    return x.dtype


def one_row_product(x: Tensor, weight: Tensor) -> Tensor:
    # x: [..., 1, K] (one row), weight: [N, K] of any dtype -> [..., 1, N] in fp32, as the loop one_row_on_cpu means.
    # The rows are summed as four equal blocks (of 2, 4, 8 and 16 blocks, 4 measured fastest), which Inductor fuses
    # into one loop that walks the blocks side by side: each load and conversion of x serves four rows, and four
    # memory streams and accumulators are in flight instead of one. Compiled decode on an AMX Xeon: bf16 +31%,
    # int8 +51%, fp32 +15% (BENCHMARKS.md).
    nb = next(b for b in (4, 2, 1) if weight.shape[0] % b == 0)  # fewer where N is not a multiple of 4
    xs = x.float()[..., None, :]
    return torch.cat([(xs * block.float()).sum(-1) for block in weight.chunk(nb)], dim=-1)


class Linear(nn.Linear):
    """nn.Linear with the one-row CPU product written for Inductor (see one_row_on_cpu)."""

    def forward(self, x: Tensor) -> Tensor:
        if not one_row_on_cpu(x, self.weight):
            dt = gemm_dtype(x)
            bias = None if self.bias is None else self.bias.to(dt)
            return F.linear(x.to(dt), self.weight.to(dt), bias).to(x.dtype)
        y = one_row_product(x, self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


NORMS = ("rmsnorm", "layernorm")


def make_norm(config: ModelArgs) -> nn.Module:
    return nn.LayerNorm(config.dim, config.norm_eps) if config.norm == "layernorm" else RMSNorm(config.dim, config.norm_eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 as the reference does, then scale in the model's dtype
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.type_as(x)


def rope_tables(seq_len: int, rope_dim: int, base: float, scaling: Optional[dict] = None,
                context: int = 0) -> tuple[Tensor, Tensor]:
    """cos and sin tables [seq_len, rope_dim/2] for rotate-half rotary embeddings, computed in fp32. Phi-3's
    longrope scaling takes its long factors when the context (the cache's length) exceeds the original one."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))  # [R/2]
    scale = 1.0
    if scaling is not None and scaling.get("rope_type") == "longrope":
        long = context > scaling["original_max_position_embeddings"]
        inv_freq = inv_freq / torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        scale = scaling["attention_factor"]
    elif scaling is not None:
        inv_freq = _llama31_scale(inv_freq, **scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # [S, R/2]
    return angles.cos() * scale, angles.sin() * scale


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi's head slopes [n_head]: a geometric series over the largest power of two of heads, the rest
    interleaved from the series of twice as many (BLOOM)."""
    p = 2 ** math.floor(math.log2(n_head))
    slopes = [2 ** (-8 * (i + 1) / p) for i in range(p)]
    slopes += [2 ** (-4 * (2 * i + 1) / p) for i in range(n_head - p)]
    return torch.tensor(slopes, dtype=torch.float32)


def _llama31_scale(inv_freq: Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                   original_max_position_embeddings: int, **_) -> Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    between = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(between, smoothed, out)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, T, D]; cos/sin: [T, R/2]. Rotate-half layout over the first R dims: pairs are (i, i + R/2).
    R = 2 * cos.shape[-1]
    x1, x2 = x[..., :R // 2], x[..., R // 2:R]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., R:]], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: `model.pth` (a state dict) with `model_config.json` (ModelArgs) beside it.

CONFIG_NAME = "model_config.json"
# the embedded default model, as ./scripts/prepare.sh writes it: every script's default --checkpoint_path
DEFAULT_CHECKPOINT = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth")


def load_config(checkpoint_path: Path) -> ModelArgs:
    """The config written by the converter beside the weights, else the preset matching the directory name."""
    cfg = Path(checkpoint_path).parent / CONFIG_NAME
    if cfg.is_file():
        try:
            return ModelArgs.from_dict(json.loads(cfg.read_text()))
        except (TypeError, ValueError) as e:
            raise BriskError(f"{cfg}: not a model config ({e})") from None
    return ModelArgs.from_name(Path(checkpoint_path).parent.name)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_checkpoint(path: Path) -> None:
    """Scripts call this before any slow work, so a wrong path fails at once."""
    if not Path(path).is_file():
        raise BriskError(f"checkpoint not found: {path} (run ./scripts/prepare.sh first?)")


def load_state_dict(checkpoint_path: Path) -> dict:
    path = Path(checkpoint_path)
    check_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, pickle of arbitrary objects, ...
        raise BriskError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


def load_model(checkpoint_path, device="cpu", dtype=torch.bfloat16, transform=None) -> Transformer:
    """Build the model on the meta device and assign the checkpoint's tensors, cast once to dtype/device.

    Quantized checkpoints (written by quantize.py) carry a `__quant__` entry; their linears are swapped for
    quantized modules before loading, and packed for the device afterwards. `transform(model, state_dict)`, if
    given, may reshape the unloaded model and returns the state dict to load (tp.apply_tp keeps one rank's slices
    of the memory-mapped checkpoint, before anything is copied).
    """
    sd = load_state_dict(checkpoint_path)
    config = load_config(checkpoint_path)
    quant = sd.pop("__quant__", None)
    with torch.device("meta"):
        model = Transformer(config)
    if quant is not None:
        import quantize
        quantize.prepare_model(model, quant)
    if transform is not None:
        sd = transform(model, sd)
    sd = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in sd.items()}
    if config.tie_embeddings:  # the file holds the shared matrix once
        sd["output.weight"] = sd["tok_embeddings.weight"]
    try:
        model.load_state_dict(sd, assign=True, strict=True)
    except RuntimeError as e:
        raise BriskError(f"{checkpoint_path} does not match its config: {' '.join(str(e).split())[:300]}") from None
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    if quant is not None:
        quantize.finalize_model(model, quant, device)
    return model.eval()


def check_writable(path: Path, force: bool) -> None:
    if Path(path).exists() and not force:
        raise BriskError(f"{path} exists; pass --force to overwrite it")


def save_atomic(path: Path, write: Callable[[Path], None], force: bool = False) -> None:
    """Call write(tmp) and rename tmp to path, so an interrupted run never leaves a half-written file."""
    path = Path(path)
    check_writable(path, force)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(state_dict: dict, path: Path, force: bool = False) -> None:
    save_atomic(path, lambda tmp: torch.save(state_dict, tmp), force)


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(); a BriskError or Ctrl-C becomes one line on stderr and exit status 1."""
    try:
        main()
    except BriskError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
