"""tokenizer.py against transformers on the same files: a byte-level BPE tokenizer.json, a
SentencePiece model, a Llama 3 tiktoken rank file and the real SmolLM2 tokenizer. Also chat
templates and streaming decode."""
import base64
import json

import pytest

from conftest import _CORPUS, CHATML, write_tiny_tokenizer
from cli import BriskError
from tokenizer import LLAMA2_TEMPLATE, LLAMA3_PATTERN, LLAMA3_SPECIALS, load_tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus München — naïve café, 東京",
    "emoji 🙂🚀 and a family 👩‍👩‍👧 and a flag 🇫🇷",
    "tabs\tand\nnewlines\n\n\nand  runs   of    spaces",
    "trailing spaces   ",
    "a\r\nwindows line",
    "numbers 0123456789 and 3.14159",
    "don't I'LL we've",
    "def f(x):\n    return x * 2\n",
    "",
]
LEADING_SPACE = ["  two leading spaces", " ", "\n starts with a newline"]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! Ça va? 🙂"},
    {"role": "assistant", "content": "Fine."},
    {"role": "user", "content": "Count to three."},
]


def stream(tok, ids) -> list:
    decoder = tok.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


# --------------------------------------------------------------------------------------------------
# Byte-level BPE tokenizer.json (the tiny one the other tests use)

@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    write_tiny_tokenizer(directory)
    return directory


def test_bpe_matches_transformers(bpe_dir):
    from transformers import AutoTokenizer

    ref, tok = AutoTokenizer.from_pretrained(bpe_dir), load_tokenizer(bpe_dir)
    texts = TEXTS + LEADING_SPACE + ["<|im_start|>user\nhi<|im_end|>\n", "x<|endoftext|>y"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids) == text
    # special-token text is the special token
    assert tok.encode("<|im_end|>") == [tok.token_id("<|im_end|>")]
    assert (tok.bos_id, tok.add_bos, tok.vocab_size) == (ref.bos_token_id, False, len(ref))
    assert tok.eos_ids == [ref.eos_token_id]


def test_bpe_chat_template_matches_transformers(bpe_dir):
    from transformers import AutoTokenizer

    ref, tok = AutoTokenizer.from_pretrained(bpe_dir), load_tokenizer(bpe_dir)
    assert tok.chat_template == CHATML
    for gen in (True, False):
        text = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False)
        expected = ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True,
                                           return_dict=True)
        assert tok.encode_chat(MESSAGES, add_generation_prompt=gen) == expected["input_ids"]
    assert text.endswith("<|im_start|>user\nCount to three.<|im_end|>\n")


def test_bpe_streaming_is_byte_exact(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)  # emoji split over byte tokens wait for their last byte
    # a lone first byte of a 4-byte character is held back until flush
    decoder = tok.stream_decoder()
    first_byte = tok.encode("🚀")[0]
    assert decoder.push(first_byte) == "" and decoder.flush() == "\ufffd"


# --------------------------------------------------------------------------------------------------
# SentencePiece tokenizer.model (Llama 2 style, with byte fallback)

