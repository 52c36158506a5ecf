"""Evaluate a checkpoint: sliding-window perplexity on a local text, and lm-evaluation-harness
tasks.

    python eval.py --checkpoint_path checkpoints/ORG/NAME/model.pth                      perplexity, default text
    python eval.py --checkpoint_path ... --text_file notes.txt --max_seq_length 1024 --stride 512
    python eval.py --checkpoint_path ... --tasks hellaswag,arc_easy --limit 200          needs: pip install lm_eval

The default text needs no network: DEFAULT_CHARS characters of CPython's pydoc topic help, from the
half that GPTQ does not calibrate on (quant.pydoc_text(1)), so figures compare across checkpoints
and quantization modes on one Python version. Windows of --max_seq_length tokens start every
--stride tokens; each token is scored once, by the first window that contains it after its context,
so every token but the early ones sees max_seq_length - stride tokens of context or more (as in the
Hugging Face perplexity guide; with stride == max_seq_length the windows are disjoint and the first
token of each is not scored). Any checkpoint load_model reads can be evaluated: float, int8 or int4.
"""
import argparse
import math
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from checkpoint import DEFAULT_CHECKPOINT, check_checkpoint
from cli import (DTYPES, ArgumentParser, BriskError, TextStream, add_device_flags,
                 check_writable, kv_cache_dtype, run_cli, save_json)
from engine import generate, prepare, tokens_that_fit
from model import Transformer
from quant import pydoc_text
from tokenizer import load_tokenizer

try:  # only --tasks needs lm-evaluation-harness
    from lm_eval.api.model import LM
except ImportError:
    LM = object


DEFAULT_CHARS = 20_000


@torch.no_grad()
def perplexity(model: Transformer, ids: list, max_seq_length: int = 512, stride: int = 256,
               progress: bool = True) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of ids[1:] under the model, and the number of tokens
    scored."""
    if len(ids) < 2:
        raise BriskError("the text must have at least 2 tokens")
    if not 0 < stride <= max_seq_length:
        raise BriskError(f"--stride must be in 1..--max_seq_length ({max_seq_length}), got {stride}")
    device = model.norm.weight.device
    ids = torch.tensor(ids, device=device)
    model.setup_caches(1, max_seq_length)
    # done: tokens before it are scored (or, at a window's start, unscorable)
    nll, count, done = 0.0, 0, 0
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


class BriskLM(LM):
    """Our model as an lm-evaluation-harness LM. Requests are scored one at a time, each in one
    forward pass of at most max_length tokens; a longer context keeps its last tokens. Tokenization
    follows lm_eval's Hugging Face model: whitespace at the end of a context moves to the
    continuation, and the continuation's tokens are those of context + continuation after the
    context's."""

    def __init__(self, model: Transformer, tokenizer, max_length: int, max_gen_toks: int = 256,
                 progress: bool = True):
        super().__init__()
        self.model, self.tok, self.max_length, self.max_gen_toks = model, tokenizer, max_length, max_gen_toks
        self.model_device, self.progress = model.norm.weight.device, progress  # LM has a `device` property
        # what an empty context is conditioned on, as lm_eval's Hugging Face model does
        self.prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_ids[0]
        model.setup_caches(1, max_length)

    def _bar(self, requests, what: str):
        return tqdm(requests, desc=what, unit="request", disable=not self.progress)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list, list]:
        if not context:
            return [self.prefix], self.tok.encode(continuation, bos=False)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.tok.encode(context + continuation), self.tok.encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, context: list, continuation: list) -> tuple[float, bool]:
        """Sum of log p(continuation | context), and whether greedy decoding would produce the
        continuation."""
        continuation = continuation[-self.max_length:]
        x = (context + continuation)[-(self.max_length + 1):-1]  # the last token is only predicted
        logits = self.model(torch.tensor([x], device=self.model_device),
                            torch.arange(len(x), device=self.model_device))
        logp = logits[0, -len(continuation):].float().log_softmax(-1)  # [C, V]
        target = torch.tensor(continuation, device=self.model_device)
        return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self._score(*self._encode_pair(*r.args))
                for r in self._bar(requests, "loglikelihood")]

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        out = []
        for r in self._bar(requests, "loglikelihood_rolling"):
            windows = get_rolling_token_windows(token_list=self.tok.encode(r.args[0], bos=False),
                                                prefix_token=self.prefix,
                                                max_seq_len=self.max_length, context_len=1)
            out.append(sum(self._score(*make_disjoint_window(w))[0] for w in windows))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in self._bar(requests, "generate_until"):
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = kwargs.get("max_gen_toks", self.max_gen_toks)
            ids = self.tok.encode(context)[-(self.max_length - max_new):] or [self.prefix]
            temperature = kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0
            stream = TextStream(self.tok, until)
            fit = tokens_that_fit(max_new, len(ids), self.max_length)
            generate(self.model, torch.tensor(ids, device=self.model_device), fit,
                     eos_ids=self.tok.eos_ids, on_token=lambda row, t: stream.push(t),
                     temperature=temperature, top_k=None)
            out.append(stream.finish())
        return out


