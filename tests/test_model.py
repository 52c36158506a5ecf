"""model.py on its own: presets, config round trip, cache behaviour. Parity with transformers is in
test_convert.py."""
import pytest
import torch

import cpu
import engine
from checkpoint import load_model
from cli import BriskError
from model import ModelArgs, Transformer, find_preset, transformer_configs
from conftest import TINY, make_checkpoint
from helpers import compiled_steps


@pytest.mark.parametrize("name, preset", [
    ("Llama-2-7b", "Llama-2-7b"),  # exact
    ("meta-llama/Llama-2-7b-chat-hf", "Llama-2-7b"),  # substring, case-insensitive
    ("codellama/CodeLlama-34b-Python-hf", "CodeLlama-34b"),
    ("meta-llama/Llama-3.2-1B-Instruct", "Llama-3.2-1B"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M"),
    # the longest match, Qwen2-0.5B not being a substring
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B"),
    ("JackFram/llama-160m", "llama-160m"),
])
def test_preset_lookup(name, preset):
    assert find_preset(name) == preset


def test_unknown_name_lists_close_names():
    with pytest.raises(BriskError, match="unknown model 'Lama-2-7b'.*Llama-2-7b"):
        find_preset("Lama-2-7b")


def test_every_preset_builds_a_consistent_config():
    for name, preset in transformer_configs.items():
        a = ModelArgs.from_name(name)
        assert a.n_head % a.n_local_heads == 0 and a.head_dim * a.n_head == a.dim, name
        assert ModelArgs.from_dict(a.to_dict()) == a


def test_llama2_7b_shape_matches_published_size():
    with torch.device("meta"):
        m = Transformer.from_name("Llama-2-7b")
    assert sum(p.numel() for p in m.parameters()) == 6_738_415_616


def model_and_full_forward(tmp_path, device="cpu", dtype=torch.float32):
    """A model with caches for 2 x 32 positions, a batch of 20-token prompts and its logits [2, 20,
    V]."""
    model = load_model(make_checkpoint(tmp_path, tokenizer=False), device, dtype)
    model.setup_caches(2, 32)
    idx = torch.randint(0, 320, (2, 20), device=device)
    with torch.no_grad():
        return model, idx, model(idx, torch.arange(20, device=device))


def test_cached_decode_equals_full_forward(tmp_path, device, dtype, tol):
    model, idx, full = model_and_full_forward(tmp_path, device, dtype)
    pos = torch.arange(20, device=device)
    with torch.no_grad():
        # prefill 12, then verify 3, then decode one at a time
        prefix = model(idx[:, :12], pos[:12])
        chunk = model(idx[:, 12:15], pos[12:15])
        steps = [model(idx[:, i:i + 1], pos[i:i + 1]) for i in range(15, 20)]
    atol = 1e-5 if dtype == torch.float32 else tol["atol"]
    torch.testing.assert_close(torch.cat([prefix, chunk, *steps], 1).float(), full.float(),
                               atol=atol, rtol=atol)


@pytest.mark.parametrize("max_seq_length", [144, 4096, 131072])
def test_attend_len_covers_the_written_cache_in_few_sizes(max_seq_length):
    """A compiled step attends to attend_len(pos) positions: all written so far, little more, and so
    few distinct lengths that a CUDA graph per length stays cheap."""
    model = Transformer(ModelArgs(**TINY))
    model.max_seq_length = max_seq_length
    lengths = [model.attend_len(pos) for pos in range(max_seq_length)]
    for pos, n in enumerate(lengths):
        assert pos + 1 <= n <= min(max_seq_length, max(pos + 64, (pos + 1) * 17 // 16))
    assert len(set(lengths)) <= {144: 3, 4096: 64, 131072: 144}[max_seq_length]


def test_no_buffer_grows_with_the_positions_squared():
    """The caches and rotary tables grow with the positions; attention's causal mask is made per
    step for the keys attended, so no table of positions x positions exists (17 GB at Llama-3.1's
    131,072 positions)."""
    S = 16384
    model = Transformer(ModelArgs(**dict(TINY, block_size=S)))
    model.setup_caches(1, S)
    head_dim = TINY["dim"] // TINY["n_head"]
    # a KV cache
    assert max(b.numel() for b in model.buffers()) == TINY["n_local_heads"] * (S + 1) * head_dim
    with torch.no_grad():  # the last position still attends to every key before it
        assert torch.isfinite(model(torch.tensor([[1]]), torch.tensor([S - 1]))).all()


def test_logits_to_keep_computes_the_last_rows_only(tmp_path):
    model, idx, full = model_and_full_forward(tmp_path)
    with torch.no_grad():
        last = model(idx, torch.arange(20), logits_to_keep=1)
        last3 = model(idx, torch.arange(20), logits_to_keep=3)
    assert last.shape == (2, 1, full.shape[-1]) and last3.shape == (2, 3, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last3, full[:, -3:], atol=1e-5, rtol=1e-5)


def test_tied_head_shares_the_embedding(tmp_path):
    model = load_model(make_checkpoint(tmp_path, tokenizer=False, tie_embeddings=True),
                       dtype=torch.float32)
    assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loads_in_each_dtype(tmp_path, dtype):
    model = load_model(make_checkpoint(tmp_path, tokenizer=False, qkv_bias=True), dtype=dtype)
    model.setup_caches(1, 16)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]]), torch.arange(3))
    assert logits.dtype == dtype and logits.shape == (1, 3, 320) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kernel", [True, False])