@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(  # Llama 2's trainer settings, tiny
        sentence_iterator=iter(_CORPUS * 8), model_prefix=str(directory / "tokenizer"),
        vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=0.995,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        minloglevel=2)
    config = dict(tokenizer_class="LlamaTokenizer", bos_token={"content": "<s>", "special": True},
                  eos_token={"content": "</s>", "special": True}, unk_token="<unk>",
                  add_bos_token=True, chat_template=LLAMA2_TEMPLATE)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def llama_reference(directory):
    """transformers' LlamaTokenizer over the SentencePiece vocabulary. AutoTokenizer builds this
    from tokenizer.model, but needs protobuf to read the file, so the vocabulary is handed over
    directly. `legacy` gives each text piece between special tokens its dummy-prefix space, as
    Llama's own tokenizer.json does."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ref = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True,
                         legacy=True)
    ref.chat_template = LLAMA2_TEMPLATE
    return sp, ref


def test_sentencepiece_matches_transformers(sp_dir):
    sp, ref = llama_reference(sp_dir)
    tok = load_tokenizer(sp_dir)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, [2], True, 400)
    for text in TEXTS + ["<s>[INST] hi [/INST] ok </s>", "x<s>y</s>z"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids), text
        if "<" not in text:  # plain text: SentencePiece itself, and a lossless round trip
            assert ids == [1] + sp.encode(text)
            assert tok.decode(ids[1:]) == sp.decode(ids[1:]) == text


def test_sentencepiece_leading_whitespace_follows_sentencepiece(sp_dir):
    # SentencePiece always adds its dummy-prefix space; transformers' Metaspace skips it when the
    # text (or the text after a special token) already starts with a space. The model was trained on
    # SentencePiece's pieces, and llama.cpp does the same, so we follow SentencePiece.
    sp, _ = llama_reference(sp_dir)
    tok = load_tokenizer(sp_dir)
    for text in LEADING_SPACE:
        assert tok.encode(text, bos=False) == sp.encode(text)
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text
    assert tok.encode("</s> x", bos=False) == [2] + sp.encode(" x")


def test_sentencepiece_chat_template_matches_transformers(sp_dir):
    _, ref = llama_reference(sp_dir)
    tok = load_tokenizer(sp_dir)
    messages = [m for m in MESSAGES if m["role"] != "assistant"][:2]
    text = tok.apply_chat_template(messages)
    assert text == ref.apply_chat_template(messages, tokenize=False)
    assert text == "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! Ça va? 🙂 [/INST]"
    ids = tok.encode_chat(messages)
    assert ids[:2] != [1, 1] and ids == ref.apply_chat_template(messages, tokenize=True,
                                                                return_dict=True)["input_ids"]
    with pytest.raises(BriskError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"},
                                 {"role": "user", "content": "b"}])


def test_sentencepiece_streaming_keeps_spaces(sp_dir):
    tok = load_tokenizer(sp_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), text
        assert not any("\ufffd" in p for p in pieces)
    pieces = stream(tok, tok.encode("Hello world", bos=False))
    # "▁w..." keeps its space
    assert "".join(pieces) == "Hello world" and any(p.startswith(" ") for p in pieces)


# --------------------------------------------------------------------------------------------------
# Llama 3 tiktoken rank file

@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory):
    from tiktoken._educational import bpe_train

    directory = tmp_path_factory.mktemp("llama3")
    ranks = bpe_train("".join(_CORPUS * 4), 400, LLAMA3_PATTERN, visualise=None)
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()]
    (directory / "tokenizer.model").write_text("".join(lines))
    return directory


def test_tiktoken_matches_transformers(tiktoken_dir):
    # transformers converts Llama 3's tokenizer.model into a tokenizers BPE with the same specials
    # after the ranks
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ref = TikTokenConverter(str(tiktoken_dir / "tokenizer.model"),
                            extra_special_tokens=LLAMA3_SPECIALS).converted()
    tok = load_tokenizer(tiktoken_dir)
    n = 400  # byte-pair ranks; the 256 special tokens follow
    assert (tok.vocab_size, tok.bos_id, tok.add_bos) == (n + 256, n, True)
    assert tok.eos_ids == [n + 1, n + 9]  # <|end_of_text|> and <|eot_id|>
    assert ref.token_to_id("<|eot_id|>") == n + 9 and ref.get_vocab_size() == n + 256
    for text in TEXTS + LEADING_SPACE + ["<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        ids = tok.encode(text)
        assert ids == [n] + ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids[1:]) == ref.decode(ids[1:], skip_special_tokens=False) == text
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_tiktoken_fallback_chat_template(tiktoken_dir):
    tok = load_tokenizer(tiktoken_dir)
    text = tok.apply_chat_template(MESSAGES[:2])
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi! Ça va? 🙂<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode_chat(MESSAGES[:2])
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


# --------------------------------------------------------------------------------------------------
# Configuration files

def test_config_files_and_fallbacks(tmp_path):
    write_tiny_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    config["eos_token"] = {"content": "<|endoftext|>", "lstrip": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_ids == [0, 1, 2]  # config eos, generation_config's list, and ChatML's <|im_end|>
    # no template of its own: ChatML, since the vocabulary has <|im_start|>
    assert tok.apply_chat_template(MESSAGES[1:2]) == "<|im_start|>user\nHi! Ça va? 🙂<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    assert load_tokenizer(tmp_path).apply_chat_template(MESSAGES[1:2]) == "HI! ÇA VA? 🙂"


def test_missing_or_bad_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(BriskError,
                       match="no tokenizer.json, vocab.json .+ merges.txt or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 garbage\n")
    with pytest.raises(BriskError, match="neither a SentencePiece model nor a tiktoken rank file"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------------------------------
# The real SmolLM2 tokenizer, as written by scripts/convert_gguf.py

def test_real_tokenizer_matches_transformers(real_checkpoint):
    from transformers import AutoTokenizer

    directory = real_checkpoint.parent
    ref, tok = AutoTokenizer.from_pretrained(directory), load_tokenizer(directory)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, [2], False, 49152)
    for text in TEXTS + LEADING_SPACE + ["<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text) and tok.decode(ids) == text, text
        assert "".join(stream(tok, ids)) == text
    # SmolLM2 splits digits one by one
    assert tok.encode("2024") == [tok.token_id(d) for d in "2024"]
    text = tok.apply_chat_template(MESSAGES[1:2])
    assert text == ref.apply_chat_template(MESSAGES[1:2], tokenize=False,
                                           add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
