"""Families beyond Llama (GPT-NeoX, GPT-J, OPT, BLOOM, GPTBigCode, Phi-3, GPT-2) through one ModelArgs and one block:
for each, a tiny random transformers model, saved as a Hugging Face checkpoint and converted, gives transformers'
fp32 logits in a full forward, token by token through the cache and compiled, and its greedy text through
generate.py; quantized, speculative, prefix-cached and tensor-parallel decoding keep to plain greedy."""
import pytest
import torch
import transformers as tf

import generate as gen
from conftest import write_tiny_tokenizer
from model import load_model
from scripts import convert_hf_checkpoint as convert_hf
from tokenizer import load_tokenizer

V = 320  # the tiny tokenizer's vocabulary
# Phi-3's longrope with a short original context, so that both factor sets and the attention factor show in 24 tokens
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + i / 8 for i in range(8)],
                long_factor=[1.0 + i for i in range(8)], original_max_position_embeddings=16)

# name: (config class, model class, config, how the weights are saved)
FAMILIES = {
    "pythia": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,
               dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, rotary_pct=0.5, hidden_act="gelu"),
               "safetensors"),
    "redpajama": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,
                  dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, use_parallel_residual=False,
                       hidden_act="gelu"), "bin"),
    "gptj": (tf.GPTJConfig, tf.GPTJForCausalLM, dict(n_embd=64, n_head=4, rotary_dim=8), "safetensors-sharded"),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM,
            dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64), "bin-sharded"),
    "bloom": (tf.BloomConfig, tf.BloomForCausalLM, dict(hidden_size=96, n_head=6), "safetensors"),
    "starcoder": (tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM, dict(n_embd=64, n_head=4, multi_query=True),
                  "safetensors"),
    "gpt_bigcode-mha": (tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM, dict(n_embd=64, n_head=4, multi_query=False),
                        "safetensors"),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM,
             dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  rope_parameters=LONGROPE, pad_token_id=0), "safetensors"),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_embd=64, n_head=4), "safetensors"),
}
COMMON = dict(vocab_size=V, num_hidden_layers=2, n_layer=2, max_position_embeddings=64, n_positions=64,
              bos_token_id=1, eos_token_id=2)


def build(directory, family: str, seed: int = 0):
    """A tiny random transformers model of `family`, saved to `directory` with a tiny tokenizer and converted."""
    from test_convert import save_bin
    config_cls, model_cls, overrides, layout = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **overrides})).eval()
    with torch.no_grad():  # wider than the default init so logits are far from flat; norms random so a swap shows
        for name, p in model.named_parameters():
            p.normal_(0, 0.15) if p.dim() == 2 else (p.uniform_(0.5, 1.5) if "norm" in name or "ln" in name
                                                      else p.normal_(0, 0.1))
    if layout.startswith("safetensors"):
        model.save_pretrained(directory, max_shard_size="100KB" if layout.endswith("sharded") else "5GB")
    else:  # transformers 5 writes only safetensors; write pytorch_model*.bin as older releases did
        model.config.architectures = [model_cls.__name__]
        model.config.save_pretrained(directory)
        save_bin(model.state_dict(), directory, n_shards=3 if layout == "bin-sharded" else 1, old=False)
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
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("redpajama", "gpt_bigcode-mha")])
def test_compiled_decode_matches_transformers(converted, family):
    """A prompt prefilled eagerly, then decode steps compiled as generate.py compiles them (attended length and
    the CPU one-row products included): each step's logits are transformers' at that position. (The two
    variants left out add no switch of their own.)"""
    hf, path = converted(family)
    T, P = 16, 6
    model = ours(path, T)
    idx = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(2))
    step = gen.compile_step(lambda model, x, input_pos, kv_len: model(x, input_pos, kv_len=kv_len),
                            torch.device("cpu"))
    with torch.no_grad():
        ref = hf(idx).logits
        logits = [model(idx[:, :P], torch.arange(P))]
        logits += [step(model, idx[:, i:i + 1], torch.tensor([i]), model.attend_len(i)) for i in range(P, T)]
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
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_ids, pad_token_id=0)[0]
    new = out[ids.shape[1]:].tolist()
    new = new[:new.index(tok.eos_ids[0])] if tok.eos_ids[0] in new else new
    assert len(new) >= 4  # text to compare, not an immediate end
    gen.main(["--checkpoint_path", str(path), "--prompt", prompt, "--max_new_tokens", str(n), "--temperature", "0",
              "--dtype", "float32", "--device", "cpu"])
    assert capsys.readouterr().out == prompt + tok.decode(new) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers: GPT-2-style vocab.json + merges.txt without a tokenizer.json (OPT, older GPT-2 repos)

STRINGS = ["Hello, my name is", " leading space and  two", "line one\nline two\n\n", "Grüße aus München — 東京 🙂",
           "</s>special inside</s> text", "def f(x):\n    return x  # comment", ""]
BPE_CONFIGS = {  # OPT prepends </s> (its BOS); GPT-2 prepends nothing
    "opt": dict(tokenizer_class="GPT2Tokenizer", bos_token="</s>", eos_token="</s>", unk_token="</s>",
                pad_token="<pad>", add_bos_token=True),
    "gpt2": dict(tokenizer_class="GPT2Tokenizer", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                 unk_token="<|endoftext|>"),
}


@pytest.mark.parametrize("name", list(BPE_CONFIGS))
def test_vocab_and_merges_tokenizer_matches_transformers(tmp_path, name):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from conftest import _CORPUS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 8, trainer)
    tok.model.save(str(tmp_path))  # vocab.json and merges.txt
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(BPE_CONFIGS[name]))
    ref, ours_tok = tf.AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    for text in STRINGS:
        ids = ref(text)["input_ids"]
        assert ours_tok.encode(text) == ids, text
        assert ours_tok.decode(ids) == ref.decode(ids), text
    assert (ours_tok.encode("a")[0] == 2) == (name == "opt")
    assert ours_tok.eos_ids == [ref.eos_token_id]