def test_a_bf16_cache_is_fp32_on_the_cpu_without_the_kernel_and_bf16_elsewhere(tmp_path, device, monkeypatch, kernel):
    """Attention outside brisk's kernel computes in fp32 on the CPU, so there a bf16 model's cache
    is fp32 (a step converts nothing it reads) holding bf16 values: attention sees what a bf16 cache
    would give it. Where the kernel attends (it reads bf16 as exactly those values), and on other
    devices, the cache keeps the model's dtype."""
    if cpu.kernel_isa() == 0 and kernel:
        pytest.skip("the CPU has no AVX2 (or no compiler)")
    monkeypatch.setattr(cpu, "KERNEL_ISA", cpu.kernel_isa() if kernel else 0)
    model = load_model(make_checkpoint(tmp_path, tokenizer=False), device, torch.bfloat16)
    model.setup_caches(1, 16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]], device=device), torch.arange(3, device=device))
    for cache in (model.layers[0].attention.kv_cache.k_cache,
                  model.layers[0].attention.kv_cache.v_cache):
        written = cache[:, :, :3]
        assert cache.dtype == (torch.float32 if device.type == "cpu"
                               and not kernel else torch.bfloat16)
        assert written.abs().sum() > 0 and torch.equal(written, written.bfloat16().to(cache.dtype))


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(BriskError, match="checkpoint not found"):
        load_model(tmp_path / "nope" / "model.pth")
    path = make_checkpoint(tmp_path, tokenizer=False)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BriskError, match="cannot read checkpoint"):
        load_model(path)


# --------------------------------------------------------------------------------------------------
# An int8 KV cache (--kv_cache_dtype int8)


def int8_and_model_dtype_logits(model, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits [B, T, V] of idx prefilled in two chunks, then one position at a time (a decode
    step, the kernel's where the CPU has it), with the model's own KV cache and with an int8 one."""
    logits = []
    for kv_cache_dtype in (None, torch.int8):
        # setup_caches allocates anew
        model.kv_cache_dtype, model.max_seq_length = kv_cache_dtype, -1
        model.setup_caches(idx.shape[0], 64)
        pos = torch.arange(idx.shape[1], device=idx.device)
        with torch.no_grad():
            chunks = [model(idx[:, :20], pos[:20]), model(idx[:, 20:30], pos[20:30])]
            chunks += [model(idx[:, i:i + 1], pos[i:i + 1]) for i in range(30, idx.shape[1])]
        logits.append(torch.cat(chunks, 1).float())
    assert model.layers[0].attention.kv_cache.k_cache.dtype == torch.int8
    return logits[0], logits[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int8_cache_gives_logits_close_to_the_model_dtype_cache(tmp_path, device, dtype):
    """Keys and values rounded to 8 bits per vector (a step of max |x| / 127) move the tiny model's
    logits (~1-5) by 0.02 on average and under 0.15 at most, against an fp32 or a bf16 cache, and
    none of their greedy choices (on the CPU the kernel reads the int8 cache, elsewhere plain torch
    dequantizes it)."""
    model = load_model(make_checkpoint(tmp_path, tokenizer=False), device, dtype)
    idx = torch.randint(0, 320, (2, 36), generator=torch.Generator().manual_seed(0)).to(device)
    want, got = int8_and_model_dtype_logits(model, idx)
    error = (got - want).abs()
    assert 0 < error.mean() < 0.02 and error.max() < 0.15
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_an_int8_cache_takes_about_half_the_memory_of_a_bf16_one_at_131072_positions():
    """Set up on the meta device (sizes without memory) for Llama-3.2-1B's shape: an int8 cache
    holds D + 4 bytes per position and head (its values and an fp32 scale) where bf16 holds 2 D: 68
    / 128 at D 64, 2.1 GiB against 4 GiB (2 x 16 layers x 8 heads x 131,072 positions); nothing else
    that setup allocates grows with S squared."""
    S = 131072
    sizes = []
    for kv_cache_dtype in (None, torch.int8):
        with torch.device("meta"):
            model = Transformer.from_name("Llama-3.2-1B").to(torch.bfloat16)
        model.kv_cache_dtype = kv_cache_dtype
        model.setup_caches(1, S)
        caches = [t for name, t in model.named_buffers() if name.endswith(("k_cache", "v_cache"))]
        others = [t for name, t in model.named_buffers()
                  if not name.endswith(("k_cache", "v_cache"))]
        assert {t.dtype for t in caches} == {kv_cache_dtype or torch.bfloat16}
        assert max(t.numel() for t in others) < 2 * S * 64
        sizes.append(sum(t.numel() * t.element_size() for t in caches))
    c = model.config
    assert c.head_dim == 64 and sizes[0] == 2 * c.n_layer * c.n_local_heads * (S + 1) * 64 * 2 == 4 * 2**30 + 2**15
    assert sizes[1] == sizes[0] * 68 // 128


@pytest.mark.slow
def test_a_compiled_step_reads_an_int8_cache_as_an_eager_one(tmp_path):
    """Compiled (torch.compile: the quantization at update and the dequantization outside the kernel
    in plain torch, fused) greedy tokens and logits are eager's with the int8 cache, prefill
    compiled too."""
    model = load_model(make_checkpoint(tmp_path, tokenizer=False), dtype=torch.float32)
    model.kv_cache_dtype = torch.int8
    model.setup_caches(1, 64)
    prompt = torch.randint(0, 320, (20,), generator=torch.Generator().manual_seed(0))
    eager, _ = engine.generate(model, prompt, 12, temperature=0.0)
    compiled, _ = engine.generate(model, prompt, 12, temperature=0.0,
                                  **compiled_steps(model, compile_prefill=True))
    assert compiled == eager
