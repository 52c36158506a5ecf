"""Random weights in the shape of any preset, written as a checkpoint: DIR/model.pth and
DIR/model_config.json.

    python scripts/random_checkpoint.py --model Llama-2-7b --out checkpoints/random/Llama-2-7b
    python quantize.py --checkpoint_path checkpoints/random/Llama-2-7b/model.pth --mode int4 --groupsize 32
    python bench.py --compile --checkpoint_path checkpoints/random/Llama-2-7b/model*.pth

For measuring speed and memory at a model's size without its weights (a Llama-2-7B on a GPU, say):
quantize.py and bench.py read it like a converted checkpoint, and bench.py needs no tokenizer
(generate.py needs the model's tokenizer beside it). The text such a model writes is noise. `--gguf
BF16 Q8_0` also writes the same weights as DIR/model-BF16.gguf and DIR/model-Q8_0.gguf (any type the
`gguf` package quantizes to) for bench.py's llama.cpp peer, for the architectures llama.cpp names
llama, qwen2, gpt2, starcoder, gptneox and bloom; their vocabulary is a placeholder of the right
size (GPT-2's 256 byte symbols, then `<tN>`). Matrices are drawn from N(0, std²), norm weights are
ones; tensors are drawn one at a time in the target dtype (on --device: a GPU draws a 7B model's
13.5 GB in seconds), so memory peaks near the size of the file.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import CONFIG_NAME, save_checkpoint  # noqa: E402
from cli import DTYPES, ArgumentParser, BriskError, check_writable, parse_device, run_cli, save_atomic  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from scripts.convert_gguf import BLOCK_NAMES, TOP_NAMES  # noqa: E402


def random_state_dict(args: ModelArgs, seed: int = 0, std: float = 0.02, dtype=torch.bfloat16,
                      progress: bool = False, device="cpu") -> dict:
    """A state dict (in CPU memory) for Transformer(args): N(0, std²) matrices and biases drawn on
    `device`, ones for the norms (a tied head is stored once, as the embedding). The values depend
    on the device's generator."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        shapes.pop("output.weight")
    gen = torch.Generator(device).manual_seed(seed)
    sd = {}
    for name, shape in tqdm(shapes.items(), desc="random weights", unit="tensor",
                            disable=not progress):
        if name.endswith("norm.weight"):
            sd[name] = torch.ones(shape, dtype=dtype)
        else:
            sd[name] = torch.empty(shape, dtype=dtype, device=device).normal_(0, std, generator=gen).cpu()
    return sd


def write_random_checkpoint(directory: Path, args: ModelArgs, force: bool = False,
                            **kwargs) -> Path:
    """directory/model.pth of random_state_dict(args, **kwargs), with its config beside it."""
    directory = Path(directory)
    for name in ("model.pth", CONFIG_NAME):
        check_writable(directory / name, force)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(random_state_dict(args, **kwargs), directory / "model.pth", force)
    save_atomic(directory / CONFIG_NAME,
                lambda tmp: tmp.write_text(json.dumps(args.to_dict(), indent=2)), force)
    return directory / "model.pth"


def gguf_arch(args: ModelArgs) -> str:
    """llama.cpp's architecture for these switches (Llama's and Qwen2's blocks, and those it has a
    fused-q/k/v, LayerNorm block for); a BriskError for others."""
    layernorm = args.norm == "layernorm" and not args.shared_norm and args.mlp_bias and args.mlp != "swiglu"
    llama = (args.norm == "rmsnorm" and args.mlp == "swiglu" and args.positions == "rope"
             and not args.mlp_bias and not args.wo_bias and not args.head_bias
             and not args.parallel_residual and not args.embed_norm
             and args.rope_dim == args.head_dim and args.rope_scaling is None)
    arch = None
    if llama:
        arch = "qwen2" if args.qkv_bias else "llama"
    elif layernorm and args.positions == "alibi" and args.embed_norm:
        arch = "bloom"
    elif layernorm and args.positions == "rope":
        arch = "gptneox"
    elif layernorm and args.positions == "learned" and not args.parallel_residual and not args.pos_offset:
        arch = {args.n_head: "gpt2", 1: "starcoder"}.get(args.n_local_heads)
    if arch is None:
        raise BriskError("a GGUF is written for llama.cpp's llama, qwen2, gpt2, starcoder, gptneox and bloom "
                         "architectures only (no rope scaling); these switches are none of them")
    return arch


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order (llama.cpp's byte-level
    vocabularies need them)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(extra)) for b in range(256)]