def run_tasks(model: Transformer, tokenizer, args) -> dict:
    if LM is object:
        raise BriskError("--tasks needs lm-evaluation-harness: pip install lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager
    lm = BriskLM(model, tokenizer, args.task_max_length, args.max_gen_toks)
    manager = TaskManager(include_path=str(args.include_path) if args.include_path else None)
    results = lm_eval.simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot,
                                      limit=args.limit, task_manager=manager, random_seed=args.seed,
                                      numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                      fewshot_random_seed=args.seed)
    if results is None:
        raise BriskError("lm_eval returned no results")
    print(lm_eval.utils.make_table(results))
    return results["results"]


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"model.pth, or a quantized model_*.pth (default: {DEFAULT_CHECKPOINT})")
    add_device_flags(p)
    p.add_argument("--text_file", type=Path, default=None,
                   help=f"UTF-8 text for perplexity (default: {DEFAULT_CHARS} characters of pydoc topic help)")
    p.add_argument("--max_seq_length", type=int, default=512,
                   help="perplexity: tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=256,
                   help="perplexity: tokens between window starts (default 256)")
    p.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=None,
                   help="comma-separated lm-evaluation-harness tasks (then perplexity only with --perplexity)")
    p.add_argument("--perplexity", action="store_true",
                   help="with --tasks, compute perplexity as well")
    p.add_argument("--num_fewshot", type=int, default=None,
                   help="tasks: examples in each prompt (default: the task's)")
    p.add_argument("--limit", type=float, default=None,
                   help="tasks: at most this many documents (or fraction) each")
    p.add_argument("--include_path", type=Path, default=None,
                   help="tasks: a directory of extra task YAML files")
    p.add_argument("--task_max_length", type=int, default=None,
                   help="tasks: longest context in tokens (default: the model's block_size, at most 2048)")
    p.add_argument("--max_gen_toks", type=int, default=256,
                   help="tasks: default generation length (default 256)")
    p.add_argument("--seed", type=int, default=1234,
                   help="tasks: seed of few-shot sampling (default 1234)")
    p.add_argument("--json", type=Path, default=None, help="write the results to this file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    return p.parse_args(argv)


def main(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    check_checkpoint(args.checkpoint_path)
    if args.text_file is not None and not args.text_file.is_file():
        raise BriskError(f"text file not found: {args.text_file}")
    if args.json is not None:
        check_writable(args.json, args.force)
    if args.tasks is not None and not args.tasks:
        raise BriskError("--tasks needs at least one task name")
    model = prepare(args.checkpoint_path, args.device, DTYPES[args.dtype],
                    kv_cache_dtype=kv_cache_dtype(args)).model
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    block = model.config.block_size
    report = dict(checkpoint=str(args.checkpoint_path), dtype=args.dtype,
                  kv_cache_dtype=args.kv_cache_dtype, device=str(args.device))

    if args.tasks is None or args.perplexity:
        if args.max_seq_length > block:
            raise BriskError(f"--max_seq_length {args.max_seq_length} exceeds the model's block_size {block}")
        text = args.text_file.read_text() if args.text_file else pydoc_text(1)[:DEFAULT_CHARS]
        ppl, n = perplexity(model, tokenizer.encode(text), args.max_seq_length, args.stride)
        source = (str(args.text_file) if args.text_file
                  else f"pydoc topic help, held-out half, {DEFAULT_CHARS} characters")
        report["perplexity"] = dict(perplexity=ppl, tokens=n, text=source,
                                    max_seq_length=args.max_seq_length, stride=args.stride)
        print(f"perplexity {ppl:.4f} over {n} tokens ({source}; max_seq_length {args.max_seq_length}, "
              f"stride {args.stride})")
    if args.tasks:
        args.task_max_length = args.task_max_length or min(block, 2048)
        if args.task_max_length > block:
            raise BriskError(f"--task_max_length {args.task_max_length} exceeds the model's block_size {block}")
        report["tasks"] = run_tasks(model, tokenizer, args)
    if args.json is not None:
        save_json(args.json, report, args.force)
        print(f"wrote {args.json}", file=sys.stderr)
    return report


if __name__ == "__main__":
    run_cli(main)
