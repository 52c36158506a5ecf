"""Sliding-window perplexity of a checkpoint (float or quantized) on a fixed local text.

    python scripts/perplexity.py --checkpoint_path checkpoints/ORG/NAME/model_int4.g32.pth

The default text is DEFAULT_CHARS characters of CPython's pydoc topic help, taken from the half that GPTQ does not
calibrate on (quantize.pydoc_text(1)), so figures compare across quantization modes but depend on the Python
version. Windows of max_seq_length tokens start every `stride` tokens; each token is scored once, by the first
window that contains it after its context, so every token but the early ones sees max_seq_length - stride
tokens of context or more (as in the Hugging Face perplexity guide; with stride == max_seq_length the windows are
disjoint and the first token of each is not scored).
"""
import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import DEFAULT_CHECKPOINT, load_model  # noqa: E402
from cli import DTYPES, BriskError, run_cli  # noqa: E402
from model import Transformer  # noqa: E402
from quant import pydoc_text  # noqa: E402

DEFAULT_CHARS = 20_000


@torch.no_grad()
def perplexity(model: Transformer, ids: list, max_seq_length: int = 512, stride: int = 256,
               progress: bool = True) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of ids[1:] under the model, and the number of tokens scored."""
    if len(ids) < 2:
        raise BriskError("the text must have at least 2 tokens")
    if not 0 < stride <= max_seq_length:
        raise BriskError(f"--stride must be in 1..--max_seq_length ({max_seq_length}), got {stride}")
    device = model.norm.weight.device
    ids = torch.tensor(ids, device=device)
    model.setup_caches(1, max_seq_length)
    nll, count, done = 0.0, 0, 0  # done: tokens before it are scored (or, at a window's start, unscorable)
    starts = range(0, max(len(ids) - max_seq_length, 0) + stride, stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        end = min(begin + max_seq_length, len(ids))
        x = ids[begin:end]
        logits = model(x[None], torch.arange(end - begin, device=device))[0].float()  # [T, V]
        first = max(done - begin, 1)  # window offset of the first token to score; it needs context
        logp = torch.log_softmax(logits[first - 1:-1], dim=-1)  # predictions of x[first:]
        nll -= logp.gather(-1, x[first:, None]).sum().item()
        count += end - begin - first
        done = end
    return math.exp(nll / count), count


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"model.pth (or a quantized model_*.pth; default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max_seq_length", type=int, default=512, help="tokens per window")
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    p.add_argument("--text_file", type=Path, default=None,
                   help=f"UTF-8 text to score (default: {DEFAULT_CHARS} characters of pydoc topic help)")
    args = p.parse_args(argv)
    if args.text_file is not None and not args.text_file.is_file():
        raise BriskError(f"text file not found: {args.text_file}")
    text = args.text_file.read_text() if args.text_file else pydoc_text(1)[:DEFAULT_CHARS]
    from tokenizer import load_tokenizer
    ids = load_tokenizer(args.checkpoint_path.parent).encode(text)
    model = load_model(args.checkpoint_path, args.device, DTYPES[args.dtype])
    if args.max_seq_length > model.config.block_size:
        raise BriskError(f"--max_seq_length {args.max_seq_length} exceeds the model's {model.config.block_size}")
    ppl, n = perplexity(model, ids, args.max_seq_length, args.stride)
    print(f"perplexity {ppl:.4f} over {n} tokens ({args.checkpoint_path}, {args.dtype}, "
          f"max_seq_length {args.max_seq_length}, stride {args.stride})")


if __name__ == "__main__":
    run_cli(main)
