"""Presets: the ModelArgs of models people run, one line each, found by name (find_preset). A checkpoint converted
from Hugging Face carries its own config (model_config.json), so sizes not tabled here load too."""
import difflib

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


# Families beyond Llama: their switches (ModelArgs), then one line per size
_NEOX = dict(norm="layernorm", mlp="gelu", mlp_bias=True, qkv_bias=True, wo_bias=True, parallel_residual=True,
             block_size=2048, vocab_size=50304)
_GPTJ = dict(norm="layernorm", mlp="gelu_tanh", mlp_bias=True, head_bias=True, parallel_residual=True, shared_norm=True)
_OPT = dict(norm="layernorm", mlp="relu", mlp_bias=True, qkv_bias=True, wo_bias=True, positions="learned",
            pos_offset=2, tie_embeddings=True, block_size=2048, vocab_size=50272)
_BLOOM = dict(norm="layernorm", mlp="gelu_tanh", mlp_bias=True, qkv_bias=True, wo_bias=True, positions="alibi",
              embed_norm=True, tie_embeddings=True, block_size=2048, vocab_size=250880)
_GPT2 = dict(norm="layernorm", mlp="gelu_tanh", mlp_bias=True, qkv_bias=True, wo_bias=True, positions="learned",
             tie_embeddings=True)
_OPENAI_GPT2 = dict(_GPT2, block_size=1024, vocab_size=50257)
_PHI3 = dict(vocab_size=32064, block_size=2047)  # Phi-3's sliding window of 2047 caps the context brisk serves

transformer_configs.update({
    "pythia-70m": dict(_NEOX, n_layer=6, n_head=8, dim=512, intermediate_size=2048, rope_dim=16),
    "pythia-160m": dict(_NEOX, n_layer=12, n_head=12, dim=768, intermediate_size=3072, rope_dim=16),
    "pythia-410m": dict(_NEOX, n_layer=24, n_head=16, dim=1024, intermediate_size=4096, rope_dim=16),
    "pythia-1b": dict(_NEOX, n_layer=16, n_head=8, dim=2048, intermediate_size=8192, rope_dim=64),
    "pythia-1.4b": dict(_NEOX, n_layer=24, n_head=16, dim=2048, intermediate_size=8192, rope_dim=32),
    "pythia-2.8b": dict(_NEOX, n_layer=32, n_head=32, dim=2560, intermediate_size=10240, rope_dim=20),
    "pythia-6.9b": dict(_NEOX, n_layer=32, n_head=32, dim=4096, intermediate_size=16384, rope_dim=32, vocab_size=50432),
    "pythia-12b": dict(_NEOX, n_layer=36, n_head=40, dim=5120, intermediate_size=20480, rope_dim=32, vocab_size=50688),
    "RedPajama-INCITE-Chat-3B": dict(_NEOX, n_layer=32, n_head=32, dim=2560, intermediate_size=10240, vocab_size=50432,
                                     parallel_residual=False),
    "RedPajama-INCITE-7B": dict(_NEOX, n_layer=32, n_head=32, dim=4096, intermediate_size=16384, vocab_size=50432,
                                parallel_residual=False),
    "gpt-j-6b": dict(_GPTJ, block_size=2048, vocab_size=50400, n_layer=28, n_head=16, dim=4096, intermediate_size=16384,
                     rope_dim=64),
    "opt-125m": dict(_OPT, n_layer=12, n_head=12, dim=768, intermediate_size=3072),
    "opt-1.3b": dict(_OPT, n_layer=24, n_head=32, dim=2048, intermediate_size=8192),
    "opt-2.7b": dict(_OPT, n_layer=32, n_head=32, dim=2560, intermediate_size=10240),
    "opt-6.7b": dict(_OPT, n_layer=32, n_head=32, dim=4096, intermediate_size=16384),
    "opt-13b": dict(_OPT, n_layer=40, n_head=40, dim=5120, intermediate_size=20480),
    "opt-30b": dict(_OPT, n_layer=48, n_head=56, dim=7168, intermediate_size=28672),
    "bloom-560m": dict(_BLOOM, n_layer=24, n_head=16, dim=1024, intermediate_size=4096),
    "bloom-1b1": dict(_BLOOM, n_layer=24, n_head=16, dim=1536, intermediate_size=6144),
    "bloom-1b7": dict(_BLOOM, n_layer=24, n_head=16, dim=2048, intermediate_size=8192),
    "bloom-3b": dict(_BLOOM, n_layer=30, n_head=32, dim=2560, intermediate_size=10240),
    "bloom-7b1": dict(_BLOOM, n_layer=30, n_head=32, dim=4096, intermediate_size=16384),
    "bloomz-7b1": dict(_BLOOM, n_layer=30, n_head=32, dim=4096, intermediate_size=16384),
    "santacoder": dict(_GPT2, block_size=2048, vocab_size=49280, n_layer=24, n_head=16, n_local_heads=1, dim=2048,
                       intermediate_size=8192),
    "starcoder": dict(_GPT2, block_size=8192, vocab_size=49152, n_layer=40, n_head=48, n_local_heads=1, dim=6144,
                      intermediate_size=24576),
    "Phi-3-mini-4k": dict(_PHI3, n_layer=32, n_head=32, dim=3072, intermediate_size=8192),
    "Phi-3-medium-4k": dict(_PHI3, n_layer=40, n_head=40, n_local_heads=10, dim=5120, intermediate_size=17920),
    "gpt2": dict(_OPENAI_GPT2, n_layer=12, n_head=12, dim=768, intermediate_size=3072),
    "gpt2-medium": dict(_OPENAI_GPT2, n_layer=24, n_head=16, dim=1024, intermediate_size=4096),
    "gpt2-large": dict(_OPENAI_GPT2, n_layer=36, n_head=20, dim=1280, intermediate_size=5120),
    "gpt2-xl": dict(_OPENAI_GPT2, n_layer=48, n_head=25, dim=1600, intermediate_size=6400),
})
