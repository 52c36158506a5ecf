"""Rows of different prompts in one batch: each row's logits are those of its prompt run alone,
whatever joins or leaves the batch (bitwise eagerly, in fp32 and bf16; compiled, bitwise where bf16
takes brisk's kernel, else within rounding, since Inductor orders a graph's reductions by its
shapes: a near tie can go the other way); beam search as transformers does it."""
import pytest
import torch

import cpu
import engine
import generate as gen
from batch import Batch, beam_search, generate_rows, rows_step
from conftest import TOLERANCE, make_checkpoint
from helpers import alone, check_rows_equal_alone, make_hf_model, prompts
from checkpoint import load_model
from cli import BriskError

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("batch") / "tiny")


@pytest.mark.parametrize("dtype, kv_cache_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                   (torch.bfloat16, torch.int8)])
def test_rows_joining_and_leaving_give_the_logits_of_each_prompt_alone(tiny, dtype, kv_cache_dtype):
    """In the model's dtype or an int8 KV cache (--kv_cache_dtype int8)."""
    model = load_model(tiny, dtype=dtype)
    model.kv_cache_dtype = kv_cache_dtype
    check_rows_equal_alone(model, compile=False)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_rows_give_the_logits_of_each_prompt_alone(tiny, dtype):
    check_rows_equal_alone(load_model(tiny, dtype=dtype), compile=True)


@pytest.mark.slow
@pytest.mark.skipif(cpu.kernel_isa() == 0, reason="the CPU has no AVX2 (or no compiler)")
@pytest.mark.parametrize("alone_in_batch", [False, True])
def test_compiled_bf16_rows_with_the_kernel_are_bitwise_their_prompt_alone(tiny, alone_in_batch):
    """Where brisk's kernel computes every product, a row's logits are bitwise its prompt's alone,
    in a one-row cache (generate.py's one-prompt path) or alone in the batch (a lone row steps
    beside a spare one: one graph for every count of rows): each row is reduced alike whatever the
    graph, and Inductor keeps eager's bf16 roundings (cpu.INDUCTOR_OPTIONS), which it would drop
    inside a fusion, differently per graph shape."""
    model = load_model(tiny, dtype=torch.bfloat16)
    assert cpu.two_rows_cost_one(model)
    check_rows_equal_alone(model, compile=True, alone_in_batch=alone_in_batch)


@pytest.mark.slow
def test_compiled_batch_is_two_graphs_for_every_mix_of_rows(tiny):
    """One graph steps one row, one every other count of rows, at every attended length."""
    model = load_model(tiny, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        check_rows_equal_alone(model, compile=True, n_steps=4)
        batch = Batch(model, 4, 512, compile=True)
        rows = [batch.add([1, 2, 3] * k) for k in (1, 30, 60, 100)]
        for feed in ({0: 1, 2: 3}, {0: 1}, dict.fromkeys(rows, 1)):  # 3 rows, then 1, then 4
            for _ in range(70):  # over several attended lengths
                batch.step(feed)


def test_a_step_runs_the_rows_up_to_the_highest_one_fed(tiny):
    """Rows above the highest row fed cost nothing: a lone request decodes as fast as a batch of
    one."""
    model = load_model(tiny, dtype=torch.float32)
    batch = Batch(model, 4, 64)
    seen = []
    batch.step_fn = lambda model, x, pos, attend_len: seen.append(x.shape[0]) or rows_step(model, x, pos, attend_len)
    for ids in prompts(model.config.vocab_size, (3, 4, 5)):
        batch.add(ids)
    batch.step({0: 1})
    batch.step({0: 1, 1: 1})
    batch.remove(1)
    batch.step({2: 1})
    assert seen == [1, 2, 3] and batch.pos == {0: 5, 2: 6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_prefilled_in_chunks_between_steps_has_the_logits_of_one_prefilled_at_once(tiny, dtype):
    """Chunked prefill (serve.py's --prefill_chunk): a 70-token prompt goes into row 0 16 positions
    at a time while row 1 steps between the chunks (row 0 running at the spare position). The
    prompt's logits, and those after each token fed after it, are the prompt's prefilled at once
    within the dtype's rounding, not bitwise: a chunk's products and attention (SDPA with a mask
    instead of causal) have other shapes, so other roundings. Row 1's stay bitwise its prompt's
    alone."""
    model = load_model(tiny, dtype=dtype)
    short, long = prompts(model.config.vocab_size, (9, 70))
    batch = Batch(model, 2, 128)
    a = batch.add(short, row=1)
    got_a = [batch.last_logits(a)]

    def step_a():
        got_a.append(batch.step({a: int(got_a[-1].argmax())})[a])
    b = batch.add(long, n=16)
    chunks = [batch.pos[b]]
    step_a()
    while not batch.fill(b, long, 16):
        chunks.append(batch.pos[b])
        step_a()
    chunks.append(batch.pos[b])
    assert (b, chunks, len(got_a)) == (0, [16, 32, 48, 64, 70], 5)
    got_b = [batch.last_logits(b)]
    for _ in range(6):
        out = batch.step({a: int(got_a[-1].argmax()), b: int(got_b[-1].argmax())})
        got_a.append(out[a])
        got_b.append(out[b])
    for ids, got, tol in ((short, got_a, 0), (long, got_b, TOLERANCE[dtype])):
        want = alone(model, ids, [int(x.argmax()) for x in got[:-1]], rows_step)
        for j, (w, g) in enumerate(zip(want, got)):
            assert torch.allclose(w, g, atol=tol, rtol=0), f"{len(ids)} tokens, step {j}: {(w - g).abs().max()}"


def test_a_verify_pass_gives_the_logits_of_the_decode_steps_it_stands_for(tiny):
    """Speculative decoding's verify pass (k + 1 positions of one row) in bf16: each position's
    logits are bitwise those of a decode step, so greedy speculation is exact in any dtype. Eagerly
    only: compiled, Inductor reduces a verify pass's norms or attention in another order than a
    one-position step's (not yet exact)."""
    model = load_model(tiny, dtype=torch.bfloat16)
    model.setup_caches(1, 128)
    step = lambda model, x, input_pos, attend_len=None: model(x, input_pos,
                                                              attend_len=attend_len).float()
    ids = prompts(model.config.vocab_size)[2]  # 40 tokens
    tokens = torch.tensor([[5, 77, 123, 9, 200, 31]])
    T, n = len(ids), tokens.shape[1]
    with torch.no_grad():
        model(torch.tensor([ids]), torch.arange(T))
        verify = step(model, tokens, torch.arange(T, T + n),
                      attend_len=model.attend_len(T + n - 1))[0]
        for i in range(n):
            one = step(model, tokens[:, i:i + 1], torch.tensor([T + i]),
                       attend_len=model.attend_len(T + i))[0, 0]
            assert torch.equal(verify[i], one), f"position {i}: max diff {(verify[i] - one).abs().max()}"


def test_generate_rows_equals_generate_alone_and_stops_each_row(tiny):
    model = load_model(tiny, dtype=torch.bfloat16)
    ps = prompts(model.config.vocab_size)
    want = []
    for p in ps:
        model.setup_caches(1, 128)
        want.append(engine.generate(model, torch.tensor(p), 15, temperature=0.0)[0][0])
    eos = want[1][4]  # the second prompt stops at its fifth token (and any other row at that token)
    expect = [w[:w.index(eos) + 1] if eos in w else w for w in want]
    got, _ = generate_rows(Batch(model, 2, 128), ps, 15, eos_ids={eos}, temperature=0.0)
    assert got == expect and len(got[1]) == 5


def test_beams_reorder_the_cache_in_place(tiny):
    model = load_model(tiny, dtype=torch.float32)
    batch = Batch(model, 3, 64)
    row = batch.add([1, 2, 3])
    copy = batch.fork(row)
    cache = model.layers[0].attention.kv_cache.k_cache
    ptr = cache.data_ptr()
    assert torch.equal(cache[row, :, :3], cache[copy, :, :3])
    batch.step({row: 4, copy: 5})
    before = cache[copy, :, 3].clone()
    batch.reorder({row: copy, copy: row}, start=3)
    assert torch.equal(cache[row, :, 3], before) and cache.data_ptr() == ptr


@pytest.mark.skipif(cpu.kernel_isa() == 0, reason="the CPU has no AVX2 (or no compiler)")
def test_a_fork_reads_its_prompt_from_the_row_it_was_forked_from_until_that_row_leaves(tiny):
    """Batch.fork notes that the new row's first positions are the old row's (model.KVCache.prefix):
    brisk's kernel reads them there, once for all beams (the fork's own copy, spoiled here, is not
    read); once the old row leaves, the fork reads its own again."""
    model = load_model(tiny, dtype=torch.bfloat16)
    batch = Batch(model, 3, 64)
    row = batch.add(list(range(1, 20)))
    fork, intact = batch.fork(row), batch.fork(row)
    cache = model.layers[0].attention.kv_cache
    assert cache.prefix[fork].tolist() == [row - fork, 19]
    for layer in model.layers:
        layer.attention.kv_cache.k_cache[fork, :, :19] = 0
    out = batch.step({row: 4, fork: 4, intact: 4})
    assert torch.equal(out[row], out[fork]) and torch.equal(out[row], out[intact])
    batch.remove(row)
    assert cache.prefix[fork].tolist() == [0, 0]
    out = batch.step({fork: 5, intact: 5})
    assert not torch.equal(out[fork], out[intact])


def test_cli_prints_each_prompt_as_run_alone_in_prompt_order(tiny, tmp_path, capsys):
    flags = ["--checkpoint_path", str(tiny), "--temperature", "0", "--max_new_tokens", "12"]
    texts = ["Hello", "The quick brown fox jumps", "Once upon a time there was"]
    (tmp_path / "prompts.txt").write_text("\n".join(texts[1:]) + "\n")
    gen.main([*flags, "--prompt", texts[0], "--prompts_file", str(tmp_path / "prompts.txt"),
              "--batch_size", "2"])
    out = capsys.readouterr()
    assert "3 prompts, 2 rows at once, 36 tokens" in out.err
    want = []
    for text in texts:
        gen.main([*flags, "--prompt", text])
        want.append(capsys.readouterr().out)
    assert out.out == "".join(want)


def test_an_empty_line_in_the_prompts_file_is_refused(tiny, tmp_path):
    (tmp_path / "prompts.txt").write_text("one\n\nthree\n")
    with pytest.raises(BriskError, match="prompts.txt: line 2 is empty"):
        gen.main(["--checkpoint_path", str(tiny), "--prompts_file", str(tmp_path / "prompts.txt")])


# --------------------------------------------------------------------------------------------------
# Beam search against transformers

BEAM_CASES = [  # num_beams, length_penalty, early_stopping, num_return_sequences
    (4, 1.0, False, 4), (3, 0.5, True, 2), (4, -1.0, "never", 1), (2, 2.0, "never", 2)]


def hf_beams(hf, ids, n_new, nb, lp, es, nret, eos):
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      num_beams=nb, do_sample=False, max_new_tokens=n_new, length_penalty=lp,
                      early_stopping=es, num_return_sequences=nret,
                      eos_token_id=sorted(eos) or None, pad_token_id=0,
                      output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, len(ids):].tolist(), out.sequences_scores.tolist()


def check_beams(ours, hf, ids, n_new, eos_from_greedy: bool):
    ours.setup_caches(1, len(ids) + n_new)
    greedy = engine.generate(ours, torch.tensor(ids), n_new, temperature=0.0)[0][0]
    # tokens that do occur: hypotheses finish early
    eos = {greedy[2], greedy[5]} if eos_from_greedy else set()
    for nb, lp, es, nret in BEAM_CASES:
        mine = beam_search(Batch(ours, nb, len(ids) + n_new), ids, n_new, nb, lp, es, nret, eos)
        seqs, scores = hf_beams(hf, ids, n_new, nb, lp, es, nret, eos)
        for (tokens, score), seq, hf_score in zip(mine, seqs, scores):
            # padding
            assert tokens == seq[:len(tokens)] and set(seq[len(tokens):]) <= {0, *eos}, (nb, lp, es)
            assert score == pytest.approx(hf_score, rel=1e-5, abs=1e-4)
        assert len(mine) == nret


@pytest.mark.parametrize("family", ["llama2-mha", "llama3-gqa", "qwen2-bias-tied"])
@pytest.mark.parametrize("eos", [False, True])
def test_beam_search_gives_transformers_sequences(tmp_path, family, eos):
    from scripts import convert_hf_checkpoint as convert_hf
    hf = make_hf_model(tmp_path, family)
    convert_hf.convert(tmp_path)
    ours = load_model(tmp_path / "model.pth", dtype=torch.float32)
    check_beams(ours, hf, prompts(256, [7])[0], 12, eos)


def llama_from_ours(ours):
    """transformers' Llama with our model's weights (a Llama-family config without rope scaling or
    biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = ours.config
    hf = LlamaForCausalLM(LlamaConfig(
        hidden_size=c.dim, intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_local_heads, head_dim=c.head_dim,
        vocab_size=c.vocab_size, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_base, tie_word_embeddings=c.tie_embeddings)).eval()
    sd = {"model.embed_tokens.weight": ours.tok_embeddings.weight,
          "model.norm.weight": ours.norm.weight, "lm_head.weight": ours.output.weight}
    for i, layer in enumerate(ours.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.attention.wqkv.weight.split([c.n_head * c.head_dim,
                                                     *[c.n_local_heads * c.head_dim] * 2])
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v,
                   p + "self_attn.o_proj.weight": layer.attention.wo.weight,
                   p + "mlp.gate_proj.weight": layer.feed_forward.w1.weight,
                   p + "mlp.up_proj.weight": layer.feed_forward.w3.weight,
                   p + "mlp.down_proj.weight": layer.feed_forward.w2.weight,
                   p + "input_layernorm.weight": layer.attention_norm.weight,
                   p + "post_attention_layernorm.weight": layer.ffn_norm.weight})
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return hf


@pytest.mark.slow
def test_beam_search_on_smollm2_gives_transformers_sequences(real_checkpoint):
    from tokenizer import load_tokenizer
    ours = load_model(real_checkpoint, dtype=torch.float32)
    ids = load_tokenizer(real_checkpoint.parent).encode("The capital of France is")
    check_beams(ours, llama_from_ours(ours), ids, 16, eos_from_greedy=True)
