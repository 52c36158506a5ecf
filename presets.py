"""Presets: the ModelArgs of models people run, found by name (find_preset). A checkpoint converted
from Hugging Face carries its own config (model_config.json), so sizes not tabled here load too."""
import difflib
import math

from cli import BriskError


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


# rope_scaling of Llama 3.1 and 3.2
LLAMA31_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
LLAMA32_ROPE = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
# what the sizes of a family share
_LLAMA3 = dict(block_size=8192, n_local_heads=8, vocab_size=128256, rope_base=500000)
_LLAMA31 = dict(_LLAMA3, block_size=131072, rope_scaling=LLAMA31_ROPE)
_LLAMA32 = dict(_LLAMA3, block_size=131072, rope_scaling=LLAMA32_ROPE, tie_embeddings=True)
_SMOLLM2 = dict(block_size=8192, vocab_size=49152, rope_base=100000, tie_embeddings=True)
_QWEN2 = dict(block_size=32768, vocab_size=151936, rope_base=1000000, norm_eps=1e-6, qkv_bias=True,
              n_local_heads=2, tie_embeddings=True)
_QWEN2_7B = dict(_QWEN2, n_layer=28, n_head=28, n_local_heads=4, dim=3584, intermediate_size=18944,
                 vocab_size=152064, tie_embeddings=False)

transformer_configs = {
    "Llama-2-7b": dict(block_size=4096, n_layer=32, n_head=32, dim=4096),
    "Llama-2-13b": dict(block_size=4096, n_layer=40, n_head=40, dim=5120),
    "Llama-2-70b": dict(block_size=4096, n_layer=80, n_head=64, dim=8192, n_local_heads=8,
                        intermediate_size=28672),
    "CodeLlama-7b": dict(block_size=16384, vocab_size=32016, n_layer=32, dim=4096,
                         rope_base=1000000),
    "CodeLlama-13b": dict(block_size=16384, vocab_size=32016, n_layer=40, n_head=40, dim=5120,
                          rope_base=1000000),
    "CodeLlama-34b": dict(block_size=16384, n_layer=48, n_head=64, dim=8192, vocab_size=32000,
                          n_local_heads=8, intermediate_size=22016, rope_base=1000000),
    "Meta-Llama-3-8B": dict(_LLAMA3, n_layer=32, n_head=32, dim=4096, intermediate_size=14336),
    "Meta-Llama-3-70B": dict(_LLAMA3, n_layer=80, n_head=64, dim=8192, intermediate_size=28672),
    "Llama-3.1-8B": dict(_LLAMA31, n_layer=32, n_head=32, dim=4096, intermediate_size=14336),
    "Llama-3.1-70B": dict(_LLAMA31, n_layer=80, n_head=64, dim=8192, intermediate_size=28672),
    "Llama-3.1-405B": dict(_LLAMA31, n_layer=126, n_head=128, dim=16384, intermediate_size=53248),
    "Llama-3.2-1B": dict(_LLAMA32, n_layer=16, n_head=32, dim=2048, intermediate_size=8192),
    "Llama-3.2-3B": dict(_LLAMA32, n_layer=28, n_head=24, dim=3072, intermediate_size=8192),
    "Mistral-7B": dict(block_size=32768, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                       intermediate_size=14336, vocab_size=32000),
    "TinyLlama-1.1B": dict(block_size=2048, n_layer=22, n_head=32, n_local_heads=4, dim=2048,
                           intermediate_size=5632),
    "llama-68m": dict(block_size=2048, n_layer=2, n_head=12, dim=768, intermediate_size=3072),
    "llama-160m": dict(block_size=2048, n_layer=12, n_head=12, dim=768, intermediate_size=3072),
    "SmolLM2-135M": dict(_SMOLLM2, n_layer=30, n_head=9, n_local_heads=3, dim=576,
                         intermediate_size=1536),
    "SmolLM2-360M": dict(_SMOLLM2, n_layer=32, n_head=15, n_local_heads=5, dim=960,
                         intermediate_size=2560),
    "SmolLM2-1.7B": dict(_SMOLLM2, n_layer=24, n_head=32, n_local_heads=32, dim=2048,
                         intermediate_size=8192, rope_base=130000),
    "Qwen2-0.5B": dict(_QWEN2, n_layer=24, n_head=14, dim=896, intermediate_size=4864),
    "Qwen2-1.5B": dict(_QWEN2, n_layer=28, n_head=12, dim=1536, intermediate_size=8960),
    "Qwen2-7B": dict(_QWEN2_7B),
    "Qwen2.5-0.5B": dict(_QWEN2, n_layer=24, n_head=14, dim=896, intermediate_size=4864),
    "Qwen2.5-1.5B": dict(_QWEN2, n_layer=28, n_head=12, dim=1536, intermediate_size=8960),
    "Qwen2.5-3B": dict(_QWEN2, n_layer=36, n_head=16, dim=2048, intermediate_size=11008),
    "Qwen2.5-7B": dict(_QWEN2_7B),
}


