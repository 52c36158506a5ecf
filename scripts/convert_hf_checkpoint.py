"""Convert a Hugging Face checkpoint directory (ARCHITECTURES below) into DIR/model.pth +
DIR/model_config.json.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-3.2-1B [--force]

Weights are read shard by shard and kept in their stored dtype; q, k and v are fused into wqkv as
soon as all three pieces of a layer have been seen, so peak memory stays near the size of the model.
"""
import json
import math
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import CONFIG_NAME, load_state_dict, save_checkpoint  # noqa: E402
from cli import ArgumentParser, BriskError, check_writable, run_cli, save_atomic, save_json  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM",
                 "GPTNeoXForCausalLM", "GPTJForCausalLM", "OPTForCausalLM", "BloomForCausalLM",
                 "GPTBigCodeForCausalLM", "GPT2LMHeadModel")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

# Hugging Face names (outer prefixes such as model., transformer., gpt_neox., model.decoder.
# dropped) -> ours
TOP_NAMES = {"embed_tokens": "tok_embeddings", "embed_in": "tok_embeddings",
             "wte": "tok_embeddings", "word_embeddings": "tok_embeddings",
             "embed_positions": "pos_embeddings", "wpe": "pos_embeddings",
             "word_embeddings_layernorm": "embed_norm", "norm": "norm", "final_layer_norm": "norm",
             "ln_f": "norm", "lm_head": "output", "embed_out": "output"}
LAYER_NAMES = {
    "input_layernorm": "attention_norm", "ln_1": "attention_norm",
    "self_attn_layer_norm": "attention_norm",
    "post_attention_layernorm": "ffn_norm", "ln_2": "ffn_norm", "final_layer_norm": "ffn_norm",
    "self_attn.o_proj": "attention.wo", "self_attn.out_proj": "attention.wo",
    "attn.out_proj": "attention.wo", "attention.dense": "attention.wo",
    "self_attention.dense": "attention.wo", "attn.c_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "mlp.dense_h_to_4h": "feed_forward.w1",
    "mlp.fc_in": "feed_forward.w1", "fc1": "feed_forward.w1",
    "mlp.c_fc": "feed_forward.w1", "mlp.dense_4h_to_h": "feed_forward.w2",
    "mlp.fc_out": "feed_forward.w2", "fc2": "feed_forward.w2", "mlp.c_proj": "feed_forward.w2",
}
FUSED_QKV = ("self_attn.qkv_proj", "attention.query_key_value", "self_attention.query_key_value",
             "attn.c_attn")
# (older files of GPT-2, OPT and BLOOM lack the first of these prefixes: h.0...,
# decoder.layers.0...)
PREFIX = re.compile(r"(?:model\.decoder\.|model\.|decoder\.|transformer\.|gpt_neox\.)?(.+)")
LAYER = re.compile(r"(?:layers|h)\.(\d+)\.(.+)\.(weight|bias)")
QKV = re.compile(r"(?:self_attn|attn)\.([qkv])_proj")
# buffers that old checkpoints saved and the model recomputes
IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias|attention\.bias|"
                     r"attention\.masked_bias)")


