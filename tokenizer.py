"""Tokenizers for the checkpoints brisk runs, behind one interface, with chat templates and
streaming decode.

`load_tokenizer(checkpoint_dir)` reads, in this order of preference:
  tokenizer.json   a Hugging Face `tokenizers` file (SmolLM2, Qwen2, Llama 3 from the Hub, GGUF conversions)
  vocab.json + merges.txt   GPT-2-style byte-level BPE without a tokenizer.json (OPT, older GPT-2 repos)
  tokenizer.model  a SentencePiece model (Llama 2, Mistral, TinyLlama) or a tiktoken rank file (Meta's Llama 3)
and tokenizer_config.json / generation_config.json beside it for BOS/EOS, whether to prepend BOS,
and the chat template. Results match `transformers.AutoTokenizer` on the same files.
"""
import base64
import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Optional

from cli import BriskError

# Meta's Llama 3 split pattern and special tokens (ids follow the 128000 byte-pair ranks)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                   "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_4|>", "<|eot_id|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]

# Used when the checkpoint has no template of its own; picked by the special tokens the vocabulary
# has.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
    """Common behaviour; a backend provides _encode (no BOS, special-token text parsed), decode,
    token_id."""

    bos_id: Optional[int] = None
    eos_ids: list = []
    add_bos: bool = False
    vocab_size: int = 0
    chat_template: Optional[str] = None

    def _encode(self, text: str) -> list:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_id(self, token: str) -> Optional[int]:
        """The id of a single token spelled `token`, or None."""
        raise NotImplementedError

    def encode(self, text: str, bos: Optional[bool] = None) -> list:
        ids = self._encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def _configure(self, directory: Path, bos: Optional[str], eos: Optional[str],
                   add_bos: bool) -> None:
        """Apply tokenizer_config.json, generation_config.json and chat_template.jinja over a
        backend's defaults."""
        config = _read_json(directory / "tokenizer_config.json")
        bos, eos = _token_text(config.get("bos_token", bos)), _token_text(config.get("eos_token", eos))
        self.bos_token, self.eos_token = bos or "", eos or ""
        self.bos_id = self.token_id(bos) if bos else None
        self.add_bos = bool(config.get("add_bos_token", add_bos))
        stops = [self.token_id(eos) if eos else None]
        generation_eos = _read_json(directory / "generation_config.json").get("eos_token_id")
        stops += generation_eos if isinstance(generation_eos, list) else [generation_eos]
        # end of turn in Llama 3 and ChatML
        stops += [self.token_id(t) for t in ("<|eot_id|>", "<|im_end|>")]
        self.eos_ids = sorted({i for i in stops if i is not None})

        template = config.get("chat_template")
        # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}.get("default")
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None:
            if self.token_id("<|start_header_id|>") is not None:
                template = LLAMA3_TEMPLATE
            elif self.token_id("<|im_start|>") is not None:
                template = CHATML_TEMPLATE
            else:
                template = LLAMA2_TEMPLATE
        self.chat_template = template
        self._special_tokens = {k: _token_text(v) for k, v in config.items()
                                if k in ("unk_token", "pad_token") and _token_text(v)}

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True,
                            tools: Optional[list] = None) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's template, as
        transformers does; `tools` ([{"type": "function", "function": {...}}]) is the template's
        `tools` variable, left undefined when None."""
        import jinja2

        extra = {} if tools is None else dict(tools=tools)
        try:
            return _compile(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **self._special_tokens, **extra)
        except jinja2.TemplateError as e:
            raise BriskError(f"chat template: {e}") from None

    def has_tool_format(self) -> bool:
        """Whether the chat template renders tools: it reads the `tools` variable."""
        return _reads_tools(self.chat_template)

    def encode_chat(self, messages: list, add_generation_prompt: bool = True,
                    tools: Optional[list] = None) -> list:
        ids = self._encode(self.apply_chat_template(messages, add_generation_prompt, tools))
        # templates often write BOS
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns tokens into text as they arrive. Each push decodes a short window of recent tokens and
    emits what it adds to the text already emitted; the window starts one emitted chunk back so that
    context-dependent decoding (SentencePiece drops the space of the first token only) comes out as
    in decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list = []
        self.start = self.mid = 0  # window ids[start:], of which ids[start:mid] is already emitted

    def _new_text(self) -> str:
        done = self.tokenizer.decode(self.ids[self.start:self.mid])
        return self.tokenizer.decode(self.ids[self.start:])[len(done):]

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._new_text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its remaining bytes
            return ""
        self.start, self.mid = self.mid, len(self.ids)
        return text

    def flush(self) -> str:
        text = self._new_text()
        self.ids, self.start, self.mid = [], 0, 0
        return text


class HFTokenizer(Tokenizer):
    """tokenizer.json, or vocab.json + merges.txt, run by the Hugging Face `tokenizers` library."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as Backend

        path = directory / "tokenizer.json"
        try:
            self.tok = Backend.from_file(str(path)) if path.is_file() else _byte_level_bpe(directory)
        except Exception as e:
            raise BriskError(f"cannot read the tokenizer in {directory}: {str(e).splitlines()[0]}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        # Without add_bos_token in the config, BOS is whatever the file's post-processor puts first
        # (Llama 3)
        plain, full = self.tok.encode("a", add_special_tokens=False).ids, self.tok.encode("a").ids
        added_bos = self.tok.id_to_token(full[0]) if len(full) > len(plain) and full[-len(plain):] == plain else None
        # GPT2Tokenizer's default BOS and EOS, for vocab.json + merges.txt
        default = "<|endoftext|>" if not path.is_file() and self.tok.token_to_id("<|endoftext|>") is not None else None
        self._configure(directory, added_bos or default, default, added_bos is not None)

    def _encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
    """tokenizer.model of Llama 2 / Mistral / TinyLlama. Control tokens written in the text (`<s>`,
    `</s>`) become those tokens; the text between them is encoded by SentencePiece piece by piece,
    each with its dummy-prefix space, as Meta's reference code, llama.cpp and the models' own
    tokenizer.json (legacy Llama) do."""

    def __init__(self, sp, directory: Path):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        specials = [sp.id_to_piece(i) for i in range(self.vocab_size) if sp.is_control(i)
                    or sp.is_unknown(i)]
        # longest first, so no special shadows a longer one
        specials = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, specials))
                                 + ")") if specials else None
        self._configure(directory, _piece(sp, sp.bos_id()), _piece(sp, sp.eos_id()), True)

    def _encode(self, text: str) -> list:
        ids = []
        parts = self._split.split(text) if self._split else [text]
        for k, part in enumerate(parts):
            if k % 2:  # a special token
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids) -> str:
        # pieces joined as transformers' decoder does: "▁" is a space, <0xNN> pieces are bytes, one
        # leading space of the whole text is dropped
        out, pending = [], b""
        for i in ids:
            piece = self.sp.id_to_piece(int(i))
            if self.sp.is_byte(int(i)):
                pending += bytes([int(piece[3:5], 16)])
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = b""
            out.append(piece.replace("▁", " "))
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text

    def token_id(self, token: str) -> Optional[int]:
        i = self.sp.piece_to_id(token)
        return i if i != self.sp.unk_id() or token == self.sp.id_to_piece(i) else None


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer.model: byte-pair ranks, base64 token and rank per line."""

    def __init__(self, ranks: dict, directory: Path):
        import tiktoken

        specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
        self.enc = tiktoken.Encoding(name=directory.name, pat_str=LLAMA3_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.specials, self.ranks = specials, ranks
        self.vocab_size = self.enc.n_vocab
        self._configure(directory, "<|begin_of_text|>", "<|end_of_text|>", True)

    def _encode(self, text: str) -> list:
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def token_id(self, token: str) -> Optional[int]:
        if token in self.specials:
            return self.specials[token]
        return self.ranks.get(token.encode("utf-8"))


def _byte_level_bpe(directory: Path):
    """vocab.json + merges.txt as transformers' GPT2Tokenizer runs them; the config's special tokens
    (and added_tokens_decoder) written in the text become those tokens."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

    config = _read_json(directory / "tokenizer_config.json")
    tok = Backend(models.BPE.from_file(str(directory / "vocab.json"),
                                       str(directory / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    tok.decoder = decoders.ByteLevel()
    keys = ("bos_token", "eos_token", "unk_token", "pad_token")
    specials = [_token_text(config.get(k)) for k in keys]
    specials += [_token_text(t) for t in config.get("added_tokens_decoder", {}).values()]
    # GPT2Tokenizer's default BOS, EOS and unknown
    if not any(specials) and "<|endoftext|>" in tok.get_vocab():
        specials.append("<|endoftext|>")
    tok.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(specials) if t])
    return tok


def load_tokenizer(checkpoint_dir) -> Tokenizer:
    directory = Path(checkpoint_dir)
    if directory.is_file():  # model.pth given: its directory
        directory = directory.parent
    if (directory / "tokenizer.json").is_file() or (directory / "merges.txt").is_file():
        return HFTokenizer(directory)
    path = directory / "tokenizer.model"
    if not path.is_file():
        raise BriskError(f"no tokenizer.json, vocab.json + merges.txt or tokenizer.model in {directory}")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load(str(path))
        return SentencePieceTokenizer(sp, directory)
    except (OSError, RuntimeError):  # not a SentencePiece model: perhaps Llama 3's rank file
        pass
    return TiktokenTokenizer(_read_ranks(path), directory)


def _read_ranks(path: Path) -> dict:
    ranks = {}
    try:
        for line in path.read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:
        raise BriskError(f"{path} is neither a SentencePiece model nor a tiktoken rank file") from None
    return ranks


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BriskError(f"{path}: invalid JSON ({e})") from None


def _token_text(token) -> Optional[str]:
    return token.get("content") if isinstance(token, dict) else token


def _piece(sp, i: int) -> Optional[str]:
    return sp.id_to_piece(i) if i >= 0 else None


@functools.lru_cache(maxsize=16)
def _reads_tools(template: str) -> bool:
    import jinja2.meta

    return "tools" in jinja2.meta.find_undeclared_variables(_compile(template).environment.parse(template))


_templates: dict = {}


def _compile(template: str):
    """A template in the sandboxed environment transformers uses, with the same helpers."""
    if template not in _templates:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            _templates[template] = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise BriskError(f"chat template: {e}") from None
    return _templates[template]