# Families beyond Llama: their switches (ModelArgs), then one line per size
_NEOX = dict(norm="layernorm", mlp="gelu", mlp_bias=True, qkv_bias=True, wo_bias=True,
             parallel_residual=True, block_size=2048, vocab_size=50304)
_GPTJ = dict(norm="layernorm", mlp="gelu_tanh", mlp_bias=True, head_bias=True,
             parallel_residual=True, shared_norm=True)
_OPT = dict(norm="layernorm", mlp="relu", mlp_bias=True, qkv_bias=True, wo_bias=True,
            positions="learned", pos_offset=2, tie_embeddings=True, block_size=2048,
            vocab_size=50272)
_BLOOM = dict(norm="layernorm", mlp="gelu_tanh", mlp_bias=True, qkv_bias=True, wo_bias=True,
              positions="alibi", embed_norm=True, tie_embeddings=True, block_size=2048,
              vocab_size=250880)
_GPT2 = dict(norm="layernorm", mlp="gelu_tanh", mlp_bias=True, qkv_bias=True, wo_bias=True,
             positions="learned", tie_embeddings=True)
_OPENAI_GPT2 = dict(_GPT2, block_size=1024, vocab_size=50257)
# Phi-3's sliding window of 2047 caps the context brisk serves
_PHI3 = dict(vocab_size=32064, block_size=2047)


def _ffn4(family: dict, sizes: dict) -> dict:
    # name -> (n_layer, n_head, dim) of a family whose feed-forward is 4 * dim wide
    return {name: dict(family, n_layer=L, n_head=H, dim=D, intermediate_size=4 * D)
            for name, (L, H, D) in sizes.items()}


def _longrope(short: str, long: str, context: int = 131072, original: int = 4096) -> dict:
    """Phi-3 128k's rope scaling: a factor per rotary frequency (those of the first release, in the
    digits that give the float32 values its config holds), and the attention factor as transformers
    derives it."""
    return dict(rope_type="longrope", short_factor=[float(f) for f in short.split()],
                long_factor=[float(f) for f in long.split()],
                original_max_position_embeddings=original,
                attention_factor=math.sqrt(1 + math.log(context / original) / math.log(original)))


_PHI3_MINI_128K = _longrope(
    "1.05 1.05 1.05 1.1 1.1 1.15 1.2 1.25 1.3 1.35 1.5" + " 2" * 21
    + " 2.05 2.05 2.05 2.1 2.1 2.1 2.15 2.15 2.35 2.55" " 2.6 2.6 2.75 2.85 2.85 2.95",
    "1.03 1.05 1.05 1.0799999 1.2299999 1.2299999 1.3 1.4499999 1.5999999 1.6499999 1.8999999"
    " 2.86 3.6899998 5.4199996 5.49 5.49 9.09 11.58 15.66 15.7699995 15.79 18.36 21.99 23.08"
    " 30.009998 32.350002 32.590004 35.560005 39.950005 53.840004 56.200005 57.950005 59.290005"
    " 59.770004 59.920006 61.190006 61.960007 62.500008 63.370007 63.480007 63.480007 63.660007"
    " 63.850006 64.08001 64.76001 64.80001 64.81001 64.81001")
