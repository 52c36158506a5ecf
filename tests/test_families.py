"""Families beyond Llama (GPT-NeoX, GPT-J, OPT, BLOOM, GPTBigCode, Phi-3, GPT-2) through one
ModelArgs and one block: for each, a tiny random transformers model, saved as a Hugging Face
checkpoint and converted, gives transformers' fp32 logits in a full forward, token by token through
the cache and compiled, and its greedy text through generate.py; quantized, speculative,
prefix-cached and tensor-parallel decoding keep to plain greedy."""
import pytest
import torch
import transformers as tf

import bench
import engine
import eval as brisk_eval
import generate
import quant
import quantize
from checkpoint import load_config, load_model, load_state_dict, save_checkpoint
from conftest import _CORPUS, assert_one_line_error, run_script, write_tiny_tokenizer
from helpers import (add_vocab, byte_level_vocab, check_rows_equal_alone, hf_perplexity, noisy_copy,
                     quantized, run_and_compare, save_bin)
from model import ModelArgs, Transformer, rope_tables
from scripts import convert_hf_checkpoint as convert_hf
from tokenizer import load_tokenizer

V = 320  # the tiny tokenizer's vocabulary
# Phi-3's longrope with a short original context, so that both factor sets and the attention factor
# show in 24 tokens
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0,
                short_factor=[1.0 + i / 8 for i in range(8)],
                long_factor=[1.0 + i for i in range(8)], original_max_position_embeddings=16)

# name: (config class, model class, config, how the weights are saved)
FAMILIES = {
    "pythia": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,
               dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, rotary_pct=0.5,
                    hidden_act="gelu"),
               "safetensors"),
    "redpajama": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,
                  dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       use_parallel_residual=False, hidden_act="gelu"), "bin"),
    "gptj": (tf.GPTJConfig, tf.GPTJForCausalLM, dict(n_embd=64, n_head=4, rotary_dim=8),
             "safetensors-sharded"),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM,
            dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64),
            "bin-sharded-bare"),
    "bloom": (tf.BloomConfig, tf.BloomForCausalLM, dict(hidden_size=96, n_head=6), "safetensors"),
    "starcoder": (tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM,
                  dict(n_embd=64, n_head=4, multi_query=True), "safetensors"),
    "gpt_bigcode-mha": (tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM,
                        dict(n_embd=64, n_head=4, multi_query=False), "safetensors"),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM,
             dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, rope_parameters=LONGROPE, pad_token_id=0), "safetensors"),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_embd=64, n_head=4), "bin-bare"),
}
COMMON = dict(vocab_size=V, num_hidden_layers=2, n_layer=2, max_position_embeddings=64,
              n_positions=64, bos_token_id=1, eos_token_id=2)


# the published sizes, head and tied embedding counted once
@pytest.mark.parametrize("name, n_params", [
    ("pythia-70m", 70_426_624), ("pythia-410m", 405_334_016), ("opt-125m", 125_239_296),
    ("bloom-560m", 559_214_592), ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
    ("Phi-3-mini-4k", 3_821_079_552), ("Phi-3-mini-128k", 3_821_079_552)])
def test_presets_have_the_published_sizes(name, n_params):
    with torch.device("meta"):
        model = Transformer.from_name(name)
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("name, window, n_kv",
                         [("Phi-3-mini-128k", 262144, 32), ("Phi-3-medium-128k", 131072, 10)])
def test_phi3_128k_presets_are_what_their_config_converts_to(name, window, n_kv):
    """The 128k presets hold what the converter makes of such a model's config.json (Phi-3's first
    release, rope type "su", no attention factor given): the whole 131072 context, a factor per
    rotary frequency, the attention factor transformers derives; their rope tables take the long
    factors past the original 4096 positions."""
    preset = ModelArgs.from_name(name + "-instruct")
    rope = preset.rope_scaling
    cfg = dict(architectures=["Phi3ForCausalLM"], hidden_size=preset.dim,
               intermediate_size=preset.intermediate_size,
               num_attention_heads=preset.n_head, num_key_value_heads=n_kv,
               num_hidden_layers=preset.n_layer, max_position_embeddings=131072,
               original_max_position_embeddings=4096, rms_norm_eps=1e-5,
               rope_theta=10000.0, sliding_window=window, vocab_size=32064,
               tie_word_embeddings=False,
               rope_scaling=dict(type="su", short_factor=rope["short_factor"],
                                 long_factor=rope["long_factor"]))
    assert convert_hf.config_from_hf(cfg) == preset
    assert len(rope["long_factor"]) == preset.head_dim // 2 and rope["attention_factor"] == pytest.approx(1.19023807)
    short, long = (rope_tables(8192, preset.rope_dim, 10000.0, rope, context)[0]
                   for context in (4096, 8192))
    assert not torch.equal(short, long)


