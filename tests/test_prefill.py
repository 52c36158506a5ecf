"""generate_prefill.py: restoring cached prefixes gives the logits and tokens of a full prefill; the
cache keeps its memory budget, survives a save/load round trip, and refuses foreign or corrupt files
without losing them."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
import generate as gen
import generate_prefill as gp
import prefix_cache
import speculative as spec
import tp
from conftest import ROOT, make_checkpoint
from helpers import compiled_steps, scribble, torchrun
from checkpoint import load_model
from cli import BriskError, looks_like_path, run_cli

SHARED = [5, 17, 42, 99, 7, 250, 3, 61, 8, 140, 33, 2]
TAIL_A, TAIL_B = [77, 12, 90, 6], [201, 45, 9]


def tiny(path: Path, dtype=torch.float32, max_seq_length: int = 64, device="cpu",
         kv_cache_dtype=None):
    model = load_model(path, device, dtype)
    model.kv_cache_dtype = kv_cache_dtype
    model.setup_caches(1, max_seq_length)
    return model


def new_cache(model, path: Path, budget_bytes: int = 1 << 30) -> prefix_cache.PrefixCache:
    return prefix_cache.PrefixCache([model], [prefix_cache.model_meta(model, path)], budget_bytes)


def prefill_logits(model, ids: list, start: int = 0) -> torch.Tensor:
    # logits [T, V] of ids[start:], the cache already holding positions < start
    device = model.norm.weight.device
    with torch.no_grad():
        return model(torch.tensor([ids[start:]], device=device),
                     torch.arange(start, len(ids), device=device))[0]


def greedy(model, cache, ids: list, n: int = 8, **kwargs) -> tuple[list, int]:
    new, _, cached = prefix_cache.generate_cached(model, cache, ids, n, temperature=0.0, **kwargs)
    return new, cached


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("prefill") / "tiny")


# --------------------------------------------------------------------------------------------------
# Restoring a prefix


@pytest.mark.parametrize("stored, prompt, hit", [
    (SHARED, SHARED + TAIL_B, len(SHARED)),  # the whole entry is a prefix of the prompt
    (SHARED + TAIL_A, SHARED + TAIL_B, len(SHARED)),  # a hit shorter than the stored entry
    (SHARED + TAIL_A, SHARED, len(SHARED) - 1),  # the whole prompt is cached: its last token is prefilled again
])
def test_restored_prefix_then_prefill_gives_the_logits_of_a_full_prefill(ckpt, stored, prompt, hit, device, dtype,
                                                                         tol):
    model = tiny(ckpt, dtype, device=device)
    full = prefill_logits(model, prompt)
    cache = new_cache(model, ckpt)
    prefill_logits(model, stored)
    assert cache.store(stored)
    scribble(model)
    assert cache.restore(prompt, len(prompt) - 1) == hit
    atol = 1e-5 if dtype == torch.float32 else tol["atol"]
    torch.testing.assert_close(prefill_logits(model, prompt, hit).float(), full[hit:].float(),
                               atol=atol, rtol=0)


def test_the_cache_stores_only_the_prefix_slice(ckpt):
    model = tiny(ckpt, max_seq_length=64)
    cache = new_cache(model, ckpt)
    prefill_logits(model, SHARED)
    cache.store(SHARED)
    c = model.config
    (kv,) = cache.entries[tuple(SHARED)]
    assert kv.shape == (c.n_layer, 2, c.n_local_heads, len(SHARED), c.head_dim)
    assert cache.nbytes == kv.numel() * 4 == len(SHARED) * cache.bytes_per_token()


def test_an_int8_cache_is_stored_and_restored_as_it_holds_its_keys_and_values(ckpt, tmp_path):
    """--kv_cache_dtype int8: an entry holds the cache's int8 values and scales ([L, 2, Hkv, n, D +
    4] bytes, about half of bf16's), a hit restores them bitwise and the rest's prefill then gives
    the logits of a full prefill; a file of them is refused by a run with the model's dtype."""
    model = tiny(ckpt, kv_cache_dtype=torch.int8)
    full = prefill_logits(model, SHARED + TAIL_B)
    cache = new_cache(model, ckpt)
    prefill_logits(model, SHARED + TAIL_A)
    assert cache.store(SHARED + TAIL_A)
    written = model.layers[-1].attention.kv_cache.v_cache[0, :, :len(SHARED)].clone()
    c, n = model.config, len(SHARED + TAIL_A)
    (kv,) = cache.entries[tuple(SHARED + TAIL_A)]
    assert kv.dtype == torch.int8 and kv.shape == (c.n_layer, 2, c.n_local_heads, n, c.head_dim + 4)
    assert cache.nbytes == kv.numel() == n * cache.bytes_per_token()
    scribble(model)
    assert cache.restore(SHARED + TAIL_B, len(SHARED + TAIL_B) - 1) == len(SHARED)
    assert torch.equal(model.layers[-1].attention.kv_cache.v_cache[0, :, :len(SHARED)], written)
    torch.testing.assert_close(prefill_logits(model, SHARED + TAIL_B, len(SHARED)),
                               full[len(SHARED):], atol=1e-5, rtol=0)
    cache.save(tmp_path / "int8.pt")
    with pytest.raises(BriskError, match="holds int8 keys/values, this run uses float32: pass "
                                         "--kv_cache_dtype int8"):
        new_cache(tiny(ckpt), ckpt).load(tmp_path / "int8.pt")


