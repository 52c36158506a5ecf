"""compile_cache.py: a compiled step is saved, loaded by the next run instead of traced, and rebuilt
(never run) when anything that shapes its code changed or its file is damaged."""
import shutil
from pathlib import Path

import pytest
import torch

import compile_cache
import engine
from checkpoint import load_model
from conftest import make_checkpoint

PROMPT = [5, 17, 42, 99, 7, 250, 3]


def tiny_model(path: Path, dtype=torch.float32, max_seq_length: int = 64):
    model = load_model(path, "cpu", dtype)
    model.setup_caches(1, max_seq_length)
    return model


def greedy(model, step, n: int = 6) -> list:
    rows, _ = engine.generate(model, torch.tensor(PROMPT), n, decode_fn=step, temperature=0.0)
    return rows[0]


def run(model, cache: Path, monkeypatch) -> tuple[list, dict]:
    """Greedy tokens of a fresh compiled decode step (as a new process makes one) saving to `cache`,
    and the steps it loaded and compiled."""
    monkeypatch.setenv("BRISK_CACHE_DIR", str(cache))
    torch._dynamo.reset()
    before = dict(compile_cache.TALLY)
    tokens = greedy(model, engine.compile_step(engine.decode_one_token, torch.device("cpu")))
    return tokens, {k: compile_cache.TALLY[k] - before[k] for k in before}


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """A one-layer model, its eager tokens, and a cache directory holding its compiled decode
    step."""
    tmp = tmp_path_factory.mktemp("cold")
    path = make_checkpoint(tmp / "model", tokenizer=False, n_layer=1)
    model = tiny_model(path)
    eager = greedy(model, engine.decode_one_token)
    with pytest.MonkeyPatch.context() as mp:
        tokens, counts = run(model, tmp / "cache", mp)
    assert counts == dict(loaded=0, compiled=1) and tokens == eager
    return path, eager, tmp / "cache"


def copy_of(cache: Path, tmp_path: Path) -> Path:
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "cache"


def saved(cache: Path) -> Path:
    (path,) = cache.glob("decode_one_token-*.bin")
    return path


@pytest.mark.slow
def test_a_warm_run_loads_the_saved_step_instead_of_tracing(cold, tmp_path, monkeypatch):
    """The next run's step comes from the file: Dynamo never traces (tracing would raise here), and
    its tokens are the cold run's and eager's, token for token."""
    path, eager, cache = cold

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced")
    monkeypatch.setattr(torch._dynamo.convert_frame, "fullgraph_capture", no_tracing)
    tokens, counts = run(tiny_model(path), copy_of(cache, tmp_path), monkeypatch)
    assert counts == dict(loaded=1, compiled=0)
    assert tokens == eager


def test_the_key_follows_the_config_the_dtype_the_cache_size_and_the_kernel_source(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path / "model", tokenizer=False, n_layer=1)
    other = make_checkpoint(tmp_path / "other", tokenizer=False, n_layer=1, norm_eps=1e-6)
    x, pos = torch.zeros(1, 1, dtype=torch.int), torch.tensor([7])

    def key(model):
        inputs = compile_cache.describe(["x", "input_pos"], (x, pos), dict(attend_len=64),
                                        ("attend_len",))
        return compile_cache.step_key(engine.decode_one_token, {}, model, inputs)
    base = key(tiny_model(path))
    assert key(tiny_model(path)) == base  # the weights' values are inputs, not part of the code
    assert key(tiny_model(other)) != base  # another config
    assert key(tiny_model(path, torch.bfloat16)) != base  # another dtype
    assert key(tiny_model(path, max_seq_length=128)) != base  # another cache size
    kernel = tmp_path / "cpu_kernels.cpp"
    kernel.write_text("// one kernel")
    monkeypatch.setattr(compile_cache, "SOURCES", [*compile_cache.SOURCES, kernel])
    edited = key(tiny_model(path))
    kernel.write_text("// another kernel")
    assert key(tiny_model(path)) != edited != base


def test_a_dynamic_size_is_one_key_for_every_value():
    """A batch's row count (marked dynamic) and the attended length, given by name or by
    position."""
    def inputs(rows: int, *args, **kwargs):
        x = torch.zeros(rows, 1)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return compile_cache.describe(["x", "attend_len"], (x, *args), kwargs, ("attend_len",))
    three = inputs(3, attend_len=64)
    assert inputs(5, attend_len=128) == inputs(5, 128) == three
    assert inputs(5, attend_len=128, temperature=0.5) != three
    assert inputs(1, attend_len=64) != three  # one row: a graph of its own