def hf_model(family: str, seed: int = 0, **overrides):
    """A tiny random transformers model of `family` (its config updated with `overrides`), in
    fp32."""
    config_cls, model_cls, config, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **config, **overrides})).eval()
    # wider than the default init so logits are far from flat; norms random so a swap shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "norm" in name or "ln" in name
            p.normal_(0, 0.15) if p.dim() == 2 else p.uniform_(0.5, 1.5) if norm else p.normal_(0, 0.1)
    return model


def build(directory, family: str, seed: int = 0):
    """A tiny random transformers model of `family`, saved to `directory` with a tiny tokenizer and
    converted."""
    _, model_cls, _, layout = FAMILIES[family]
    model = hf_model(family, seed)
    if layout.startswith("safetensors"):
        model.save_pretrained(directory,
                              max_shard_size="100KB" if layout.endswith("sharded") else "5GB")
    else:  # transformers 5 writes only safetensors; write pytorch_model*.bin as older releases did
        model.config.architectures = [model_cls.__name__]
        model.config.save_pretrained(directory)
        sd = model.state_dict()
        # as older files of GPT-2 and OPT: without the base model's prefix
        if layout.endswith("bare"):
            sd = {k.removeprefix("transformer.").removeprefix("model."): v for k, v in sd.items()}
        save_bin(sd, directory, n_shards=3 if "sharded" in layout else 1, old=False)
    write_tiny_tokenizer(directory, V)
    convert_hf.convert(directory)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (the transformers model, our model.pth), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            cache[family] = build(d, family), d / "model.pth"
        return cache[family]
    return get


def ours(path, max_seq_length: int, batch_size: int = 1):
    model = load_model(path, "cpu", torch.float32)
    model.setup_caches(batch_size, max_seq_length)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_full_and_through_the_cache(converted, family):
    hf, path = converted(family)
    T = 24
    model = ours(path, T, batch_size=2)
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        full = model(idx, torch.arange(T))
        steps = torch.cat([model(idx[:, i:i + 1], torch.tensor([i])) for i in range(T)], dim=1)
    full_err, step_err = (full - ref).abs().max().item(), (steps - ref).abs().max().item()
    print(f"{family}: max |logits - transformers| full {full_err:.2e}, cached {step_err:.2e}")
    assert ref.std() > 0.5  # not flat: a wrong switch moves them well past 1e-4
    assert full_err <= 1e-4 and step_err <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES
                                    if f not in ("redpajama", "gpt_bigcode-mha")])
def test_compiled_decode_matches_transformers(converted, family):
    """A prompt prefilled eagerly, then decode steps compiled as generate.py compiles them (attended
    length and the CPU one-row products included): each step's logits are transformers' at that
    position. (The two variants left out add no switch of their own.)"""
    hf, path = converted(family)
    T, P = 16, 6
    model = ours(path, T)
    idx = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(2))
    step = engine.compile_step(lambda model, x, input_pos,
                               attend_len: model(x, input_pos, attend_len=attend_len),
                               torch.device("cpu"))
    with torch.no_grad():
        ref = hf(idx).logits
        logits = [model(idx[:, :P], torch.arange(P))]
        logits += [step(model, idx[:, i:i + 1], torch.tensor([i]), model.attend_len(i))
                   for i in range(P, T)]
    err = (torch.cat(logits, dim=1) - ref).abs().max().item()
    print(f"{family}: compiled max |logits - transformers| {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_text_through_generate_py_matches_transformers(converted, family, capsys):
    hf, path = converted(family)
    prompt, n = "The quick brown fox", 12
    tok = load_tokenizer(path.parent)
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_ids,
                          pad_token_id=0)[0]
    new = out[ids.shape[1]:].tolist()
    new = new[:new.index(tok.eos_ids[0])] if tok.eos_ids[0] in new else new
    assert len(new) >= 4  # text to compare, not an immediate end
    generate.main(["--checkpoint_path", str(path), "--prompt", prompt, "--max_new_tokens", str(n),
                   "--temperature", "0",
              "--dtype", "float32", "--device", "cpu"])
    assert capsys.readouterr().out == prompt + tok.decode(new) + "\n"