_PHI3_MEDIUM_128K = _longrope(
    "1 1 1 1 1 1 1.01 1.02 1.02 1.04 1.04 1.07 1.07 1.1 1.3 1.3 1.5 1.57 1.9 2.31 2.76 3.39"
    " 3.94 4.01 4.29 4.35 5.35 6.66 7.03 7.52 8.01 8.25 8.28 9.63 9.9 10.59 11.05 11.79 12.19"
    " 12.89 13.13 13.17 13.21 13.48 13.54 13.78 13.93 14.43 14.76 15.15 15.42 15.54 15.66 15.75"
    " 15.76 15.8 16.06 16.08 16.12 16.12 16.19 16.32 16.54 16.8",
    "1 1 1 1 1 1 1 1 1 1 1 1 1 1.25 1.25 1.5 2 2.75 5.75 5.75 6.5 9.25 11 13.25 19.25 19.75"
    " 19.75 21.25 21.5 26.5 30 33.75 35.25 38.5 42 42.25 46 47 50 50.5 51 52 52.75 53.75 54.75"
    " 57 57.25 58.5 59.25 59.5 62 62.5 62.75 63.25 63.25 63.25 63.75 64 64 64.25 64.5 64.5 65 65")

transformer_configs.update({
    "pythia-70m": dict(_NEOX, n_layer=6, n_head=8, dim=512, intermediate_size=2048, rope_dim=16),
    "pythia-160m": dict(_NEOX, n_layer=12, n_head=12, dim=768, intermediate_size=3072, rope_dim=16),
    "pythia-410m": dict(_NEOX, n_layer=24, n_head=16, dim=1024, intermediate_size=4096, rope_dim=16),
    "pythia-1b": dict(_NEOX, n_layer=16, n_head=8, dim=2048, intermediate_size=8192, rope_dim=64),
    "pythia-1.4b": dict(_NEOX, n_layer=24, n_head=16, dim=2048, intermediate_size=8192, rope_dim=32),
    "pythia-2.8b": dict(_NEOX, n_layer=32, n_head=32, dim=2560, intermediate_size=10240, rope_dim=20),
    "pythia-6.9b": dict(_NEOX, n_layer=32, n_head=32, dim=4096, intermediate_size=16384, rope_dim=32, vocab_size=50432),
    "pythia-12b": dict(_NEOX, n_layer=36, n_head=40, dim=5120, intermediate_size=20480, rope_dim=32, vocab_size=50688),
    "RedPajama-INCITE-Chat-3B": dict(_NEOX, n_layer=32, n_head=32, dim=2560,
                                     intermediate_size=10240, vocab_size=50432,
                                     parallel_residual=False),
    "RedPajama-INCITE-7B": dict(_NEOX, n_layer=32, n_head=32, dim=4096, intermediate_size=16384,
                                vocab_size=50432, parallel_residual=False),
    "gpt-j-6b": dict(_GPTJ, block_size=2048, vocab_size=50400, n_layer=28, n_head=16, dim=4096,
                     intermediate_size=16384, rope_dim=64),
    **_ffn4(_OPT, {"opt-125m": (12, 12, 768), "opt-1.3b": (24, 32, 2048),
                   "opt-2.7b": (32, 32, 2560), "opt-6.7b": (32, 32, 4096),
                   "opt-13b": (40, 40, 5120), "opt-30b": (48, 56, 7168)}),
    **_ffn4(_BLOOM, {"bloom-560m": (24, 16, 1024), "bloom-1b1": (24, 16, 1536),
                     "bloom-1b7": (24, 16, 2048), "bloom-3b": (30, 32, 2560),
                     "bloom-7b1": (30, 32, 4096), "bloomz-7b1": (30, 32, 4096)}),
    "santacoder": dict(_GPT2, block_size=2048, vocab_size=49280, n_layer=24, n_head=16,
                       n_local_heads=1, dim=2048, intermediate_size=8192),
    "starcoder": dict(_GPT2, block_size=8192, vocab_size=49152, n_layer=40, n_head=48,
                      n_local_heads=1, dim=6144, intermediate_size=24576),
    "Phi-3-mini-4k": dict(_PHI3, n_layer=32, n_head=32, dim=3072, intermediate_size=8192),
    "Phi-3-medium-4k": dict(_PHI3, n_layer=40, n_head=40, n_local_heads=10, dim=5120,
                            intermediate_size=17920),
    "Phi-3-mini-128k": dict(_PHI3, block_size=131072, n_layer=32, n_head=32, dim=3072,
                            intermediate_size=8192, rope_scaling=_PHI3_MINI_128K),
    "Phi-3-medium-128k": dict(_PHI3, block_size=131072, n_layer=40, n_head=40, n_local_heads=10,
                              dim=5120, intermediate_size=17920, rope_scaling=_PHI3_MEDIUM_128K),
    **_ffn4(_OPENAI_GPT2, {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                           "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}),
})
