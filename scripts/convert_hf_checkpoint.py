"""Convert a Hugging Face Llama / Mistral / Qwen2 checkpoint directory into DIR/model.pth + DIR/model_config.json.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-3.2-1B [--force]

Weights are read shard by shard and kept in their stored dtype; q, k and v are fused into wqkv as soon as all
three pieces of a layer have been seen, so peak memory stays near the size of the model.
"""
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import CONFIG_NAME, load_state_dict, save_checkpoint  # noqa: E402
from cli import ArgumentParser, BriskError, check_writable, run_cli, save_atomic  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
LAYER_NAMES = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def config_from_hf(cfg: dict) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json (transformers 4 or 5 layout)."""
    arch = (cfg.get("architectures") or ["(none)"])[0]
    if arch not in ARCHITECTURES:
        raise BriskError(f"unsupported architecture {arch}; brisk converts {', '.join(ARCHITECTURES)}")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
        raise BriskError(f"unsupported MLP (hidden_act={cfg.get('hidden_act')}, mlp_bias={cfg.get('mlp_bias')})")
    is_qwen2 = arch == "Qwen2ForCausalLM"
    if cfg.get("attention_bias") and not is_qwen2:  # Llama's flag also puts a bias on o_proj, which brisk lacks
        raise BriskError("attention_bias=true is not supported (brisk has no o_proj bias)")
    # transformers 5 keeps theta and scaling in rope_parameters; older versions use rope_theta + rope_scaling
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise BriskError(f"rope_type {rope_type!r} is not supported (only default and llama3)")
    try:
        scaling = {k: rope[k] for k in LLAMA3_ROPE_KEYS} if rope_type == "llama3" else None
        block_size = cfg["max_position_embeddings"]
        # brisk attends to the whole context; cap the context where a sliding window would start to matter
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        if window:
            block_size = min(block_size, window)
        return ModelArgs(
            block_size=block_size,
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["num_hidden_layers"],
            n_head=cfg["num_attention_heads"],
            dim=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_local_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"),
            rope_base=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2,
        )
    except KeyError as e:
        raise BriskError(f"config.json lacks {e.args[0]}") from None


def weight_files(d: Path) -> list[Path]:
    """The weight files: safetensors preferred, sharded (with an index) or single."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (d / index).is_file():
            files = [d / f for f in sorted(set(json.loads((d / index).read_text())["weight_map"].values()))]
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
    except Exception as e:  # safetensors reports truncation and bad headers with its own error types
        raise BriskError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         " (truncated or corrupt? download it again)") from None


def open_shard(path: Path):
    """(names, get) for one weights file; safetensors reads a tensor only when it is asked for."""
    if path.suffix == ".safetensors":
        f = _read(path, lambda: safe_open(str(path), framework="pt"))
        return list(f.keys()), lambda name: _read(path, lambda: f.get_tensor(name))
    sd = load_state_dict(path)  # weights_only, mmap
    return list(sd), sd.pop


def convert_weights(files: list[Path], args: ModelArgs) -> dict:
    """Our state dict from the Hugging Face tensors in `files`, renamed and with q/k/v fused."""
    # open (not read) every file first: a truncated one fails before any work, and the bar knows its total
    shards = [(path, *open_shard(path)) for path in files]
    out, pending = {}, {}  # pending: wqkv name -> {"q"|"k"|"v": tensor} until all three have been read
    bar = tqdm(total=sum(len(names) for _, names, _ in shards), unit="tensor", desc="converting")
    for path, names, get in shards:
        for name in names:
            t = get(name)
            bar.update()
            layer = LAYER.fullmatch(name)
            rest = layer.group(2) if layer else ""
            qkv = QKV.fullmatch(rest)
            if name in TOP_NAMES:
                if not (name == "lm_head.weight" and args.tie_embeddings):  # a tied head is the embedding
                    out[TOP_NAMES[name]] = t
            elif rest in LAYER_NAMES:
                out[f"layers.{layer.group(1)}.{LAYER_NAMES[rest]}"] = t
            elif qkv:
                key = f"layers.{layer.group(1)}.attention.wqkv.{qkv.group(2)}"
                parts = pending.setdefault(key, {})
                parts[qkv.group(1)] = t
                if len(parts) == 3:
                    out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])  # [(H + 2*Hkv) * D, ...]
                    del pending[key]
            elif not rest.endswith("rotary_emb.inv_freq"):  # old checkpoints saved this recomputed buffer
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
    if (d / "config.json").is_file():
        try:
            args = config_from_hf(json.loads((d / "config.json").read_text()))
        except ValueError as e:
            raise BriskError(f"{d / 'config.json'}: not JSON ({e})") from None
    else:
        args = ModelArgs.from_name(model_name or d.name)
    sd = convert_weights(weight_files(d), args)
    save_checkpoint(sd, out_path, force)
    save_atomic(d / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(args.to_dict(), indent=2)), force=True)
    # Llama 3 ships its tiktoken model only under original/
    original = d / "original" / "tokenizer.model"
    if original.is_file() and not (d / "tokenizer.model").exists():
        save_atomic(d / "tokenizer.model", lambda tmp: shutil.copyfile(original, tmp))
    return out_path


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_dir", type=Path, required=True, help="directory holding the Hugging Face files")
    p.add_argument("--model_name", default=None,
                   help="preset to use when there is no config.json (default: the directory name)")
    p.add_argument("--force", action="store_true", help="overwrite an existing model.pth")
    args = p.parse_args(argv)
    out = convert(args.checkpoint_dir, args.model_name, args.force)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    run_cli(main)
