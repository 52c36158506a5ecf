"""The figures of a run and their help text: speed (time to first token, tokens/s, bandwidth,
memory), speculative decoding's acceptance, prefix caching's cached and prefilled tokens; each with
the line it is printed as.
"""
import resource
import statistics
import textwrap

import torch

from cpu import kv_width
from model import ModelArgs, Transformer

BANDWIDTH_HELP = (
    "achieved memory bandwidth GB/s = (bytes of weights read per decode step, i.e. the sum of parameter and buffer "
    "bytes of the model but the token embedding's (one row of it is read), a tied matrix counted once as the head, "
    "the KV cache excluded, + average KV cache bytes read "
    "per step, i.e. 2 * n_layer * batch_size * n_kv_heads * head_dim * average context length * the cache's "
    "element size (that of its dtype: on the CPU fp32, or a bf16 model's bf16 where brisk's kernel attends; the "
    "model's dtype on a GPU; --kv_cache_dtype int8: 1 byte, and a 4-byte scale per position and head), the "
    "average context length being prompt tokens + (decode steps + 1) / 2) * decode tokens/s")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def speed_figures(new: int, tokens: int, batch: int, ttft: float, decode_s: float, prompt_len: int,
                  weights: int, kv_per_token: int, device) -> dict:
    """The figures of one generation of `new` tokens per sequence (`tokens` in all, `batch`
    sequences): decode steps yield the tokens after the first, each attending to the prompt and the
    tokens before it (BANDWIDTH_HELP)."""
    steps, total = new - 1, ttft + decode_s
    decode_tps = steps / decode_s if steps else None
    bandwidth = None
    if decode_tps is not None:
        # decode step j attends to prompt_len + j
        kv = kv_per_token * batch * (prompt_len + (steps + 1) / 2)
        bandwidth = (weights + kv) * decode_tps / 1e9
    return dict(new_tokens=new, tokens_generated=tokens, ttft_s=ttft, decode_s=decode_s,
                total_s=total, decode_tokens_per_s=decode_tps, e2e_tokens_per_s=new / total,
                throughput_tokens_per_s=tokens / total, bandwidth_gb_s=bandwidth,
                peak_memory_gb=peak_memory_gb(device))


def figures(model: Transformer, rows: list, timing: dict, prompt_len: int, weights: int,
            device) -> dict:
    """speed_figures of a generate() call: its rows of new tokens and its timing."""
    cache = model.layers[0].attention.kv_cache.k_cache
    return speed_figures(max(map(len, rows)), sum(map(len, rows)), len(rows), timing["ttft_s"],
                         timing["decode_s"], prompt_len, weights,
                         kv_bytes_per_token(model.config, cache.dtype), device)


def summarize(samples: list[dict]) -> dict:
    """Medians over the samples after the first (a warm-up), or over the only one."""
    counted = samples[1:] or samples
    keys = [k for k, v in counted[0].items() if isinstance(v, (int, float))]
    out = {}
    for k in keys:
        values = [s[k] for s in counted if s[k] is not None]
        out[k] = statistics.median(values) if values else None
    return out


def describe(f: dict) -> str:
    def num(v, unit, fmt=".1f"):
        return "n/a" if v is None else f"{v:{fmt}} {unit}"
    return (f"{f['new_tokens']} tokens, time to first token {num(f['ttft_s'], 's', '.3f')}, "
            f"decode {num(f['decode_tokens_per_s'], 'tok/s')}, end-to-end {num(f['e2e_tokens_per_s'], 'tok/s')}, "
            f"throughput {num(f['throughput_tokens_per_s'], 'tok/s')}, "
            f"bandwidth {num(f['bandwidth_gb_s'], 'GB/s', '.2f')}, peak memory {num(f['peak_memory_gb'], 'GB', '.2f')}")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (quantized weights and scales are buffers) but the token
    embedding's, of which a decode step reads one row; a tied matrix counts once, as the head. Call
    before setup_caches so the KV cache and rotary tables are not counted."""
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    tensors = {t.data_ptr(): t for name, t in named if not name.startswith("tok_embeddings.")}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_bytes_per_token(config: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of keys and values one position holds across the layers, for one sequence, in a cache
    of dtype (int8: with its scales, cpu.kv_width)."""
    width = kv_width(config.head_dim, dtype)
    return 2 * config.n_layer * config.n_local_heads * width * dtype.itemsize


def speculation_figures(stats: dict, k: int) -> dict:
    """acceptance_rate: draft tokens kept / proposed; accepted_per_verification: of k, kept per
    target pass."""
    v = stats["verifications"]
    return dict(speculate_k=k, verifications=v, plain_steps=stats["plain_steps"],
                acceptance_rate=stats["accepted"] / (k * v) if v else None,
                accepted_per_verification=stats["accepted"] / v if v else None)


def describe_speculation(f: dict) -> str:
    if not f["verifications"]:
        return f"speculation: no verifications, {f['plain_steps']:g} plain decode steps"
    return (f"speculation: acceptance rate {f['acceptance_rate']:.2f}, {f['accepted_per_verification']:.2f} of "
            f"{f['speculate_k']:g} draft tokens accepted per verification, {f['verifications']:g} verifications, "
            f"{f['plain_steps']:g} plain decode steps")


def describe_prompt(i: int, s: dict, draft: bool = False) -> str:
    """One prompt's figures; with a draft model, its cache is restored and prefilled exactly as the
    target's."""
    tps = "n/a" if s["decode_tokens_per_s"] is None else f"{s['decode_tokens_per_s']:.1f} tok/s"
    both = " (each for the target and the draft)" if draft else ""
    line = (f"[prompt {i}: {s['prompt_tokens']} tokens, {s['cached_tokens']} cached, {s['prefilled_tokens']} "
            f"prefilled{both}; time to first token {s['ttft_s']:.3f} s; {s['new_tokens']} new tokens, decode {tps}]")
    return line if "verifications" not in s else f"{line}\n[prompt {i}: {describe_speculation(s)}]"


def prefix_summary(stats: list[dict]) -> dict:
    """Median time to first token of the prompts prefilled from scratch (cold) and of those that hit
    the cache."""
    cold = [s["ttft_s"] for s in stats if s["cached_tokens"] == 0]
    hot = [s["ttft_s"] for s in stats if s["cached_tokens"] > 0]
    out = dict(cold_prompts=len(cold), cached_prompts=len(hot),
               cold_ttft_s=statistics.median(cold) if cold else None,
               cached_ttft_s=statistics.median(hot) if hot else None)
    out["speedup"] = out["cold_ttft_s"] / out["cached_ttft_s"] if cold and hot else None
    return out


FIGURES_HELP = f"""figures (per sample, and the median over the samples after the first, a warm-up):
  time to first token  prefill, including sampling the first new token
  decode tokens/s      per sequence, the tokens after the first / their decode time (with speculative decoding
                       a target pass yields several: bandwidth below is then an effective figure per token)
  end-to-end tokens/s  per sequence, new tokens / (prefill + decode time)
  throughput           new tokens of all sequences / (prefill + decode time)
  peak memory          torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU
  acceptance rate      speculative decoding: draft tokens accepted / draft tokens proposed, and the mean number
                       of the k draft tokens accepted per verification (each verification also yields one token
                       from the target); plain decode steps: where nothing was proposed (no prompt-lookup match)
{textwrap.fill(BANDWIDTH_HELP, 100, initial_indent="  ", subsequent_indent="    ")}"""
