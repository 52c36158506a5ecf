"""What every command line shares: the user-error exception, one-line errors, checks of common
flags, and text on the terminal (TextStream: a sequence's text as its tokens arrive, cut at stop
strings; chat: an interactive chat).

The bottom of the import graph: it imports no other module of brisk.
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch


class BriskError(Exception):
    """A problem with the user's input: scripts print it as one line and exit with status 1."""


# --dtype's choices
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# --kv_cache_dtype's choices; without it the cache holds the model's dtype
KV_CACHE_DTYPES = {"int8": torch.int8}


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """--device, --dtype and --kv_cache_dtype, alike in every script that runs a model."""
    p.add_argument("--device", type=parse_device,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="default bfloat16")
    p.add_argument("--kv_cache_dtype", choices=list(KV_CACHE_DTYPES), default=None,
                   help="int8: keys and values in int8 with a scale per position and head, about half the memory of "
                        "bf16 (default: the model's dtype)")


def kv_cache_dtype(args: argparse.Namespace):
    """--kv_cache_dtype as a torch dtype; None for the model's own."""
    return args.kv_cache_dtype and KV_CACHE_DTYPES[args.kv_cache_dtype]


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(); a BriskError or Ctrl-C becomes one line on stderr and exit status
    1."""
    try:
        main()
    except BriskError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: ... (usage: prog -h)`, with exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (usage: {self.prog} -h)\n")


def looks_like_path(value: str) -> bool:
    """Whether text given to an option that takes a file or text (--context) was meant as a file:
    one word with a path separator or a file extension (`doc.txt`, `notes/q3`), so that a mistyped
    path is not taken as text."""
    return (re.fullmatch(r"\S+", value) is not None
            and ("/" in value or os.sep in value
                 or re.search(r"\.[A-Za-z][A-Za-z0-9]{0,4}$", value) is not None))


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BriskError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BriskError("--device cuda, but CUDA is not available")
    return device


def check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    """Refuse counts below 1 among the flags `names` (None: not given)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BriskError(f"--{name} must be at least 1, got {value}")


def check_writable(path: Path, force: bool) -> None:
    if Path(path).exists() and not force:
        raise BriskError(f"{path} exists; pass --force to overwrite it")


def save_atomic(path: Path, write: Callable[[Path], None], force: bool = False) -> None:
    """Call write(tmp) and rename tmp to path, so an interrupted run never leaves a half-written
    file."""
    path = Path(path)
    check_writable(path, force)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_json(path: Path, obj, force: bool = False) -> None:
    save_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)), force)


class TextStream:
    """The text of one sequence as its tokens arrive, cut before the first stop string. Text is
    written to `out` (if given) once it can no longer turn into a stop string, so a stop string is
    never printed."""

    def __init__(self, tokenizer, stops=(), out=None):
        self.decoder = tokenizer.stream_decoder()
        self.stops = [s for s in stops if s]
        self.hold = max(map(len, self.stops), default=1) - 1
        self.out, self.text, self.written, self.stopped = out, "", 0, False

    def push(self, token: int) -> bool:
        """Add a token; True once a stop string has appeared."""
        if not self.stopped:
            self._add(self.decoder.push(token))
        return self.stopped

    def finish(self) -> str:
        if not self.stopped:
            self._add(self.decoder.flush())
        self._write(len(self.text))
        return self.text

    def _add(self, new: str) -> None:
        # an earlier stop string would have been found already
        start = max(0, len(self.text) - self.hold)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        self._write(len(self.text) - (0 if self.stopped else self.hold))

    # text[:end] is final: write what of it `out` has not had yet
    def _write(self, end: int) -> None:
        if self.out is not None and end > self.written:
            self.out.write(self.text[self.written:end])
            self.out.flush()
            self.written = end


def user_messages(first: Sequence[str] = ()) -> Iterator[str]:
    """The user's messages of an interactive chat: `first` (echoed), then lines read from stdin
    until Ctrl-D; blank ones are skipped."""
    print("chat: type a message and press Enter; Ctrl-D ends", file=sys.stderr)
    for user in first:
        print(f"> {user}")
        if user.strip():
            yield user
    while True:
        try:
            user = input("> ")
        except EOFError:
            print()
            return
        if user.strip():
            yield user


def chat(reply: Callable[[list[dict]], str], first: Sequence[str] = ()) -> None:
    """An interactive chat: each user message (`first`, then stdin) joins the conversation, and
    reply(messages) returns the assistant's answer, which joins it too."""
    messages = []
    for user in user_messages(first):
        messages.append(dict(role="user", content=user))
        messages.append(dict(role="assistant", content=reply(messages)))