def test_greedy_output_with_a_cached_prefix_is_token_identical(ckpt, device, dtype):
    model = tiny(ckpt, dtype, device=device)
    cache = new_cache(model, ckpt)
    first, cached = greedy(model, cache, SHARED + TAIL_A)
    assert cached == 0
    cache.store(SHARED + TAIL_A)
    scribble(model)
    fresh, _ = greedy(tiny(ckpt, dtype, device=device), new_cache(model, ckpt), SHARED + TAIL_B)
    again, cached = greedy(model, cache, SHARED + TAIL_B)
    assert cached == len(SHARED) and again == fresh


def test_restore_writes_into_the_existing_kv_buffers(ckpt):
    model = tiny(ckpt)
    cache = new_cache(model, ckpt)
    prefill_logits(model, SHARED)
    cache.store(SHARED)
    before = [layer.attention.kv_cache.k_cache.data_ptr() for layer in model.layers]
    cache.restore(SHARED + TAIL_A, 100)
    assert [layer.attention.kv_cache.k_cache.data_ptr() for layer in model.layers] == before


@pytest.mark.slow
def test_compiled_decode_reads_the_restored_prefix(tmp_path, device, dtype):
    path = make_checkpoint(tmp_path / "one_layer", tokenizer=False, n_layer=1)
    eager_model = tiny(path, dtype, device=device)
    eager, _ = greedy(eager_model, new_cache(eager_model, path), SHARED + TAIL_B)
    model = tiny(path, dtype, device=device)
    fns = compiled_steps(model)
    cache = new_cache(model, path)
    greedy(model, cache, SHARED + TAIL_A, **fns)
    cache.store(SHARED + TAIL_A)
    scribble(model)
    compiled, cached = greedy(model, cache, SHARED + TAIL_B, **fns)
    assert cached == len(SHARED) and compiled == eager


# --------------------------------------------------------------------------------------------------
# A draft model: its keys/values are cached and restored with the target's


@pytest.fixture(scope="module")
def draft_ckpt(ckpt) -> Path:
    """A smaller model with other random weights and the same tokenizer."""
    return make_checkpoint(ckpt.parent.parent / "draft", seed=1, n_layer=1, dim=32, n_head=2,
                           n_local_heads=1, intermediate_size=64)


def with_draft(target_path: Path, draft_path: Path, k: int = 3, kv_cache_dtype=None):
    """A target, a draft proposing k tokens, and a prefix cache holding both."""
    target = tiny(target_path, max_seq_length=64 + k, kv_cache_dtype=kv_cache_dtype)
    draft = tiny(draft_path, max_seq_length=64 + k, kv_cache_dtype=kv_cache_dtype)
    cache = prefix_cache.PrefixCache([target, draft],
                                     [prefix_cache.model_meta(target, target_path),
                                      prefix_cache.model_meta(draft, draft_path)],
                           1 << 30)
    return target, cache, spec.Speculator(spec.DraftModel(draft), k)