def config_from_hf(cfg: dict) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json (transformers 4 or 5 layout)."""
    arch = (cfg.get("architectures") or ["(none)"])[0]
    if arch not in ARCHITECTURES:
        raise BriskError(f"unsupported architecture {arch}; brisk converts {', '.join(ARCHITECTURES)}")
    try:
        return ModelArgs(**FAMILY_CONFIGS.get(arch, _llama)(cfg))
    except KeyError as e:
        raise BriskError(f"config.json lacks {e.args[0]}") from None


def _rope(cfg: dict) -> dict:
    # transformers 5 keeps theta and scaling in rope_parameters; older versions use rope_theta +
    # rope_scaling
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def _activation(cfg: dict, key: str) -> str:
    act = cfg.get(key, "gelu_new")
    if act not in ACTIVATIONS:
        raise BriskError(f"unsupported activation {key}={act!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[act]


def _refuse(cfg: dict, **unsupported) -> None:
    """Refuse a config whose key has a value brisk does not implement (the keys' defaults are
    fine)."""
    for key, (default, why) in unsupported.items():
        if cfg.get(key, default) != default:
            raise BriskError(f"{key}={cfg[key]} is not supported ({why})")


def _llama(cfg: dict) -> dict:  # Llama, Mistral, Qwen2, Phi-3
    arch = cfg["architectures"][0]
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
        raise BriskError(f"unsupported MLP (hidden_act={cfg.get('hidden_act')}, mlp_bias={cfg.get('mlp_bias')})")
    is_qwen2 = arch == "Qwen2ForCausalLM"
    # Llama's flag also puts a bias on o_proj, which brisk lacks
    if cfg.get("attention_bias") and not is_qwen2:
        raise BriskError("attention_bias=true is not supported (brisk has no o_proj bias)")
    rope = _rope(cfg)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "su":  # Phi-3's early name for longrope
        rope_type = "longrope"
    if rope_type not in ("default", "llama3", "longrope"):
        raise BriskError(f"rope_type {rope_type!r} is not supported (only default, llama3 and longrope)")
    block_size = cfg["max_position_embeddings"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope_dim = int(head_dim * rope.get("partial_rotary_factor",
                                       cfg.get("partial_rotary_factor", 1.0)))
    scaling = {k: rope[k] for k in LLAMA3_ROPE_KEYS} if rope_type == "llama3" else None
    # the attention factor as transformers derives it, from the context extension
    if rope_type == "longrope":
        original = rope.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"]
        factor = rope.get("factor") or block_size / original
        attention_factor = rope.get("attention_factor") or (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original)))
        scaling = dict(rope_type="longrope", short_factor=rope["short_factor"],
                       long_factor=rope["long_factor"], original_max_position_embeddings=original,
                       attention_factor=attention_factor)
    # brisk attends to the whole context; cap the context where a sliding window would start to
    # matter
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window:
        block_size = min(block_size, window)
    return dict(
        block_size=block_size, vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"],
        n_head=cfg["num_attention_heads"], dim=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        n_local_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim"),
        rope_base=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))), rope_dim=rope_dim,
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=is_qwen2)


def _layernorm_family(cfg: dict, dim: int, eps: float, act: str, tie: bool, bias: bool = True,
                      **switches) -> dict:
    """The fields shared by the LayerNorm families (GPT-NeoX, GPT-J, OPT, BLOOM, GPT-2,
    GPTBigCode)."""
    return dict(dim=dim, norm="layernorm", norm_eps=eps, mlp=act, mlp_bias=True, qkv_bias=bias,
                wo_bias=bias, tie_embeddings=bool(cfg.get("tie_word_embeddings", tie)),
                vocab_size=cfg["vocab_size"], **switches)


def _gpt_neox(cfg: dict) -> dict:
    rope = _rope(cfg)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    pct = rope.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0))
    return _layernorm_family(
        cfg, cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5), _activation(cfg, "hidden_act"),
        False, bias=cfg.get("attention_bias", True), block_size=cfg["max_position_embeddings"],
        n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        parallel_residual=cfg.get("use_parallel_residual", True), rope_dim=int(head_dim * pct),
        rope_base=float(rope.get("rope_theta", cfg.get("rotary_emb_base", 10000.0))))


def _gptj(cfg: dict) -> dict:
    return _layernorm_family(
        cfg, cfg["n_embd"], cfg.get("layer_norm_epsilon", 1e-5),
        _activation(cfg, "activation_function"), False,
        bias=False, head_bias=True, block_size=cfg["n_positions"], n_layer=cfg["n_layer"],
        n_head=cfg["n_head"], intermediate_size=cfg.get("n_inner") or 4 * cfg["n_embd"],
        parallel_residual=True, shared_norm=True, rope_dim=cfg.get("rotary_dim"))


def _opt(cfg: dict) -> dict:
    _refuse(cfg, do_layer_norm_before=(True, "post-norm OPT such as opt-350m"),
            _remove_final_layer_norm=(False, "no final norm"),
            enable_bias=(True, "OPT without biases"),
            layer_norm_elementwise_affine=(True, "norms without weights"),
            word_embed_proj_dim=(cfg["hidden_size"],
                                 "embedding projections come only with post-norm opt-350m"))
    return _layernorm_family(
        cfg, cfg["hidden_size"], 1e-5, _activation(cfg, "activation_function"), True,
        block_size=cfg["max_position_embeddings"], n_layer=cfg["num_hidden_layers"],
        n_head=cfg["num_attention_heads"], intermediate_size=cfg["ffn_dim"], positions="learned",
        pos_offset=2)


def _bloom(cfg: dict) -> dict:
    _refuse(cfg, apply_residual_connection_post_layernorm=(False, "residuals taken after the norm"))
    dim = cfg.get("hidden_size") or cfg["n_embed"]
    return _layernorm_family(
        cfg, dim, cfg.get("layer_norm_epsilon", 1e-5), "gelu_tanh", True,
        block_size=cfg.get("seq_length", 2048), n_layer=cfg["n_layer"],
        n_head=cfg.get("n_head") or cfg["num_attention_heads"], intermediate_size=4 * dim,
        positions="alibi", embed_norm=True)


def _gpt2(cfg: dict) -> dict:  # GPT-2 and GPTBigCode (StarCoder, SantaCoder)
    _refuse(cfg, scale_attn_weights=(True, "unscaled attention"),
            scale_attn_by_inverse_layer_idx=(False, "attention scaled by layer"))
    mqa = cfg.get("multi_query", False)
    return _layernorm_family(
        cfg, cfg["n_embd"], cfg.get("layer_norm_epsilon", 1e-5),
        _activation(cfg, "activation_function"), True,
        block_size=cfg["n_positions"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
        n_local_heads=1 if mqa else cfg["n_head"],
        intermediate_size=cfg.get("n_inner") or 4 * cfg["n_embd"], positions="learned")


FAMILY_CONFIGS = {"GPTNeoXForCausalLM": _gpt_neox, "GPTJForCausalLM": _gptj, "OPTForCausalLM": _opt,
                  "BloomForCausalLM": _bloom, "GPTBigCodeForCausalLM": _gpt2,
                  "GPT2LMHeadModel": _gpt2}


def weight_layout(cfg: dict) -> dict:
    """How the Hugging Face tensors differ from ours, beyond their names: `transposed` (GPT-2's
    Conv1D stores [in, out]), `per_head_qkv` (fused q/k/v interleaved per head, [H, 3, D]),
    `interleaved_rope` (GPT-J rotates pairs (2i, 2i+1): q and k rows are permuted into rotate-half
    order, which leaves q.k unchanged)."""
    arch = (cfg.get("architectures") or [""])[0]
    return dict(transposed=arch == "GPT2LMHeadModel",
                per_head_qkv=arch in ("GPTNeoXForCausalLM", "BloomForCausalLM") or (
                    arch == "GPTBigCodeForCausalLM" and not cfg.get("multi_query", False)),
                interleaved_rope=arch == "GPTJForCausalLM")


def weight_files(d: Path) -> list[Path]:
    """The weight files: safetensors preferred, sharded (with an index) or single."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (d / index).is_file():
            weight_map = json.loads((d / index).read_text())["weight_map"]
            files = [d / f for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise BriskError(f"{f} listed in {index} is missing (incomplete download?)")
            return files
        if (d / single).is_file():
            return [d / single]
    raise BriskError(f"no weights in {d}: expected model.safetensors or pytorch_model.bin (single or sharded)")


def _read(path: Path, fn):
    try:
        return fn()
    except Exception as e:
        # safetensors reports truncation and bad headers with its own error types
        raise BriskError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         " (truncated or corrupt? download it again)") from None