@pytest.mark.parametrize("family, overrides, match", [
    ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32),
     "do_layer_norm_before=False is not supported " "(post-norm OPT such as opt-350m)"),
    ("bloom", dict(apply_residual_connection_post_layernorm=True),
     "apply_residual_connection_post_layernorm=True"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "attention scaled by layer"),
    ("pythia", dict(hidden_act="gelu_10"), "unsupported activation hidden_act='gelu_10'"),
])
def test_what_the_switches_cannot_express_is_refused_in_one_line(tmp_path, family, overrides,
                                                                 match):
    config_cls, model_cls, base, _ = FAMILIES[family]
    config = config_cls(**{**COMMON, **base, **overrides})
    config.architectures = [model_cls.__name__]
    config.save_pretrained(tmp_path)
    assert_one_line_error(run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir",
                                     tmp_path), match)


# --------------------------------------------------------------------------------------------------
# Every feature, every family


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode, groupsize, bound", [("int8", None, 0.08), ("int4", 32, 0.55)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantized_logits_stay_within_the_bound(converted, family, mode, groupsize, bound,
                                                tmp_path):
    # the bounds of test_quantize.py, where an off-by-one zero point or a wrong scale gives about 1
    # or more
    _, path = converted(family)
    how = {"mode": mode, "groupsize": groupsize} if groupsize else {"mode": mode}
    out = tmp_path / "model_q.pth"
    save_checkpoint(quant.quantize_state_dict(load_state_dict(path), load_config(path), how), out)
    (tmp_path / "model_config.json").write_text((path.parent / "model_config.json").read_text())
    idx = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ours(path, 24)(idx, torch.arange(24))
        got = ours(out, 24)(idx, torch.arange(24))
    err = rel_err(got, ref)
    print(f"{family} {mode}: relative logits error {err:.3f}")
    assert err < bound


# partial rotary + parallel, ALiBi, learned
@pytest.mark.parametrize("family", ["pythia", "bloom", "gpt2"])
def test_gptq_beats_round_to_nearest_on_its_calibration_text(converted, family, tmp_path):
    """GPTQ feeds its blocks what the model's forward feeds them, whatever the family's
    positions."""
    import shutil
    _, src = converted(family)
    shutil.copytree(src.parent, tmp_path / family)
    path = tmp_path / family / "model.pth"
    calib = tmp_path / "calib.txt"
    calib.write_text(quant.pydoc_text(0)[:6000])
    quantize.main(["--checkpoint_path", str(path), "--mode", "int4", "--groupsize", "32"])
    quantize.main(["--checkpoint_path", str(path), "--mode", "int4-gptq", "--groupsize", "32",
                   "--calibration_file", str(calib), "--calibration_samples", "8",
                   "--calibration_seq_length", "32"])
    samples = quant.calibration_samples(path.parent, calib.read_text(), 8, 32)
    with torch.no_grad():
        def logits(p):
            model = ours(p, 32)
            return torch.cat([model(s[None], torch.arange(32)) for s in samples])
        reference = logits(path)
        errors = [rel_err(logits(path.with_name(name)), reference)
                  for name in ("model_int4-gptq.g32.pth", "model_int4.g32.pth")]
    print(f"{family}: GPTQ {errors[0]:.3f}, round to nearest {errors[1]:.3f}")
    assert errors[0] < 0.9 * errors[1]