def test_the_draft_cache_after_restore_and_prefill_equals_a_full_prefill(ckpt, draft_ckpt):
    target, cache, speculator = with_draft(ckpt, draft_ckpt)
    draft = speculator.proposer.model
    greedy(target, cache, SHARED + TAIL_A, speculator=speculator)
    cache.store(SHARED + TAIL_A)
    scribble(target)
    scribble(draft)
    prompt = SHARED + TAIL_B
    assert cache.restore(prompt, len(prompt) - 1) == len(SHARED)
    # what generate does after the target's prefill
    speculator.prefill(torch.tensor(prompt), len(SHARED))

    fresh = spec.Speculator(spec.DraftModel(tiny(draft_ckpt)))
    fresh.prefill(torch.tensor(prompt))
    for layer, want in zip(draft.layers, fresh.proposer.model.layers):
        got, want = layer.attention.kv_cache, want.attention.kv_cache
        torch.testing.assert_close(got.k_cache[:, :, :len(prompt)],
                                   want.k_cache[:, :, :len(prompt)], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.v_cache[:, :, :len(prompt)],
                                   want.v_cache[:, :, :len(prompt)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_cache_dtype", [None, torch.int8])
def test_with_a_draft_greedy_output_is_that_of_no_draft_and_of_plain_generation(ckpt, draft_ckpt, kv_cache_dtype):
    """In the model's dtype or an int8 KV cache (--kv_cache_dtype int8, the draft's as the
    target's)."""
    target, cache, speculator = with_draft(ckpt, draft_ckpt, kv_cache_dtype=kv_cache_dtype)
    alone = tiny(ckpt, kv_cache_dtype=kv_cache_dtype)
    no_draft = new_cache(alone, ckpt)
    for prompt, hit in [(SHARED + TAIL_A, 0), (SHARED + TAIL_B, len(SHARED))]:
        new, cached = greedy(target, cache, prompt, 20, speculator=speculator)
        assert cached == hit and speculator.stats["verifications"] > 0
        assert new == greedy(alone, no_draft, prompt, 20)[0]
        rows, _ = engine.generate(tiny(ckpt, kv_cache_dtype=kv_cache_dtype), torch.tensor(prompt),
                                  20, temperature=0.0)
        assert new == rows[0]
        cache.store(prompt)
        no_draft.store(prompt)


@pytest.mark.parametrize("kv_cache_dtype", [None, torch.int8])
def test_the_target_as_its_own_draft_accepts_everything_after_a_restore(ckpt, kv_cache_dtype):
    """Only a draft cache restored right proposes exactly the target's tokens (in an int8 cache
    too)."""
    target, cache, speculator = with_draft(ckpt, ckpt, k=4, kv_cache_dtype=kv_cache_dtype)
    greedy(target, cache, SHARED + TAIL_A, 17, speculator=speculator)
    cache.store(SHARED + TAIL_A)
    scribble(target)
    scribble(speculator.proposer.model)
    _, cached = greedy(target, cache, SHARED + TAIL_B, 17, speculator=speculator)
    assert cached == len(SHARED)
    assert speculator.stats == dict(verifications=4, accepted=16, plain_steps=0)


# --------------------------------------------------------------------------------------------------
# Memory budget and files


def test_eviction_keeps_the_budget_over_hundreds_of_prompts(tmp_path):
    path = make_checkpoint(tmp_path / "small", tokenizer=False, n_layer=1, dim=16, n_head=2,
                           n_local_heads=1, intermediate_size=32, vocab_size=64)
    model = tiny(path, max_seq_length=40)
    per_token = 2 * 1 * 1 * 8 * 4  # k and v, 1 layer, 1 kv head, head_dim 8, fp32
    cache = new_cache(model, path, budget_bytes=300 * per_token)
    g = torch.Generator().manual_seed(0)
    keep = list(range(1, 11))  # used again and again, so never the least recently used
    cache.store(keep)
    for i in range(400):
        ids = torch.randint(64, (int(torch.randint(5, 40, (1,), generator=g)),),
                            generator=g).tolist()
        assert cache.store(ids)
        assert cache.restore(keep + [0], 100) == len(keep)
        assert cache.nbytes <= cache.budget
        assert cache.nbytes == sum(t.numel() * 4 for kv in cache.entries.values() for t in kv)
        assert tuple(ids) in cache.entries or any(k[:len(ids)] == tuple(ids) for k in cache.entries)
    assert tuple(keep) in cache.entries
    assert 7 < len(cache.entries) < 300 / 5
    # larger than the whole budget: not cached, nothing evicted
    assert not cache.store(list(range(301)))
    assert tuple(keep) in cache.entries


def test_storing_an_extension_replaces_its_prefix(ckpt):
    model = tiny(ckpt)
    cache = new_cache(model, ckpt)
    prefill_logits(model, SHARED + TAIL_A)
    cache.store(SHARED)
    cache.store(SHARED + TAIL_A)
    assert list(cache.entries) == [tuple(SHARED + TAIL_A)]
    cache.store(SHARED)  # already covered
    assert list(cache.entries) == [tuple(SHARED + TAIL_A)]


def test_save_and_load_round_trip_restores_the_same_logits(ckpt, tmp_path):
    model = tiny(ckpt)
    prompt = SHARED + TAIL_B
    full = prefill_logits(model, prompt)
    cache = new_cache(model, ckpt)
    prefill_logits(model, SHARED + TAIL_A)
    cache.store(SHARED + TAIL_A)
    cache.save(tmp_path / "c.pt")

    other = tiny(ckpt)  # as in a new process
    loaded = new_cache(other, ckpt)
    loaded.load(tmp_path / "c.pt")
    assert list(loaded.entries) == list(cache.entries) and loaded.nbytes == cache.nbytes
    assert loaded.restore(prompt, len(prompt) - 1) == len(SHARED)
    torch.testing.assert_close(prefill_logits(other, prompt, len(SHARED)), full[len(SHARED):],
                               atol=1e-5, rtol=0)


def test_a_cache_file_whose_entries_do_not_match_the_model_is_corrupt(ckpt, tmp_path):
    model = tiny(ckpt)
    cache = new_cache(model, ckpt)
    prefill_logits(model, SHARED)
    cache.store(SHARED)
    state = cache.state()
    state["entries"][0]["tokens"].append(1)  # one token more than the keys/values hold
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(BriskError, match="corrupt"):
        new_cache(tiny(ckpt), ckpt).load(tmp_path / "c.pt")


@pytest.mark.parametrize("made_with, message", [
    (dict(n_layer=1), "another model (config differs in n_layer)"),
    (dict(seed=1), "another checkpoint"),
    (dict(dtype=torch.bfloat16), "holds bfloat16 keys/values, this run uses float32"),
])
def test_a_cache_file_from_another_model_or_dtype_is_refused(ckpt, tmp_path, made_with, message):
    dtype = made_with.pop("dtype", torch.float32)
    path = make_checkpoint(tmp_path / "other", tokenizer=False, **made_with) if made_with else ckpt
    model = tiny(path, dtype)
    cache = new_cache(model, path)
    prefill_logits(model, SHARED)
    cache.store(SHARED)
    cache.save(tmp_path / "c.pt")
    with pytest.raises(BriskError, match=re.escape(message)):
        new_cache(tiny(ckpt), ckpt).load(tmp_path / "c.pt")


def test_a_cache_file_without_the_draft_is_refused_by_a_run_with_one(ckpt, draft_ckpt, tmp_path):
    model = tiny(ckpt)
    prefill_logits(model, SHARED)
    cache = new_cache(model, ckpt)
    cache.store(SHARED)
    cache.save(tmp_path / "c.pt")
    _, both, _ = with_draft(ckpt, draft_ckpt)
    with pytest.raises(BriskError,
                       match=re.escape("holds the keys/values of 1 model(s), this run caches 2")):
        both.load(tmp_path / "c.pt")


# --------------------------------------------------------------------------------------------------
# Command line


SHARED_FLAGS = ["--checkpoint_path", "x/model.pth", "--chat", "--max_new_tokens", "7",
                "--temperature", "0.5", "--top_k", "9", "--top_p", "0.9", "--stop", "a", "b",
                "--seed", "3", "--device", "cpu", "--dtype",
                "float16", "--max_seq_length", "99", "--compile", "--json", "f.json", "--force",
                "--prompt_lookup", "2", "--speculate_k", "4"]


def test_generate_py_flags_mean_the_same_here():
    ours, theirs = vars(gp.parse_args(SHARED_FLAGS)), vars(gen.parse_args(SHARED_FLAGS))
    shared = ours.keys() & theirs.keys()
    assert {"checkpoint_path", "draft_checkpoint_path", "dist_timeout", "interactive",
            "compile_prefill"} <= shared
    # generate.py's --batch_size defaults to its number of prompts (rows of one batch), known once
    # they are read
    same = shared - {"prompt", "batch_size"}
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}


@pytest.mark.parametrize("args, message", [
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--cache_budget_mb", "0"], "--cache_budget_mb must be positive"),
    (["--max_seq_length", "1000"], "exceeds the model's block_size 256"),
])
def test_bad_input_is_rejected_before_loading_the_model(ckpt, monkeypatch, args, message):
    monkeypatch.setattr(engine, "load_model", lambda *a,
                        **kw: pytest.fail("loaded the model despite bad input"))
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: gp.main(["--checkpoint_path", str(ckpt), "--prompt", "Once", *args]))
    assert exit.value.code.startswith("error: ") and message in exit.value.code


