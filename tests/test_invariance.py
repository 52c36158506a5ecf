"""Split-invariant prefill on the CPU: a prompt's logits and the KV cache it leaves are bitwise the
same whether it is prefilled whole, in two chunks, as a restored prefix (prefix_cache) and the rest,
or one token at a time. Every row of every product and every query of attention is reduced in one
order whatever the number of rows and the attended length (brisk's kernels, cpu_kernels.cpp and
cpu_int4.cpp, on each path this CPU runs), so a greedy answer does not depend on what the prefix
cache, the batch or the chunking did."""
import httpx
import pytest
import torch

import cpu
import prefix_cache
from checkpoint import load_model
from conftest import make_checkpoint
from helpers import quantized, scribble, start_server

pytestmark = [pytest.mark.cpu_only("brisk's CPU kernels"),
              pytest.mark.skipif(cpu.kernel_isa() == 0,
                                 reason="the CPU has no AVX2 (or no compiler)")]

# every kernel path this process may take (BRISK_CPU_ISA=avx2 leaves the AVX2 one only)
each_isa = pytest.mark.parametrize("isa", [pytest.param(i, id=name) for name, i in cpu.ISAS.items()
                                            if 0 < i <= cpu.kernel_isa()])
PROMPT = [(37 * i + 11) % 320 for i in range(40)]
SPLITS = {"whole": [40], "two chunks": [17, 23], "token by token": [1] * 40}
CACHED = 24  # the prefix restored from the prefix cache
WEIGHTS = {"bf16": None, "int8": dict(mode="int8"), "int4": dict(mode="int4", groupsize=32)}
KV_CACHES = {"bf16": None, "int8": torch.int8}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    # wide enough that a product reduced in another order rounds some of its outputs to another bf16
    # value
    path = make_checkpoint(tmp_path_factory.mktemp("invariance") / "tiny", dim=256,
                           intermediate_size=768, n_layer=4, n_head=8)
    return {name: path if quant is None else quantized(path, quant)
            for name, quant in WEIGHTS.items()}


def tiny(path, kv_cache_dtype):
    model = load_model(path, "cpu", torch.bfloat16)
    model.kv_cache_dtype = kv_cache_dtype
    model.setup_caches(1, 64)
    return model


@torch.no_grad()
def prefill(model, splits: list, start: int = 0) -> tuple[torch.Tensor, list]:
    """The last position's logits after prefilling PROMPT[start:] in pieces of `splits` tokens, and
    every layer's keys and values of the prompt's positions."""
    for n in splits:
        logits = model(torch.tensor([PROMPT[start:start + n]]),
                       torch.arange(start, start + n))[0, -1]
        start += n
    caches = [c[:, :, :len(PROMPT)].clone() for layer in model.layers
              for c in (layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache)]
    return logits, caches


def assert_bitwise_equal(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]), f"logits differ by {(a[0] - b[0]).abs().max()}"
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1])), "the KV caches differ"


@each_isa
@pytest.mark.parametrize("kv", KV_CACHES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_a_prompt_split_anyhow_gives_the_logits_and_cache_of_a_whole_prefill(checkpoints, monkeypatch, weights, kv,
                                                                              isa):
    monkeypatch.setattr(cpu, "KERNEL_ISA", isa)
    model = tiny(checkpoints[weights], KV_CACHES[kv])
    whole = prefill(model, SPLITS["whole"])
    for name, splits in SPLITS.items():
        assert_bitwise_equal(prefill(model, splits), whole)


@each_isa
@pytest.mark.parametrize("kv", KV_CACHES)
@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_a_restored_prefix_then_the_rest_gives_the_logits_and_cache_of_a_whole_prefill(checkpoints, monkeypatch,
                                                                                      weights, kv, isa):
    monkeypatch.setattr(cpu, "KERNEL_ISA", isa)
    path = checkpoints[weights]
    model = tiny(path, KV_CACHES[kv])
    cache = prefix_cache.PrefixCache([model], [prefix_cache.model_meta(model, path)], 1 << 30)
    prefill(model, [CACHED])
    assert cache.store(PROMPT[:CACHED])
    whole = prefill(model, SPLITS["whole"])
    scribble(model)  # only restored positions can be right
    assert cache.restore(PROMPT, len(PROMPT) - 1) == CACHED
    assert_bitwise_equal(prefill(model, [len(PROMPT) - CACHED], start=CACHED), whole)


@each_isa
@pytest.mark.parametrize("cache", [torch.bfloat16, torch.int8])
def test_attention_to_each_querys_last_position_is_a_causal_masks_whatever_the_attended_length(cache, isa):
    """brisk.attend with an int64 mask (each query's last position, a view along the keys) gives the
    causal bool mask's result bitwise, and the same over 70 positions as over the 40 the queries can
    see."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 40, 64, generator=g)
    k, v = (cpu.kv_store(torch.randn(1, 2, 70, 64, generator=g), cache) for _ in "kv")
    pos = torch.arange(40).view(1, 1, 40, 1)
    want = torch.ops.brisk.attend(q, k[:, :, :40], v[:, :, :40], torch.arange(40) <= pos, None, isa)
    for S in (40, 70):
        last = pos.expand(-1, -1, -1, S)
        assert torch.equal(torch.ops.brisk.attend(q, k[:, :, :S], v[:, :, :S], last, None, isa),
                           want)


def test_a_long_prompt_attends_without_a_mask_of_positions_squared(checkpoints, monkeypatch):
    """brisk's kernel takes each query's last position, a view of T values, not a [T, S] mask; in
    the kernel the queries go in runs of at most 64 (their scores: [64, S])."""
    model = load_model(checkpoints["bf16"], "cpu", torch.bfloat16)
    model.setup_caches(1, 256)
    masks = []
    monkeypatch.setattr(torch.ops.brisk, "attend", lambda q, k, v, mask,
                        *a: masks.append(mask) or q.clone())
    with torch.no_grad():
        model(torch.tensor([PROMPT * 6]), torch.arange(240))
    assert masks and all(m.dtype == torch.long and m.shape[-2:] == (240, 240)
                         and m.stride(-1) == 0 for m in masks)
    assert all(m.untyped_storage().nbytes() <= 240 * 8 for m in masks)


@pytest.fixture(scope="module")
def bf16_server(real_checkpoint, tmp_path_factory):
    proc = start_server(["--checkpoint_path", real_checkpoint, "--dtype", "bfloat16",
                         "--max_seq_length", 512],
                        tmp_path_factory.mktemp("log") / "serve.log")
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_a_repeated_greedy_request_gets_the_same_answer_from_the_prefix_cache(bf16_server):
    """SmolLM2 in bf16 (a tiny model's sums are too short to round differently often): the second
    request's prompt comes from the prefix cache but for its last token, which is one row where the
    first request's prefill had many; the same text, and the same log-probabilities to the last
    bit."""
    prompt = "Prefill in one piece or in many: " + ", ".join(map(str, range(30, 60)))
    body = dict(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=16, temperature=0,
                logprobs=5)
    first, second = (httpx.post(f"{bf16_server.url}/v1/completions", json=body, timeout=120).json()
                     for _ in "12")
    assert first["usage"]["prompt_tokens"] > cpu.FEW_ROWS
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == first["usage"]["prompt_tokens"] - 1
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert second["choices"][0]["logprobs"] == first["choices"][0]["logprobs"]
