"""Random weights in the shape of any preset, written as a checkpoint: DIR/model.pth and DIR/model_config.json.

    python scripts/random_checkpoint.py --model Llama-2-7b --out checkpoints/random/Llama-2-7b
    python quantize.py --checkpoint_path checkpoints/random/Llama-2-7b/model.pth --mode int4 --groupsize 32
    python bench.py --compile --checkpoint_path checkpoints/random/Llama-2-7b/model*.pth

For measuring speed and memory at a model's size without its weights (a Llama-2-7B on a GPU, say): quantize.py
and bench.py read it like a converted checkpoint, and bench.py needs no tokenizer (generate.py needs the
model's tokenizer beside it). The text such a model writes is noise.
Matrices are drawn from N(0, std²), norm weights are ones; tensors are drawn one at a time in the target dtype
(on --device: a GPU draws a 7B model's 13.5 GB in seconds), so memory peaks near the size of the file.
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


def random_state_dict(args: ModelArgs, seed: int = 0, std: float = 0.02, dtype=torch.bfloat16,
                      progress: bool = False, device="cpu") -> dict:
    """A state dict (in CPU memory) for Transformer(args): N(0, std²) matrices and biases drawn on `device`, ones
    for the norms (a tied head is stored once, as the embedding). The values depend on the device's generator."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        shapes.pop("output.weight")
    gen = torch.Generator(device).manual_seed(seed)
    sd = {}
    for name, shape in tqdm(shapes.items(), desc="random weights", unit="tensor", disable=not progress):
        if name.endswith("norm.weight"):
            sd[name] = torch.ones(shape, dtype=dtype)
        else:
            sd[name] = torch.empty(shape, dtype=dtype, device=device).normal_(0, std, generator=gen).cpu()
    return sd


def write_random_checkpoint(directory: Path, args: ModelArgs, force: bool = False, **kwargs) -> Path:
    """directory/model.pth of random_state_dict(args, **kwargs), with its config beside it."""
    directory = Path(directory)
    for name in ("model.pth", CONFIG_NAME):
        check_writable(directory / name, force)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(random_state_dict(args, **kwargs), directory / "model.pth", force)
    save_atomic(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(args.to_dict(), indent=2)), force)
    return directory / "model.pth"


def main() -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a preset name of presets.py (e.g. Llama-2-7b, pythia-410m)")
    p.add_argument("--out", type=Path, required=True, help="directory for model.pth and model_config.json")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="default bfloat16")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights (default 0.02)")
    p.add_argument("--device", default="cpu", help="where the values are drawn (default cpu; cuda is much faster)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    a = p.parse_args()
    if not a.std > 0:
        raise BriskError(f"--std must be > 0, got {a.std}")
    args = ModelArgs.from_name(a.model)
    path = write_random_checkpoint(a.out, args, a.force, seed=a.seed, std=a.std, dtype=DTYPES[a.dtype],
                                   progress=True, device=parse_device(a.device))
    print(f"wrote {path} ({args.n_layer} layers, dim {args.dim}, vocab {args.vocab_size}): random weights")


if __name__ == "__main__":
    run_cli(main)