def test_a_context_that_looks_like_a_missing_file_is_an_error(ckpt, tmp_path):
    with pytest.raises(BriskError, match="--context file not found: no/such/doc.txt"):
        gp.main(["--checkpoint_path", str(ckpt), "--context", "no/such/doc.txt", "--prompt", "Hi"])
    with pytest.raises(BriskError, match="--prompts_file"):
        gp.main(["--checkpoint_path", str(ckpt), "--prompts_file", str(tmp_path / "none.txt")])


@pytest.mark.parametrize("value, path", [("doc.txt", True), ("notes/q3", True), ("model.pth", True),
                                         ("Once upon a time.", False), ("Hello", False),
                                         ("v1.5", False)])
def test_context_text_is_told_from_a_path_by_its_shape(value, path):
    assert looks_like_path(value) == path


def run_prefill(ckpt: Path, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "generate_prefill.py"), "--checkpoint_path", str(ckpt),
           "--device", "cpu", "--dtype", "float32", "--temperature", "0", "--max_new_tokens", "4",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_cli_reuses_the_context_within_a_run_and_across_runs(ckpt, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text("The quick brown fox jumps over the lazy dog. Once upon a time there was a little model")
    args = ["--context", context, "--prompt", " that generated", "--prompt", " tokens very fast",
            "--cache_file", tmp_path / "c.pt"]
    first = run_prefill(ckpt, *args, "--json", tmp_path / "1.json")
    assert first.returncode == 0, first.stderr
    second = run_prefill(ckpt, *args, "--json", tmp_path / "2.json", "--compile")
    assert second.returncode == 0, second.stderr
    runs = [json.loads((tmp_path / f"{i}.json").read_text()) for i in (1, 2)]
    # compiled before the first prompt, which then restores the cached context over what the warm-up
    # wrote; or saved by an earlier run (a warm start), loaded at the first decode step without a
    # warm-up
    warm = "decode step is saved" in second.stderr
    assert warm or ("compiled in" in second.stderr and runs[1]["config"]["compile_s"] > 0)
    n = runs[0]["config"]["context_tokens"]
    assert [p["cached_tokens"] for p in runs[0]["prompts"]] == [0, n]
    # the new process loaded the cache file
    assert [p["cached_tokens"] for p in runs[1]["prompts"]] == [n, n]
    assert runs[0]["summary"]["speedup"] is not None and "x faster" in first.stderr
    # greedy text is the same, cached or not, compiled or eager
    assert first.stdout == second.stdout


@pytest.mark.slow
def test_cli_interactive_turns_reuse_the_conversation(ckpt, tmp_path):
    cmd = [sys.executable, str(ROOT / "generate_prefill.py"), "--checkpoint_path", str(ckpt),
           "--device", "cpu", "--dtype", "float32", "--temperature", "0", "--max_new_tokens", "3",
           "--interactive", "--json", str(tmp_path / "chat.json")]
    proc = subprocess.run(cmd, input="hello there\nand again\n", capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    turns = json.loads((tmp_path / "chat.json").read_text())["prompts"]
    assert turns[0]["cached_tokens"] == 0
    assert turns[1]["cached_tokens"] >= turns[0]["prompt_tokens"]  # the first turn (and as much of the reply as
    # encodes to the same tokens again)


def test_cli_with_a_draft_prints_the_text_of_no_draft_and_of_generate_py(ckpt, tmp_path, capsys):
    """The target as its own draft: every draft token is accepted, also after the second prompt's
    cached prefix."""
    texts = ["The quick brown fox", "The quick brown fox jumps over"]
    flags = ["--checkpoint_path", str(ckpt), "--device", "cpu", "--dtype", "float32",
             "--temperature", "0", "--max_new_tokens", "12"]
    prompts = [a for t in texts for a in ("--prompt", t)]
    gp.main([*flags, *prompts, "--draft_checkpoint_path", str(ckpt), "--speculate_k", "3",
             "--json", str(tmp_path / "draft.json")])
    with_draft = capsys.readouterr()
    gp.main([*flags, *prompts])
    assert capsys.readouterr().out == with_draft.out
    for text in texts:
        gen.main([*flags, "--prompt", text])
        assert f"> {text}\n{capsys.readouterr().out[len(text):]}" in with_draft.out

    report = json.loads((tmp_path / "draft.json").read_text())
    assert report["config"]["cached_models"] == 2 and report["config"]["speculate_k"] == 3
    first, second = report["prompts"]
    assert first["cached_tokens"] == 0 < second["cached_tokens"]
    for p in (first, second):
        assert p["acceptance_rate"] == 1.0 and p["verifications"] > 0
    assert with_draft.err.count("(each for the target and the draft)") == 2
    assert with_draft.err.count("speculation: acceptance rate 1.00") == 2


def corrupt(path: Path, ckpt: Path) -> None:
    path.write_bytes(b"PK\x03\x04 not really a zip")


def foreign(path: Path, ckpt: Path) -> None:
    other = make_checkpoint(path.parent / "other", tokenizer=False, n_layer=1)
    model = tiny(other)
    new_cache(model, other).save(path)


@pytest.mark.slow
@pytest.mark.parametrize("make, args, message", [
    (corrupt, [], "cannot read cache file"),
    (foreign, [], "another model"),
    (foreign, ["--dtype", "bfloat16"], "holds float32 keys/values, this run uses bfloat16"),
    (None, ["--max_seq_length", "8"], "the context has"),
])
def test_cli_bad_input_is_one_line_and_the_cache_file_is_kept(ckpt, tmp_path, make, args, message):
    cache_file = tmp_path / "c.pt"
    if make is not None:
        make(cache_file, ckpt)
    before = cache_file.read_bytes() if make else None
    proc = run_prefill(ckpt, "--context", "The quick brown fox jumps over the lazy dog.",
                       "--prompt", " Once", "--cache_file", cache_file, *args)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (cache_file.read_bytes() == before) if make else not cache_file.exists()
    assert not cache_file.with_name("c.pt.tmp").exists()


# --------------------------------------------------------------------------------------------------
# Under torchrun: each rank caches its own part of the keys/values


def test_two_processes_print_the_single_process_text_and_reuse_their_own_cache_files(ckpt, tmp_path, capsys):
    args = ["--checkpoint_path", ckpt, "--device", "cpu", "--dtype", "float32", "--temperature", 0,
            "--max_new_tokens", 6, "--context",
            "The quick brown fox jumps over the lazy dog. Once upon a time",
            "--prompt", " there was", "--prompt", " a little model"]
    gp.main([*map(str, args), "--json", str(tmp_path / "alone.json")])
    alone = capsys.readouterr().out
    n = json.loads((tmp_path / "alone.json").read_text())["config"]["context_tokens"]
    # the target as its own draft, split like it: all its tokens are accepted only if its restored
    # cache is right
    draft = ["--draft_checkpoint_path", ckpt, "--speculate_k", 2]
    # the second run loads each rank's file of the first
    for run, hits in [(1, [0, n]), (2, [n, n])]:
        split = torchrun(2, *args, *draft, "--cache_file", tmp_path / "c.pt", "--json",
                         tmp_path / f"{run}.json", script=ROOT / "generate_prefill.py")
        assert split.returncode == 0, split.stderr[-3000:]
        assert split.stdout == alone
        prompts = json.loads((tmp_path / f"{run}.json").read_text())["prompts"]
        assert [p["cached_tokens"] for p in prompts] == hits
        assert [p["acceptance_rate"] for p in prompts] == [1.0, 1.0]
    assert sorted(f.name for f in tmp_path.glob("c.*")) == ["c.rank0-of-2.pt", "c.rank1-of-2.pt"]

    with pytest.raises(BriskError,
                       match="was made by rank 0 of 2 processes, this is a single process"):
        gp.main([*map(str, args + draft), "--cache_file", str(tmp_path / "c.rank0-of-2.pt")])
    (tmp_path / "c.rank1-of-2.pt").unlink()  # rank 1 would prefill what rank 0 restores: refused
    split = torchrun(2, *args, *draft, "--cache_file", tmp_path / "c.pt",
                     script=ROOT / "generate_prefill.py")
    assert split.returncode != 0 and "error: the ranks' cache files hold different prefixes" in split.stderr


def test_interactive_is_refused_under_torchrun(ckpt, monkeypatch):
    monkeypatch.setattr(tp, "maybe_init_dist", lambda timeout_s=None: (0, 2))  # as rank 0 of 2
    with pytest.raises(BriskError, match="--interactive reads stdin in a single process; run it "
                                         "without torchrun"):
        gp.main(["--checkpoint_path", str(ckpt), "--interactive"])