@pytest.mark.slow
def test_an_edited_kernel_source_rebuilds_the_step(cold, tmp_path, monkeypatch):
    path, eager, cache = cold
    kernel = tmp_path / "cpu_kernels.cpp"
    kernel.write_text("// edited")
    monkeypatch.setattr(compile_cache, "SOURCES", [*compile_cache.SOURCES, kernel])
    cache = copy_of(cache, tmp_path)
    tokens, counts = run(tiny_model(path), cache, monkeypatch)
    assert counts == dict(loaded=0, compiled=1) and tokens == eager
    # beside the old one, which is never run
    assert len(list(cache.glob("decode_one_token-*.bin"))) == 2


@pytest.mark.slow
def test_a_truncated_artifact_is_rebuilt_with_one_message(cold, tmp_path, monkeypatch, capsys):
    path, eager, cache = cold
    cache = copy_of(cache, tmp_path)
    data = saved(cache).read_bytes()
    saved(cache).write_bytes(data[:len(data) // 2])
    capsys.readouterr()
    tokens, counts = run(tiny_model(path), cache, monkeypatch)
    assert counts == dict(loaded=0, compiled=1) and tokens == eager
    lines = [line for line in capsys.readouterr().err.splitlines() if str(saved(cache)) in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "corrupt" in lines[0]
    assert saved(cache).read_bytes() != data[:len(data) // 2]  # rebuilt: the next run loads it
    assert run(tiny_model(path), cache, monkeypatch)[1] == dict(loaded=1, compiled=0)


@pytest.mark.slow
def test_a_foreign_artifact_is_detected_and_rebuilt(cold, tmp_path, monkeypatch, capsys):
    """A file under this step's name that holds another key's step (copied from another setup) is
    never run."""
    path, eager, cache = cold
    cache = copy_of(cache, tmp_path)
    data = saved(cache).read_bytes()
    head = len(compile_cache.MAGIC)
    saved(cache).write_bytes(data[:head] + b"0" * 64 + data[head + 64:])
    capsys.readouterr()
    tokens, counts = run(tiny_model(path), cache, monkeypatch)
    assert counts == dict(loaded=0, compiled=1) and tokens == eager
    assert "stale or foreign" in capsys.readouterr().err


@pytest.mark.slow
def test_a_warm_start_prints_the_first_token_before_it_loads_the_saved_step(cold, tmp_path, monkeypatch):
    """generate.py's warm-up generation is skipped where the decode step is saved: the prompt's
    (eager) prefill gives the first token at once, the step loads at its first call, and the decode
    time leaves the loading out."""
    path, eager, cache = cold
    monkeypatch.setenv("BRISK_CACHE_DIR", str(copy_of(cache, tmp_path)))
    torch._dynamo.reset()
    e = engine.Engine(tiny_model(path), compile=True)
    e.setup(1, 64)
    events = []
    load_saved = e.decode_fn.compiled.load_saved
    monkeypatch.setattr(e.decode_fn.compiled, "load_saved",
                        lambda *a: events.append("load") or load_saved(*a))
    assert e.warm_up(torch.tensor(PROMPT), 6, 1, temperature=0.0) == 0.0 and events == []
    rows, timing = e.generate(torch.tensor(PROMPT), 6, temperature=0.0, on_token=lambda r,
                              t: events.append(t) and 0)
    assert rows[0] == eager and events == [eager[0], "load", *eager[1:]]
    assert 0 < timing["decode_s"] and 0 < timing["load_s"]


@pytest.mark.slow
def test_a_warm_start_hashes_the_step_key_once(cold, tmp_path, monkeypatch):
    """Engine.warm_up asks whether the step is saved (SavedStep.saved) and its first call loads it:
    the key, which hashes brisk's sources and the model's tensors, is computed once for both."""
    path, eager, cache = cold
    monkeypatch.setenv("BRISK_CACHE_DIR", str(copy_of(cache, tmp_path)))
    torch._dynamo.reset()
    e = engine.Engine(tiny_model(path), compile=True)
    e.setup(1, 64)
    keys, step_key, loaded = [], compile_cache.step_key, compile_cache.TALLY["loaded"]
    monkeypatch.setattr(compile_cache, "step_key", lambda *a: keys.append(a) or step_key(*a))
    assert e.warm_up(torch.tensor(PROMPT), 6, 1, temperature=0.0) == 0.0
    rows, _ = e.generate(torch.tensor(PROMPT), 6, temperature=0.0)
    assert rows[0] == eager and len(keys) == 1 and compile_cache.TALLY["loaded"] == loaded + 1
