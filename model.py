"""The model: one config table for the Llama family and a static-KV-cache transformer.

Weights use the Hugging Face layout for q/k (rotate-half rotary), so converted Hugging Face checkpoints need no
permutation. Names follow gpt-fast: `wqkv` is q, k and v fused along the output dimension.
"""
import difflib
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cli import BriskError
from cpu import FEW_ROWS, Linear, kv_cache_dtype  # a fork without the CPU tuning: Linear = nn.Linear, the cache in `dtype`


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
    qkv_bias: bool = False  # Qwen2 puts a bias on q, k and v

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size is None:
            hidden = 4 * self.dim
            n_hidden = int(2 * hidden / 3)
            self.intermediate_size = n_hidden + (256 - n_hidden % 256) % 256
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head
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

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, row: int = 0) -> tuple[Tensor, Tensor]:
        # input_pos: [T] or [B, T] (each row at its own positions), k/v: [B, Hkv, T, D] for the cache's rows
        # row..row+B-1; writes in place so compiled graphs keep their buffers
        B = k.shape[0]
        rows = torch.arange(row, row + B, device=k.device)[:, None]  # [B, 1]
        self.k_cache[rows, :, input_pos] = k.transpose(1, 2).to(self.k_cache.dtype)  # [B, T, Hkv, D]
        self.v_cache[rows, :, input_pos] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache[row:row + B], self.v_cache[row:row + B]


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1

    @classmethod
    def from_name(cls, name: str) -> "Transformer":
        return cls(ModelArgs.from_name(name))

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the KV cache and the rotary/mask tables for exactly max_batch_size x max_seq_length positions
        (kept as they are when they already have that size). Steps compiled for the old cache refuse the new one."""
        if (self.max_seq_length, self.max_batch_size) == (max_seq_length, max_batch_size):
            return
        c = self.config
        self.max_seq_length, self.max_batch_size = max_seq_length, max_batch_size
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        # One spare position, never written: a compiled step's attended prefix (attend_len) is then never the
        # whole cache, whose view would be contiguous where every shorter one is not: a second graph.
        S = max_seq_length + 1
        cache_dtype = kv_cache_dtype(device, dtype)  # attention computes in it (Attention.forward)
        for b in self.layers:
            b.attention.kv_cache = KVCache(max_batch_size, S, c.n_local_heads, c.head_dim, cache_dtype).to(device)
        cos, sin = rope_tables(S, c.head_dim, c.rope_base, c.rope_scaling)
        self.register_buffer("rope_cos", cos.to(device=device, dtype=dtype), persistent=False)  # [S, D/2]
        self.register_buffer("rope_sin", sin.to(device=device, dtype=dtype), persistent=False)  # [S, D/2]
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

    def forward(self, idx: Tensor, input_pos: Tensor, logits_to_keep: int = 0, attend_len: Optional[int] = None,
                row: int = 0) -> Tensor:
        # idx: [B, T] token ids at positions input_pos: [T], or [B, T] where each row sits at its own positions,
        # using the cache's rows row..row+B-1; returns logits [B, T, V], or [B, logits_to_keep, V] for the last
        # positions only: a prefill needs one row of the head's product, not T
        assert self.max_seq_length > 0, "call setup_caches() first"
        # The positions (ascending) attend to the cache up to the last of them only, as the keys past it are masked
        # out. Compiled code cannot read input_pos on the host: it attends to attend_len positions
        # (self.attend_len of the last position, a dynamic size of its graph), or to the whole cache when none is
        # given. Eagerly a few rows (FEW_ROWS: decode and verify steps) attend to self.attend_len positions too, for
        # results that do not depend on the other rows (attend); longer inputs to exactly input_pos[-1] + 1, and a prompt from position 0 is
        # plain causal attention, which SDPA does without a mask in half the work.
        T = idx.shape[1]
        if torch.compiler.is_compiling():
            end = self.max_seq_length if attend_len is None else attend_len
        else:
            last = int(input_pos.max())
            end = last + 1
            if T <= FEW_ROWS:  # and with one masked key at least (the spare one at worst): eager attend's results
                end = self.attend_len(last) + (self.attend_len(last) == end)  # differ when none is masked
        mask = self.causal_mask[input_pos, :end].unsqueeze(-3)  # [1 or B, 1, T, end]
        if input_pos.dim() == 1 and end == T and not torch.compiler.is_compiling():
            mask = None  # causal
        cos, sin = self.rope_cos[input_pos].unsqueeze(-3), self.rope_sin[input_pos].unsqueeze(-3)  # [1|B, 1, T, D/2]
        x = self.tok_embeddings(idx)  # [B, T, dim]
        for layer in self.layers:
            x = layer(x, input_pos, cos, sin, mask, row)
        return self.output(self.norm(x[:, -logits_to_keep:]))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor],
                row: int = 0) -> Tensor:
        h = x + self.attention(self.attention_norm(x), input_pos, cos, sin, mask, row)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        self.wqkv = Linear(config.dim, qkv_dim, bias=config.qkv_bias)
        self.wo = Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor],
                row: int = 0) -> Tensor:
        B, T, _ = x.shape
        # n_head etc. come from the weights' shapes so that a tensor-parallel shard runs unchanged
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = self.kv_cache.update(input_pos, k, v, row)  # [B, Hkv, S, D]
        end = T if mask is None else mask.shape[-1]  # the cache positions attended to
        k, v = k[:, :, :end], v[:, :, :end]
        q = q.to(k.dtype)  # attention computes in the cache's dtype (fp32 on the CPU: setup_caches)
        if T <= FEW_ROWS:
            y = attend(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_head != self.n_local_heads)
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # [B, T, H*D]
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.w1 = Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w3 = Linear(config.dim, config.intermediate_size, bias=False)  # up
        self.w2 = Linear(config.intermediate_size, config.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of a few queries q [B, H, T, D] to k, v [B, Hkv, S, D] under mask [1|B, 1, T, S], written so that
    each (row, head, query) is reduced alone and the same way whatever B, T and S: a row's result does not depend
    on the other rows, nor a masked tail on the attended length (eagerly: if one key at least is masked). SDPA's
    CPU kernel gives neither (its blocking follows the shapes)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv * T, D)  # the queries of each key/value head: [B, Hkv, G*T, D]
    s = (qg[:, :, :, None] * k[:, :, None]).sum(-1) * D ** -0.5  # [B, Hkv, G*T, S]
    s = s.view(B, H, T, -1).masked_fill(~mask, -float("inf")).view(B, Hkv, H // Hkv * T, -1)
    p = (s - s.amax(-1, keepdim=True)).exp()
    y = (p[..., None] * v[:, :, None]).sum(-2) / p.sum(-1, keepdim=True)  # [B, Hkv, G*T, D]
    return y.view(B, H, T, D)


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


def rope_tables(seq_len: int, head_dim: int, base: float, scaling: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """cos and sin tables [seq_len, head_dim/2] for rotate-half rotary embeddings, computed in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]
    if scaling is not None:
        inv_freq = llama31_scale(inv_freq, **scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # [S, D/2]
    return angles.cos(), angles.sin()


def llama31_scale(inv_freq: Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
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
    # x: [B, H, T, D]; cos/sin: [T, D/2] or [1|B, 1, T, D/2]. Rotate-half layout: pairs are (i, i + D/2).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
