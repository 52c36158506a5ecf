"""Convert a llama.cpp GGUF file (architecture `llama`, `qwen2`, `phi3`, `bloom` or `gpt2`) into a
checkpoint directory.

    python scripts/convert_gguf.py FILE.gguf --checkpoint_dir checkpoints/ORG/NAME [--dtype float32] [--force]

Quantized tensors (Q4_1, Q8_0, ...) are dequantized with the `gguf` package and stored as plain
floats (float32 by default: a dequantized value d*q+m is generally not representable in bf16 or
fp16). llama.cpp stores the q/k projections of `llama` models with rows permuted for its interleaved
rotary; that is undone here, so the weights are in the Hugging Face rotate-half layout model.py
expects (phi3 is stored unpermuted; llama.cpp already stores bloom's fused q/k/v as q, k, v and
gpt2's weights as [out, in], as ours are; phi3's ffn_up holds the gate and up projections, split
here). The tokenizer is rebuilt as a Hugging Face `tokenizer.json` from the vocabulary in the file's
metadata.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import CONFIG_NAME, save_checkpoint
from cli import DTYPES, ArgumentParser, BriskError, check_writable, run_cli, save_atomic
from model import ModelArgs, llama31_scale

ARCHITECTURES = ("llama", "qwen2", "phi3", "bloom", "gpt2")
# the switches (ModelArgs) of the LayerNorm architectures
LAYERNORM_ARCHS = {
    "bloom": dict(norm="layernorm", mlp="gelu_tanh", mlp_bias=True, qkv_bias=True, wo_bias=True,
                  positions="alibi", embed_norm=True),
    "gpt2": dict(norm="layernorm", mlp="gelu_tanh", mlp_bias=True, qkv_bias=True, wo_bias=True,
                 positions="learned"),
}

# GGUF tensor name inside a block -> ours
BLOCK_NAMES = {
    "attn_output": "attention.wo", "attn_qkv": "attention.wqkv", "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output_norm.bias": "norm.bias", "output.weight": "output.weight",
             "position_embd.weight": "pos_embeddings.weight",
             "token_embd_norm.weight": "embed_norm.weight",
             "token_embd_norm.bias": "embed_norm.bias"}

# Split patterns of llama.cpp's pre-tokenizer types (`tokenizer.ggml.pre`), as in the models' own
# tokenizer.json
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def read_gguf(path: Path):
    import gguf

    if not path.is_file():
        raise BriskError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # truncated or not a GGUF at all
        raise BriskError(f"cannot read {path}: not a complete GGUF file ({str(e).splitlines()[0]})") from None
    meta = {k: f.contents() for k, f in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise BriskError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return reader, meta


def model_args(meta: dict, tensors: dict) -> ModelArgs:
    arch = meta["general.architecture"]

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise BriskError(f"GGUF metadata lacks {arch}.{key}")
        return value

    n_head, dim = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", dim // n_head)
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    # Llama 3.1's scaling is given by the rope_freqs tensor instead
    if scaling_type not in ("none", "llama3"):
        raise BriskError(f"rope scaling {scaling_type!r} is not supported")
    switches = LAYERNORM_ARCHS.get(arch, {})
    args = ModelArgs(
        block_size=get("context_length", 2048),
        vocab_size=tensors["tok_embeddings.weight"].shape[0],
        n_layer=get("block_count"), n_head=n_head,
        n_local_heads=get("attention.head_count_kv", n_head), dim=dim,
        intermediate_size=get("feed_forward_length"), head_dim=head_dim,
        rope_base=get("rope.freq_base", 10000.0), rope_dim=get("rope.dimension_count", head_dim),
        norm_eps=get("attention.layer_norm_epsilon" if switches
                     else "attention.layer_norm_rms_epsilon"),
        tie_embeddings="output.weight" not in tensors,
        **{"qkv_bias": "layers.0.attention.wqkv.bias" in tensors,
                  **switches})
    if "rope_freqs.weight" in tensors:
        args.rope_scaling = llama3_scaling(tensors.pop("rope_freqs.weight"), args)
    return args


def llama3_scaling(freq_factors: torch.Tensor, args: ModelArgs) -> dict:
    """Llama 3.1/3.2 store their rotary scaling as per-frequency divisors; recover the parameters
    they came from."""
    scaling = dict(factor=float(freq_factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2,
                                                      dtype=torch.float32) / args.head_dim))
    if not torch.allclose(llama31_scale(inv_freq, **scaling), inv_freq / freq_factors.float(),
                          rtol=1e-4):
        raise BriskError("rope_freqs tensor does not match Llama 3.1 rotary scaling; not supported")
    return scaling


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp interleaves the two rotary halves of each head; back to rotate-half order: [out,
    # ...]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_weights(reader, meta: dict, dtype: torch.dtype) -> tuple[dict, ModelArgs]:
    from gguf.quants import dequantize

    arch = meta["general.architecture"]
    raw = {}
    for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor"):
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise BriskError(f"cannot dequantize {t.name} ({t.tensor_type.name}): {str(e).splitlines()[0]}") from None
        # GGUF lists dims innermost first; ours is [out, in]
        shape = [int(n) for n in reversed(t.shape)]
        # a copy: F32 data is a read-only map
        raw[t.name] = torch.from_numpy(np.array(w, dtype=np.float32)).reshape(shape)
    sd, qkv = {}, {}
    for name, w in raw.items():
        if name in TOP_NAMES:
            sd[TOP_NAMES[name]] = w
        elif name == "rope_freqs.weight":
            sd[name] = w  # consumed by model_args
        elif name.startswith("rope_factors_"):
            raise BriskError("Phi-3 longrope factors in a GGUF are not supported; convert the Hugging Face checkpoint")
        elif name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            module, _, leaf = rest.rpartition(".")
            if arch == "phi3" and module == "ffn_up":  # gate and up stacked
                sd[f"layers.{layer}.feed_forward.w1.{leaf}"], sd[f"layers.{layer}.feed_forward.w3.{leaf}"] = w.chunk(2)
            elif module == "ffn_up" and arch in LAYERNORM_ARCHS:  # no gate: the up projection is w1
                sd[f"layers.{layer}.feed_forward.w1.{leaf}"] = w
            elif module in BLOCK_NAMES:
                sd[f"layers.{layer}.{BLOCK_NAMES[module]}.{leaf}"] = w
            elif module in ("attn_q", "attn_k", "attn_v"):
                qkv[(int(layer), rest)] = w
            else:
                raise BriskError(f"unexpected tensor {name} in a {arch} GGUF")
        else:
            raise BriskError(f"unexpected tensor {name} in a {arch} GGUF")
    n_layer = meta[f"{arch}.block_count"]
    n_head = meta[f"{arch}.attention.head_count"]
    n_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    for i in range(n_layer):
        for kind in ("weight", "bias"):
            parts = [qkv.pop((i, f"attn_{p}.{kind}"), None) for p in "qkv"]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                raise BriskError(f"block {i} lacks one of attn_q/attn_k/attn_v.{kind}")
            q, k, v = parts
            if arch == "llama":  # qwen2 GGUFs keep the Hugging Face order
                q, k = unpermute(q, n_head), unpermute(k, n_kv)
            sd[f"layers.{i}.attention.wqkv.{kind}"] = torch.cat([q, k, v])
    if qkv:
        raise BriskError(f"attention tensors of blocks beyond block_count {n_layer}: {sorted(qkv)[0]}")
    if "tok_embeddings.weight" not in sd:
        raise BriskError("GGUF has no token_embd.weight")
    args = model_args(meta, sd)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    return sd, args


def byte_level_bpe(meta: dict):
    """GPT-2 style byte-level BPE (tokenizer.ggml.model == "gpt2") as a `tokenizers.Tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("gpt2", "default"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre == "smollm":  # digits one by one, then the GPT-2 split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre in ("llama-bpe", "llama3", "llama-v3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level])
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level])
    else:
        raise BriskError(f"pre-tokenizer {pre!r} is not supported (supported: gpt2, smollm, llama-bpe, qwen2)")
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_bpe(meta: dict):
    """SentencePiece BPE (tokenizer.ggml.model == "llama": Llama 2, Mistral, TinyLlama) as a
    `tokenizers.Tokenizer`, built the way transformers converts a Llama `tokenizer.model`: merges
    ranked by the merged piece's score."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 0)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    prefix = [normalizers.Prepend("▁")] if meta.get("tokenizer.ggml.add_space_prefix", True) else []
    tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def convert_tokenizer(meta: dict) -> tuple[str, dict, dict]:
    """(tokenizer.json text, tokenizer_config, generation_config) from the GGUF metadata."""
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = byte_level_bpe(meta)
    elif kind == "llama":
        tok = sentencepiece_bpe(meta)
    else:
        raise BriskError(f"tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [])
    # control tokens (<|im_end|>, <s>, ...) and user-defined ones are matched whole in text, never
    # split
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                    if ty == USER_DEFINED])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and i < len(tokens) else None

    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=token("bos"),
                  eos_token=token("eos"), unk_token=token("unknown"), pad_token=token("padding"),
                  add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                  add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)))
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    config = {k: v for k, v in config.items() if v is not None}
    stop = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot")
            if f"tokenizer.ggml.{k}_token_id" in meta]
    generation = dict(eos_token_id=sorted(set(stop))) if stop else {}
    return tok.to_str(), config, generation


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf_file", type=Path,
                   help=f"a GGUF file of architecture {', '.join(ARCHITECTURES)}, any "
                   "quantization")
    p.add_argument("--checkpoint_dir", type=Path, required=True,
                   help="where to write model.pth, model_config.json and the tokenizer files")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the stored weights")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    args = p.parse_args(argv)
    out = args.checkpoint_dir
    names = ["model.pth", CONFIG_NAME, "tokenizer.json", "tokenizer_config.json",
             "generation_config.json"]
    for name in names:  # fail before the slow part, not after
        check_writable(out / name, args.force)

    reader, meta = read_gguf(args.gguf_file)
    tokenizer_json, tokenizer_config, generation = convert_tokenizer(meta)
    sd, config = convert_weights(reader, meta, DTYPES[args.dtype])
    if config.tie_embeddings:
        sd.pop("output.weight", None)

    out.mkdir(parents=True, exist_ok=True)
    texts = {CONFIG_NAME: json.dumps(config.to_dict(), indent=2), "tokenizer.json": tokenizer_json,
             "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False)}
    if generation:
        texts["generation_config.json"] = json.dumps(generation, indent=2)
    for name, text in texts.items():
        save_atomic(out / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"),
                    args.force)
    # last: its presence marks a finished conversion
    save_checkpoint(sd, out / "model.pth", args.force)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {out} ({n / 1e6:.1f}M parameters, {args.dtype}, {config.n_layer} layers, vocab {config.vocab_size})")


if __name__ == "__main__":
    run_cli(main)
