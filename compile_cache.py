"""Compiled CPU steps saved on disk and loaded by the next run: a warm start skips Dynamo's tracing
and Inductor's code generation (torch.compile's aot_compile, whose result saves and loads; why this
one: BENCHMARKS.md, "Start-up").

    step = SavedStep(fn, options, "the decode step", dynamic=("attend_len",))
    step(model, *args, **kwargs)   # loads DIR/<key>.bin, else compiles fn for these inputs and saves it there
    step.saved(model, *args, **kwargs)    # True where DIR holds the step for these inputs: a warm start

DIR is $BRISK_CACHE_DIR, else ~/.cache/brisk/compiled. The key hashes everything that changes the
compiled code: torch's and Python's versions, the CPU's capability and whether brisk's kernels load,
the step's function and Inductor options, the model's config and each parameter's and buffer's name,
dtype and shape (quantization, KV cache size), the inputs' dtypes and shapes (a dynamic size as
"s"), the other arguments' values, and the source of brisk's modules and kernels (SOURCES). A file
that names another key is stale or foreign, one whose checksum fails or that does not load is
corrupt: either is reported on one line and rebuilt, never run.
"""
import hashlib
import inspect
import io
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch._dynamo.guards import CheckFunctionManager

import cpu

HERE = Path(__file__).resolve().parent
# the files whose code a compiled step runs or whose choices shape it
SOURCES = [HERE / n for n in ("model.py", "cpu.py", *cpu.SOURCES, cpu.HEADER, "quant.py", "tp.py",
                              "engine.py", "sampling.py", "batch.py", "speculative.py",
                              "compile_cache.py")]
MAGIC = b"brisk compiled step 1\n"
# steps loaded from disk and compiled here, by every SavedStep of this process
TALLY = {"loaded": 0, "compiled": 0}


def keep_guard(entries) -> list[bool]:
    """Dynamo's guards a saved step keeps: those on its tensor and number arguments. Those on the
    model are dropped (checking ~500 modules costs a noticeable share of a small model's step; the
    key covers their shapes and dtypes), and so are those on globals and the kinds that cannot be
    saved."""
    bad = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [not (e.is_global or e.guard_type in bad or e.name.startswith("L['model']"))
            for e in entries]


def describe(names: list, args: tuple, kwargs: dict, dynamic: tuple) -> tuple:
    """The inputs as the key sees them (args named by `names`, the step's parameters after the
    model): a tensor's dtype and shape (a size marked dynamic as "s": maybe_mark_dynamic of 2 or
    more), a dynamic argument as "s", anything else as its repr."""
    def one(name, v):
        if isinstance(v, torch.Tensor):
            marked = getattr(v, "_dynamo_weak_dynamic_indices", set()) | getattr(v, "_dynamo_dynamic_indices", set())
            return str(v.dtype), tuple("s" if i in marked
                                       and n > 1 else n for i, n in enumerate(v.shape))
        return "s" if name in dynamic else repr(v)
    return tuple((k, one(k, v)) for k, v in [*zip(names, args), *sorted(kwargs.items())])


def step_key(fn: Callable, options: dict, model: torch.nn.Module, inputs: tuple) -> str:
    tensors = [*model.named_parameters(remove_duplicate=False),
               *model.named_buffers(remove_duplicate=False)]
    parts = dict(torch=torch.__version__, python=sys.version, isa=cpu.CPU_CAPABILITY,
                 kernels=cpu.kernel_isa(), positions_alone=cpu._positions_alone,
                 fn=f"{fn.__module__}.{fn.__qualname__}",
                 options=sorted((k, repr(v)) for k, v in options.items() if k != "guard_filter_fn"),
                 config=repr(getattr(model, "config", None)), inputs=repr(inputs),
                 tensors=[(n, str(t.dtype), tuple(t.shape)) for n, t in tensors])
    h = hashlib.sha256(json.dumps(parts, default=repr).encode())
    for path in SOURCES:
        h.update(path.read_bytes())
    return h.hexdigest()


class Ticker:
    """One line on stderr while something slow runs: what, and the seconds so far where stderr is a
    terminal."""

    def __init__(self, line: str):
        self.line, self.t0, self.done = line, time.perf_counter(), threading.Event()
        self.tty = sys.stderr.isatty()
        print(line + ("" if self.tty else " ..."), end="" if self.tty else "\n", file=sys.stderr,
              flush=True)
        if self.tty:
            threading.Thread(target=self.tick, daemon=True).start()

    def tick(self) -> None:
        while not self.done.wait(1.0):
            print(f"\r{self.line}: {time.perf_counter() - self.t0:.0f} s", end="", file=sys.stderr,
                  flush=True)

    def stop(self) -> float:
        self.done.set()
        seconds = time.perf_counter() - self.t0
        if self.tty:
            print(f"\r{self.line}: done in {seconds:.0f} s", file=sys.stderr, flush=True)
        return seconds