def open_shard(path: Path):
    """(names, get) for one weights file; safetensors reads a tensor only when it is asked for."""
    if path.suffix == ".safetensors":
        f = _read(path, lambda: safe_open(str(path), framework="pt"))
        return list(f.keys()), lambda name: _read(path, lambda: f.get_tensor(name))
    sd = load_state_dict(path)  # weights_only, mmap
    return list(sd), sd.pop


def _rotate_half_order(args: ModelArgs) -> torch.Tensor:
    # rows of one head's q or k: rotary pairs (2i, 2i+1) become (i, i + R/2), the rest stays
    R, D = args.rope_dim, args.head_dim
    return torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2), torch.arange(R, D)])


def _layer_tensors(rest: str, leaf: str, t: torch.Tensor, args: ModelArgs, layout: dict):
    """Our (name, tensor) pairs for one tensor of a block ("q"/"k"/"v" parts are fused later), or
    None."""
    if layout["transposed"] and t.dim() == 2:
        t = t.t()
    if rest in LAYER_NAMES:
        return [(f"{LAYER_NAMES[rest]}.{leaf}", t)]
    if rest == "mlp.gate_up_proj":  # Phi-3: gate and up stacked
        w1, w3 = t.chunk(2)
        return [(f"feed_forward.w1.{leaf}", w1), (f"feed_forward.w3.{leaf}", w3)]
    if rest in FUSED_QKV:
        D = args.head_dim
        if layout["per_head_qkv"]:  # [H, 3, D, ...] -> [3, H, D, ...]: q, k, v each in head order
            t = t.reshape(args.n_head, 3, D, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        return [(f"attention.wqkv.{leaf}", t)]
    qkv = QKV.fullmatch(rest)
    if qkv:
        part = qkv.group(1)
        if layout["interleaved_rope"] and part in "qk":
            heads = args.n_head if part == "q" else args.n_local_heads
            t = t.reshape(heads, args.head_dim, *t.shape[1:])[:, _rotate_half_order(args)].reshape(t.shape)
        return [(part, t)]
    return None


def convert_weights(files: list[Path], args: ModelArgs, layout: dict | None = None) -> dict:
    """Our state dict from the Hugging Face tensors in `files`, renamed, reordered (weight_layout)
    and with q/k/v fused."""
    layout = layout or weight_layout({})
    # open (not read) every file first: a truncated one fails before any work, and the bar knows its
    # total
    shards = [(path, *open_shard(path)) for path in files]
    # pending: wqkv name -> {"q"|"k"|"v": tensor} until all three have been read
    out, pending = {}, {}
    bar = tqdm(total=sum(len(names) for _, names, _ in shards), unit="tensor", desc="converting")
    for path, names, get in shards:
        for name in names:
            t = get(name)
            bar.update()
            short = PREFIX.fullmatch(name).group(1)
            layer = LAYER.fullmatch(short)
            top, _, leaf = short.rpartition(".")
            pieces = _layer_tensors(layer.group(2), layer.group(3), t, args,
                                    layout) if layer else None
            if top in TOP_NAMES and not layer:
                # a tied head is the embedding
                if not (TOP_NAMES[top] == "output" and args.tie_embeddings):
                    out[f"{TOP_NAMES[top]}.{leaf}"] = t
            elif pieces:
                for key, piece in pieces:
                    if key in ("q", "k", "v"):
                        fused = f"layers.{layer.group(1)}.attention.wqkv.{layer.group(3)}"
                        parts = pending.setdefault(fused, {})
                        parts[key] = piece
                        if len(parts) == 3:
                            # [(H + 2*Hkv) * D, ...]
                            out[fused] = torch.cat([parts["q"], parts["k"], parts["v"]])
                            del pending[fused]
                    else:
                        out[f"layers.{layer.group(1)}.{key}"] = piece
            elif not IGNORED.fullmatch(name):
                raise BriskError(f"{path.name}: unexpected tensor {name}")
    bar.close()
    if pending:
        key, parts = next(iter(pending.items()))
        raise BriskError(f"incomplete checkpoint: {key} has only {'/'.join(sorted(parts))} of q/k/v")
    check_shapes(out, args)
    return out


def check_shapes(sd: dict, args: ModelArgs) -> None:
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")
    missing, extra = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or extra:
        raise BriskError(f"weights do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise BriskError(f"weights do not match the config: {k} is {list(sd[k].shape)}, expected {list(shape)}")


def convert(checkpoint_dir: Path, model_name: str | None = None, force: bool = False) -> Path:
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise BriskError(f"{d} is not a directory (download it with scripts/download.py first?)")
    out_path = d / "model.pth"
    check_writable(out_path, force)
    hf_config = {}
    if (d / "config.json").is_file():
        try:
            hf_config = json.loads((d / "config.json").read_text())
        except ValueError as e:
            raise BriskError(f"{d / 'config.json'}: not JSON ({e})") from None
        args = config_from_hf(hf_config)
    else:
        args = ModelArgs.from_name(model_name or d.name)
    sd = convert_weights(weight_files(d), args, weight_layout(hf_config))
    save_checkpoint(sd, out_path, force)
    save_json(d / CONFIG_NAME, args.to_dict(), force=True)
    # Llama 3 ships its tiktoken model only under original/
    original = d / "original" / "tokenizer.model"
    if original.is_file() and not (d / "tokenizer.model").exists():
        save_atomic(d / "tokenizer.model", lambda tmp: shutil.copyfile(original, tmp))
    return out_path


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_dir", type=Path, required=True,
                   help="directory holding the Hugging Face files")
    p.add_argument("--model_name", default=None,
                   help="preset to use when there is no config.json (default: the directory name)")
    p.add_argument("--force", action="store_true", help="overwrite an existing model.pth")
    args = p.parse_args(argv)
    out = convert(args.checkpoint_dir, args.model_name, args.force)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    run_cli(main)