def generate_text(path, *flags) -> str:
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate.main(["--checkpoint_path", str(path), "--prompt", "Once upon a time",
                       "--max_new_tokens", "16",
                  "--temperature", "0", "--dtype", "float32", "--device", "cpu", *map(str, flags)])
    return out.getvalue()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_speculative_decoding_with_a_draft_of_the_family_equals_plain_greedy(converted, family, tmp_path):
    _, path = converted(family)
    draft = noisy_copy(path, tmp_path / "draft", noise=0.02)
    assert generate_text(path, "--draft_checkpoint_path", draft, "--speculate_k",
                         3) == generate_text(path)


# ALiBi's per-row bias; partial rotary, parallel residual
@pytest.mark.parametrize("family", ["bloom", "pythia"])
def test_rows_of_a_batch_give_the_logits_of_each_prompt_alone(converted, family):
    check_rows_equal_alone(load_model(converted(family)[1], dtype=torch.float32), compile=False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_reused_prefix_in_the_cache_gives_the_fresh_result(converted, family):
    _, path = converted(family)
    prompt = [5, 17, 42, 99, 7, 250, 3]
    first, _ = engine.generate(ours(path, 48), torch.tensor(prompt), 6, temperature=0.0)
    model = ours(path, 48)
    engine.generate(model, torch.tensor(prompt), 6, temperature=0.0)
    second = prompt + first[0][:-1] + [11, 12, 13]  # the cache holds prompt + first[:-1]
    reused, _ = engine.generate(model, torch.tensor(second), 8, temperature=0.0,
                                start_pos=len(prompt) + 5)
    fresh, _ = engine.generate(ours(path, 48), torch.tensor(second), 8, temperature=0.0)
    assert reused == fresh


def test_two_processes_match_one_for_every_family(converted, tmp_path):
    """One torchrun of 2 gloo ranks: each family split (ALiBi slopes with their heads, a multi-query
    key/value head kept whole by both ranks, row-wise biases added once), int8 and int4 too for two
    of them."""
    paths = [converted(f)[1] for f in FAMILIES]
    paths += [quantized(converted(f)[1], q) for f in ("bloom", "starcoder")
              for q in ({"mode": "int8"}, {"mode": "int4", "groupsize": 32})]
    bloom = converted("bloom")[1].parent
    # its width 96 splits into 48 inputs per rank, not whole blocks
    assert run_and_compare(2, tmp_path, paths) == {
        bloom / "model_int4.g32.pth": "cannot split int4 group size 32 across 2 processes: attention.wo would have "
                                      "48 inputs per process",
        bloom / "model_int8.pth": "cannot split int8 activations' blocks of 32 across 2 processes: attention.wo "
                                  "would have 48 inputs per process"}


# --------------------------------------------------------------------------------------------------
# GGUF files of the families transformers can load as the oracle (llama.cpp's bloom, gpt2 and phi3)


def write_family_gguf(path, family: str, hf, qtype=None) -> None:
    """hf's weights and config as llama.cpp's convert_hf_to_gguf.py writes them: names mapped by the
    gguf package; bloom's per-head q/k/v reordered to q, k, v; gpt2's Conv1D weights transposed to
    [out, in]."""
    import gguf

    c, n_layer = hf.config, hf.config.num_hidden_layers
    w = gguf.GGUFWriter(str(path), family)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.upper()), n_layer)
    w.add_block_count(n_layer)
    w.add_context_length(c.n_positions if family == "gpt2" else c.max_position_embeddings
                         if family == "phi3" else 64)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size if family == "phi3" else 4 * c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    if family == "phi3":
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    else:
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    add_vocab(w, byte_level_vocab(path.parent / "bpe"))
    w.add_pad_token_id(0)  # else transformers gives phi3 its default, 32000, beyond this vocabulary
    D = c.hidden_size // c.num_attention_heads
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = t.float()
        if family == "bloom" and "query_key_value" in name:
            data = data.reshape(c.num_attention_heads, 3, D, *data.shape[1:]).transpose(0, 1).reshape(data.shape)
        if family == "gpt2" and data.dim() == 2 and ".h." in name:
            data = data.t()
        data = data.contiguous().numpy()
        key = names.get_name(name, try_suffixes=(".weight", ".bias")) or names.get_name(
            name.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
        if qtype is not None and data.ndim == 2:
            w.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(key, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", ["bloom", "gpt2", "phi3"])
def test_gguf_of_the_family_gives_transformers_logits(family, tmp_path):
    """An F32 GGUF gives the source model's logits; a Q8_0 one gives what transformers makes of the
    same file."""
    import gguf

    from scripts import convert_gguf
    # transformers reads no position count from a gpt2 GGUF (its 1024 then), nor phi3's longrope
    # factors
    overrides = dict(gpt2=dict(n_positions=1024, max_position_embeddings=1024),
                     phi3=dict(rope_parameters=dict(rope_type="default")))
    hf = hf_model(family, **overrides.get(family, {}))
    ids = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(4))
    for qtype, name in ((None, "f32.gguf"), (gguf.GGMLQuantizationType.Q8_0, "q8.gguf")):
        write_family_gguf(tmp_path / name, family, hf, qtype)
        out = tmp_path / name.replace(".gguf", "")
        convert_gguf.main([str(tmp_path / name), "--checkpoint_dir", str(out)])
        ref = hf if qtype is None else tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name,
                                                                             dtype=torch.float32).eval()
        with torch.no_grad():
            got = ours(out / "model.pth", 24)(ids, torch.arange(24))
            err, quant_err = [(got - m(ids).logits).abs().max().item() for m in (ref, hf)]
        print(f"{family} {name}: max |logits - reference| {err:.2e}, - source {quant_err:.2e}")
        assert err <= 1e-4
        # really quantized: not the source's logits
        assert (quant_err > 1e-4) == (qtype is not None)


