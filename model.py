"""The model: one config (ModelArgs: Llama and, through a few switches, GPT-NeoX, GPT-J, OPT, BLOOM,
GPTBigCode, Phi-3 and GPT-2; presets in presets.py) and a static-KV-cache transformer. q/k in the
Hugging Face layout (rotate-half rotary: no permutation); names as gpt-fast's (`wqkv`: q, k, v)."""
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cli import BriskError
from cpu import FEW_ROWS, Linear, attend_dtype, kernel_attends, kernel_isa, kv_cache_dtype, kv_load, kv_store, kv_width
from presets import find_preset, transformer_configs


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
    # Llama-3.1 style (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings), or Phi-3's
    # rope_type "longrope" (short_factor, long_factor, original_max_position_embeddings, attention_factor)
    rope_scaling: Optional[dict] = None
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
            n_hidden = int(2 * (4 * self.dim) / 3)
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
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_length: int, n_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, kv_width(head_dim, dtype))  # [B, Hkv, S, D (int8: D + 4)]
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        # [B, 2]: (r, n): row b's first n positions equal row b + r's, which brisk's kernel reads instead (beams)
        self.register_buffer("prefix", torch.zeros(max_batch_size, 2, dtype=torch.long), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, row: int = 0) -> tuple[Tensor, Tensor]:
        # k/v [B, Hkv, T, D] at input_pos [T] or [B, T] to rows row..row+B-1, in place (for graphs)
        B = k.shape[0]
        rows = torch.arange(row, row + B, device=k.device)[:, None]  # [B, 1]
        self.k_cache[rows, :, input_pos] = kv_store(k.transpose(1, 2), self.k_cache.dtype)  # [B, T, Hkv, D]
        self.v_cache[rows, :, input_pos] = kv_store(v.transpose(1, 2), self.v_cache.dtype)
        return self.k_cache[row:row + B], self.v_cache[row:row + B]


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
        self.max_batch_size = self.max_seq_length = -1
        self.kv_cache_dtype: Optional[torch.dtype] = None  # the KV cache's: None cpu.kv_cache_dtype's, or torch.int8
        self.alibi_heads = (0, config.n_head, config.n_head)  # ALiBi: (first, count, of all), tp.py

    @classmethod
    def from_name(cls, name: str) -> "Transformer":
        return cls(ModelArgs.from_name(name))

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the KV cache and rotary tables for exactly max_batch_size x max_seq_length
        positions (kept at that size; nothing grows with positions squared); choose how queries
        attend (self.mask, Attention.attend). Steps compiled for the old cache refuse the new."""
        if (self.max_seq_length, self.max_batch_size) == (max_seq_length, max_batch_size):
            return
        c = self.config
        self.max_seq_length, self.max_batch_size = max_seq_length, max_batch_size
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        # One spare position, never written: a compiled step's attended prefix (attend_len) is then never the
        # whole cache, whose view would be contiguous where every shorter one is not: a second graph.
        S = max_seq_length + 1
        cache_dtype = self.kv_cache_dtype or kv_cache_dtype(device, dtype, c.head_dim)
        for b in self.layers:
            b.attention.kv_cache = KVCache(max_batch_size, S, c.n_local_heads, c.head_dim, cache_dtype).to(device)
        cos, sin = rope_tables(S, c.rope_dim, c.rope_base, c.rope_scaling, max_seq_length)
        self.register_buffer("rope_cos", cos.to(device=device, dtype=dtype), persistent=False)  # [S, R/2]
        self.register_buffer("rope_sin", sin.to(device=device, dtype=dtype), persistent=False)  # [S, R/2]
        first, count, total = self.alibi_heads
        slopes = alibi_slopes(total)[first:first + count]
        adt, alibi = attend_dtype(device, dtype), c.positions == "alibi"
        self.register_buffer("alibi_slopes", slopes.to(device, adt), persistent=False)  # [H]
        # how queries attend, decided once: in brisk's kernel, else SDPA (`attend` for a few)
        probe = torch.empty(1, c.head_dim, device=device), torch.empty(0, dtype=cache_dtype)
        kernel = kernel_attends(*probe, torch.empty(0, dtype=adt if alibi else torch.long))
        self.mask = alibi_mask if alibi else last_mask if kernel else causal_mask
        for b in self.layers:
            b.attention.attend = kernel_attend if kernel else sdpa_attend

    def attend_len(self, last_pos: int, T: int = 1) -> int:
        """Cache positions that T inputs up to last_pos attend to, decided on the host: a prompt
        exactly last_pos + 1; a few (FEW_ROWS: a step, a verify pass, a batch's rows) that rounded
        up to 64 (from 1024 on, 1/16 of its power of two; at most max_seq_length): a compiled
        step's one dynamic size, ~6% more read at most, few CUDA graphs, one result a row."""
        n = last_pos + 1
        if T > FEW_ROWS:
            return n
        block = max(64, 1 << max(0, n.bit_length() - 5))
        return min(-(-n // block) * block, self.max_seq_length)

    def forward(self, idx: Tensor, input_pos: Tensor, attend_len: Optional[int] = None,
                logits_to_keep: Optional[int] = None, row: int = 0) -> Tensor:
        # idx: [B, T] token ids at positions input_pos: [T], or [B, T] (each row its own), in the
        # cache's rows row..row+B-1 -> logits [B, T, V], or the last logits_to_keep (a prefill: 1)
        assert self.max_seq_length > 0, "call setup_caches() first"
        mask, S = self.attended(input_pos, idx.shape[1], attend_len)  # S: cache positions attended
        cos, sin = self.rope_cos[input_pos].unsqueeze(-3), self.rope_sin[input_pos].unsqueeze(-3)
        x = self.tok_embeddings(idx)  # [B, T, dim]
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(input_pos + self.config.pos_offset)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, input_pos, cos, sin, mask, S, row)  # cos, sin: [1|B, 1, T, R/2]
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        return self.output(self.norm(x))

    def attended(self, input_pos: Tensor, T: int, attend_len: Optional[int]) -> tuple:
        # (self.mask, S'); attend_len: a compiled step's (it reads no position on the host), or ours
        attend_len = self.attend_len(int(input_pos.max()), T) if attend_len is None else attend_len
        keys, pos = torch.arange(attend_len, device=input_pos.device), input_pos.view(-1, 1, T, 1)
        last = torch.where(pos < self.max_seq_length, pos, 0).expand(-1, -1, -1, attend_len)
        return self.mask(keys, pos, last, T, self.alibi_slopes), attend_len


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = make_norm(config)
        self.ffn_norm = None if config.shared_norm else make_norm(config)
        self.parallel_residual = config.parallel_residual

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor,
                mask: Optional[Tensor], S: int, row: int = 0) -> Tensor:
        h = self.attention_norm(x)
        a = self.attention(h, input_pos, cos, sin, mask, S, row)
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
        self.kv_cache: Optional[KVCache] = None  # and self.attend: set by setup_caches

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor,
                mask: Optional[Tensor], S: int, row: int = 0) -> Tensor:
        B, T, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D] (k, v: Hkv)
        k, v = (t.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2) for t in (k, v))
        if self.rotary:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = self.kv_cache.update(input_pos, k, v, row)  # [B, Hkv, S, D]
        y = self.attend(q, k[:, :, :S], v[:, :, :S], mask, self.kv_cache.prefix, row)
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
NORMS = ("rmsnorm", "layernorm")