class SavedStep:
    """fn(model, *args, **kwargs) compiled once per kind of input (describe) and kept on disk (TALLY
    counts the graphs loaded and compiled). options: torch.compile's Inductor options."""

    def __init__(self, fn: Callable, options: dict, what: str, dynamic: tuple = ()):
        self.fn, self.what, self.dynamic = fn, what, dynamic
        self.options = dict(options, guard_filter_fn=keep_guard)
        self.graphs: dict[tuple, Callable] = {}
        # (file, key) per kind of input: the key, which hashes the sources and the model's tensors,
        # is computed once, not again when saved() is followed by a load or a compile
        self.keys: dict[tuple, tuple[Path, str]] = {}
        self.load_s = 0.0  # seconds spent loading saved steps
        self.names = list(inspect.signature(fn).parameters)[1:]

    def __call__(self, model, *args, **kwargs):
        inputs = describe(self.names, args, kwargs, self.dynamic)
        graph = self.graphs.get(inputs)
        if graph is None:
            t0 = time.perf_counter()
            graph = self.graphs[inputs] = self.load_saved(model, inputs)
            self.load_s += time.perf_counter() - t0
        if graph is None:
            graph = self.graphs[inputs] = self.compile(model, args, kwargs, inputs)
        return graph(model, *args, **kwargs)

    def saved(self, model, *args, **kwargs) -> bool:
        """True where a step for these inputs is saved (or already loaded): a call will load it, not
        compile."""
        inputs = describe(self.names, args, kwargs, self.dynamic)
        return inputs in self.graphs or self.path(model, inputs)[0].exists()

    def path(self, model, inputs: tuple) -> tuple[Path, str]:
        if inputs not in self.keys:  # one model per step, as self.graphs
            key = step_key(self.fn, self.options, model, inputs)
            self.keys[inputs] = cpu.cache_dir() / f"{self.fn.__name__}-{key[:40]}.bin", key
        return self.keys[inputs]

    def load_saved(self, model, inputs: tuple):
        """The step saved for these inputs, or None where none is (or it is stale or corrupt: load
        says so)."""
        path, key = self.path(model, inputs)
        graph = self.load(path, key) if path.exists() else None
        if graph is not None:
            # the key, which holds every input's dtype and shape (dynamic sizes as such), stands for
            # Dynamo's saved guards: those refuse a tensor marked dynamic (maybe_mark_dynamic) as it
            # was at compile time (torch 2.13)
            graph.disable_guard_check()
            TALLY["loaded"] += 1
        return graph

    def compile(self, model, args: tuple, kwargs: dict, inputs: tuple) -> Callable:
        path, key = self.path(model, inputs)
        size = "x".join(map(str, model.layers[0].attention.kv_cache.k_cache.shape[::2]))
        ticker = Ticker(f"brisk: compiling {self.what} for a {size} cache, once: the next run loads it from "
                        f"{path.parent}")
        try:
            compiled = torch.compile(self.fn, fullgraph=True, options=self.options)
            with torch.compiler.config.patch(dynamic_sources=",".join(f"L['{n}']"
                                                                      for n in self.dynamic)):
                graph = compiled.aot_compile(((model, *args), kwargs))
        finally:
            ticker.stop()
        TALLY["compiled"] += 1
        try:
            self.save(graph, path, key)
        # a step that cannot be pickled (a lambda) still runs, compiled for this run only
        except Exception as e:
            print(f"brisk: {self.what} was not saved ({str(e).splitlines()[0][:200]})",
                  file=sys.stderr)
        graph.disable_guard_check()
        return graph

    def load(self, path: Path, key: str):
        """The step saved at path, or None (said on one line) when it is stale, foreign or
        corrupt."""
        try:
            data = path.read_bytes()
            head = MAGIC + key.encode() + b"\n"
            if data.startswith(MAGIC) and len(data) > len(head) and not data.startswith(head):
                print(f"brisk: {path} was compiled for another setup (stale or foreign): compiling {self.what} "
                      f"again", file=sys.stderr)
                return None
            if not data.startswith(head):
                raise ValueError("not a saved step")
            digest, payload = data[len(head):len(head) + 65], data[len(head) + 65:]
            if hashlib.sha256(payload).hexdigest().encode() + b"\n" != digest:
                raise ValueError("checksum mismatch: truncated or damaged")
            # the C++ is built (or found in Inductor's cache) as it loads: with the flags it was
            # compiled with
            with torch._inductor.config.patch({k: v for k, v in self.options.items()
                                               if k != "guard_filter_fn"}):
                return torch.compiler.load_compiled_function(io.BytesIO(payload))
        except Exception as e:  # anything a damaged file makes the unpickler raise
            print(f"error: {path} is corrupt ({str(e).splitlines()[0][:200]}): compiling {self.what} again",
                  file=sys.stderr)
            return None

    def save(self, graph, path: Path, key: str) -> None:
        payload = type(graph).serialize(graph).serialized_data
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(MAGIC + key.encode() + b"\n" + hashlib.sha256(payload).hexdigest().encode()
                        + b"\n" + payload)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