# --------------------------------------------------------------------------------------------------
# Tokenizers: GPT-2-style vocab.json + merges.txt without a tokenizer.json (OPT, older GPT-2 repos)

STRINGS = ["Hello, my name is", "one<|endoftext|>two", " leading space and  two",
           "line one\nline two\n\n", "Grüße aus München — 東京 🙂",
           "</s>special inside</s> text", "def f(x):\n    return x  # comment", ""]
BPE_CONFIGS = {  # OPT prepends </s> (its BOS); GPT-2 prepends nothing
    "opt": dict(tokenizer_class="GPT2Tokenizer", bos_token="</s>", eos_token="</s>",
                unk_token="</s>", pad_token="<pad>", add_bos_token=True),
    "gpt2": dict(tokenizer_class="GPT2Tokenizer", bos_token="<|endoftext|>",
                 eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
    "gpt2-defaults": {},  # no tokenizer_config.json entries: GPT2Tokenizer's <|endoftext|> for all three
}


@pytest.mark.parametrize("name", list(BPE_CONFIGS))
def test_vocab_and_merges_tokenizer_matches_transformers(tmp_path, name):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400,
                                  special_tokens=["<s>", "<pad>", "</s>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 8, trainer)
    tok.model.save(str(tmp_path))  # vocab.json and merges.txt
    config = BPE_CONFIGS[name] or {"tokenizer_class": "GPT2Tokenizer"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref, ours_tok = tf.AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    for text in STRINGS:
        ids = ref(text)["input_ids"]
        assert ours_tok.encode(text) == ids, text
        assert ours_tok.decode(ids) == ref.decode(ids), text
    assert (ours_tok.encode("a")[0] == 2) == (name == "opt")
    assert ours_tok.token_id("<|endoftext|>") == 3 and (name != "opt") == (ours_tok.eos_ids == [3])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eval_gives_transformers_perplexity_and_bench_times_every_family(converted, family, tmp_path, capsys):
    hf, path = converted(family)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 3)
    ids = load_tokenizer(path.parent).encode(text.read_text())
    report = brisk_eval.main(["--checkpoint_path", str(path), "--dtype", "float32", "--text_file",
                              str(text), "--max_seq_length", "24", "--stride", "10"])
    assert report["perplexity"]["perplexity"] == pytest.approx(hf_perplexity(hf, ids, 24, 10),
                                                               rel=1e-4)
    bench.main(["--checkpoint_path", str(path), "--input-tokens", "4", "--max-new-tokens", "3",
                "--num-iter", "1", "--warmup", "0", "--copy_gib", "0.05"])
    assert "| brisk | model.pth | bfloat16 |" in capsys.readouterr().out