def make_norm(config: ModelArgs) -> nn.Module:
    norm = nn.LayerNorm if config.norm == "layernorm" else RMSNorm
    return norm(config.dim, config.norm_eps)


# Transformer.mask (setup_caches) of T inputs at positions pos [1|B, 1, T, 1] to keys [S']: key j is
# attended iff j <= last [1|B, 1, T, S'] (past the cache: 0); ALiBi's: + slope * (key - query pos)
def last_mask(keys: Tensor, pos: Tensor, last: Tensor, T: int, slopes: Tensor):
    return last  # brisk's kernel takes it as it is: no [T, S'] bool mask for a long prompt


def causal_mask(keys: Tensor, pos: Tensor, last: Tensor, T: int, slopes: Tensor):
    return keys <= last if keys.shape[0] > T else None  # SDPA's: none from 0 (half the work)


def alibi_mask(keys: Tensor, pos: Tensor, last: Tensor, T: int, slopes: Tensor):
    return (slopes[:, None, None] * (keys - pos)).masked_fill(keys > last, -math.inf)


# Attention.attend, chosen in setup_caches: q [B, H, T, D] to k, v [B, Hkv, S', D] -> [B, H, T, D]
def kernel_attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, prefix: Tensor, row: int):
    # each query alone, in one order whatever T and S': a prompt split anyhow attends alike
    return torch.ops.brisk.attend(q.float(), k, v, mask, prefix[row:row + q.shape[0]], kernel_isa())


def sdpa_attend(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], prefix: Tensor, row: int):
    # a step's few queries each alone (`attend`), a prompt's in SDPA; prefix, row: the kernel's
    dt = attend_dtype(q.device, q.dtype)
    q, k, v = q.to(dt), kv_load(k, dt), kv_load(v, dt)
    if q.shape[2] <= FEW_ROWS and mask is not None:
        return attend(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of a few queries q [B, H, T, D] to k, v [B, Hkv, S, D] under mask [1|B, 1, T, S],
    each (row, head, query) reduced alone and alike whatever B, T, S: a row's result depends neither
    on the other rows nor a masked tail on the attended length (eagerly: if one key at least is
    masked). SDPA's CPU kernel gives neither (its blocking follows the shapes)."""
    (B, H, T, D), Hkv = q.shape, k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv * T, D)  # the queries of each key/value head: [B, Hkv, G*T, D]
    s = (qg[:, :, :, None] * k[:, :, None]).sum(-1) * D ** -0.5  # [B, Hkv, G*T, S]
    s = s.view(B, H, T, -1)
    s = s.masked_fill(~mask, -float("inf")) if mask.dtype == torch.bool else s + mask  # float: ALiBi's, -inf masked
    s = s.view(B, Hkv, H // Hkv * T, -1)
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
        inv_freq = llama31_scale(inv_freq, **scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # [S, R/2]
    return angles.cos() * scale, angles.sin() * scale


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi's head slopes [n_head]: a geometric series over the largest power of two of heads, the rest
    interleaved from the series of twice as many (BLOOM)."""
    p = 2 ** math.floor(math.log2(n_head))
    slopes = [2 ** (-8 * (i + 1) / p) for i in range(p)]
    slopes += [2 ** (-4 * (2 * i + 1) / p) for i in range(n_head - p)]
    return torch.tensor(slopes, dtype=torch.float32)


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
    # x [B, H, T, D], cos/sin [T, R/2] or [1|B, 1, T, R/2]: rotate-half over the first R dims
    R = 2 * cos.shape[-1]
    x1, x2 = x[..., :R // 2], x[..., R // 2:R]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., R:]], dim=-1)