def write_gguf(path: Path, args: ModelArgs, sd: dict, qtype: str, force: bool = False) -> None:
    """sd (ours) as a llama.cpp GGUF of architecture gguf_arch(args), 2-D weights in qtype (F32,
    BF16, Q8_0, ...)."""
    import gguf
    import numpy as np

    arch = gguf_arch(args)
    names = {v: k for k, v in {**TOP_NAMES,
                               **{f"{k}.weight": f"{v}.weight" for k, v in BLOCK_NAMES.items()},
                                **{f"{k}.bias": f"{v}.bias"
                                   for k, v in BLOCK_NAMES.items()}}.items()}
    if arch not in ("llama", "qwen2"):  # their w1 is the gate, else the up projection
        names.update({"feed_forward.w1.weight": "ffn_up.weight",
                      "feed_forward.w1.bias": "ffn_up.bias"})
    names.update({f"attention.w{p}.{kind}": f"attn_{p}.{kind}" for p in "qkv"
                  for kind in ("weight", "bias")})

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_block_count(args.n_layer)
        w.add_context_length(args.block_size)
        w.add_embedding_length(args.dim)
        w.add_feed_forward_length(args.intermediate_size)
        w.add_head_count(args.n_head)
        w.add_head_count_kv(args.n_local_heads)
        w.add_layer_norm_eps(args.norm_eps)
        if arch in ("llama", "qwen2"):
            w.add_layer_norm_rms_eps(args.norm_eps)
            w.add_rope_freq_base(args.rope_base)
            w.add_key_length(args.head_dim)
            w.add_value_length(args.head_dim)
        if arch == "gptneox":
            w.add_rope_dimension_count(args.rope_dim)
            w.add_rope_freq_base(args.rope_base)
            w.add_parallel_residual(args.parallel_residual)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(byte_symbols() + [f"<t{i}>" for i in range(256, args.vocab_size)])
        w.add_token_types([1] * args.vocab_size)
        w.add_token_merges(["a b"])  # llama.cpp needs the key, and an empty list is not written
        w.add_eos_token_id(0)
        for name, t in tqdm(split_qkv(sd, args, arch).items(), desc=f"writing {qtype}",
                            unit="tensor"):
            if name.startswith("layers."):
                _, layer, rest = name.split(".", 2)
                key = f"blk.{layer}.{names[rest]}"
            else:
                key = names[name]
            data = t.float().numpy()
            if data.ndim == 2 and qtype != "F32":
                kind = gguf.GGMLQuantizationType[qtype]
                w.add_tensor(key, gguf.quants.quantize(data, kind), raw_dtype=kind)
            else:
                w.add_tensor(key, np.ascontiguousarray(data))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    save_atomic(path, write, force)


def split_qkv(sd: dict, args: ModelArgs, arch: str) -> dict:
    """sd with each fused wqkv as llama.cpp's llama and qwen2 store it: attn_q, attn_k, attn_v
    (llama's q and k rows permuted for its interleaved rotary, the inverse of
    convert_gguf.unpermute); sd itself for other arches."""
    if arch not in ("llama", "qwen2"):
        return sd
    out = {}
    sizes = [args.n_head * args.head_dim, *2 * [args.n_local_heads * args.head_dim]]
    for name, t in sd.items():
        if ".attention.wqkv." not in name:
            out[name] = t
            continue
        q, k, v = t.split(sizes)
        if arch == "llama":
            q, k = permute(q, args.n_head), permute(k, args.n_local_heads)
        prefix, kind = name.split(".attention.wqkv.")
        out.update({f"{prefix}.attention.{part}.{kind}": w
                    for part, w in zip(("wq", "wk", "wv"), (q, k, v))})
    return out


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # rotate-half order -> llama.cpp's interleaved pairs, per head: [out, ...]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main() -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a preset name of presets.py (e.g. Llama-2-7b, pythia-410m)")
    p.add_argument("--out", type=Path, required=True,
                   help="directory for model.pth and model_config.json")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="default bfloat16")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--std", type=float, default=0.02,
                   help="standard deviation of the weights (default 0.02)")
    p.add_argument("--device", default="cpu",
                   help="where the values are drawn (default cpu; cuda is much faster)")
    p.add_argument("--gguf", nargs="+", default=[], metavar="TYPE",
                   help="also write DIR/model-TYPE.gguf for llama.cpp (F32, BF16, Q8_0, Q4_0, ...)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    a = p.parse_args()
    if not a.std > 0:
        raise BriskError(f"--std must be > 0, got {a.std}")
    args = ModelArgs.from_name(a.model)
    ggufs = {t: a.out / f"model-{t}.gguf" for t in a.gguf}
    if ggufs:  # fail before the slow part
        import gguf
        if bad := [t for t in ggufs if t not in gguf.GGMLQuantizationType.__members__]:
            raise BriskError(f"unknown GGUF type {bad[0]!r} (e.g. F32, BF16, F16, Q8_0, Q4_0)")
        gguf_arch(args)  # a BriskError for switches llama.cpp has no architecture for
        for path in ggufs.values():
            check_writable(path, a.force)
    path = write_random_checkpoint(a.out, args, a.force, seed=a.seed, std=a.std,
                                   dtype=DTYPES[a.dtype], progress=True,
                                   device=parse_device(a.device))
    print(f"wrote {path} ({args.n_layer} layers, dim {args.dim}, vocab {args.vocab_size}): random weights")
    sd = torch.load(path, weights_only=True, mmap=True)
    for qtype, gguf_path in ggufs.items():
        write_gguf(gguf_path, args, sd, qtype, a.force)
        print(f"wrote {gguf_path} (llama.cpp {gguf_arch(args)}, {qtype})")


if __name__ == "__main__":
    run_cli(main)
