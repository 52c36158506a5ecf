"""Tensor parallelism (tp.py) in real processes: torchrun starts 2 or 3 CPU ranks talking over gloo,
each running tests/tp_driver.py, whose greedy decoding must match a single process's."""
from types import SimpleNamespace

import pytest
import torch

import tp
from conftest import ROOT, make_checkpoint
from helpers import noisy_copy, quantized, run_and_compare, torchrun
from cli import BriskError
from model import ModelArgs

# 6 query heads in 3 GQA groups: splits across 3 processes (and dim 96 / 3 keeps int4's groups of 32
# whole)
TINY3 = dict(n_head=6, n_local_heads=3, dim=96, intermediate_size=192, qkv_bias=True)


def test_two_processes_match_one_float_int8_int4(tmp_path):
    """Split while loading (load_model's transform). int4 splits only between whole groups: with
    groups of 64, wo's 64 inputs cannot be split in two."""
    f = make_checkpoint(tmp_path / "tiny", tokenizer=False)
    g64 = quantized(f, {"mode": "int4", "groupsize": 64})
    checkpoints = [f, quantized(f, {"mode": "int8"}),
                   quantized(f, {"mode": "int4", "groupsize": 32}), g64]
    refused = run_and_compare(2, tmp_path, checkpoints)
    assert refused == {g64: "cannot split int4 group size 64 across 2 processes: attention.wo would have 32 inputs "
                            "per process"}


def test_three_processes_match_one_after_loading(tmp_path):
    """A loaded model split in place, with q/k/v biases (Qwen2) and GQA groups split across 3
    processes; a model whose heads 3 does not divide is refused."""
    f = make_checkpoint(tmp_path / "tiny3", tokenizer=False, **TINY3)
    g = make_checkpoint(tmp_path / "tiny", tokenizer=False)
    refused = run_and_compare(3, tmp_path, [f, quantized(f, {"mode": "int8"}), g], "--loaded")
    assert refused == {g: "cannot split the model across 3 processes: n_head 4, n_local_heads 2, "
                       "intermediate_size 128 not divisible by 3 (possible: 1, 2)"}


@pytest.mark.slow
def test_compiled_decode_matches_one_process(tmp_path):
    """The all-reduces trace into the compiled graph (fullgraph=True: no graph break)."""
    refused = run_and_compare(2, tmp_path, [make_checkpoint(tmp_path / "tiny", tokenizer=False)],
                              "--compile")
    assert not refused, f"the driver decoded nothing to compare: {refused}"


def test_generate_under_torchrun_prints_the_single_process_text_once(tmp_path, capsys):
    import generate
    f = make_checkpoint(tmp_path / "tiny")
    args = ["--checkpoint_path", f, "--device", "cpu", "--dtype", "float32", "--prompt",
            "Once upon a time", "--max_new_tokens", 12, "--temperature", 0.8, "--seed", 1]
    generate.main(list(map(str, args)))
    alone = capsys.readouterr().out
    split = torchrun(2, *args, script=ROOT / "generate.py")
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == alone
    assert split.stderr.count("summary (one sample") == 1


# --------------------------------------------------------------------------------------------------
# Speculative decoding (speculative.py) under torchrun


@pytest.fixture(scope="module")
def speculated(tmp_path_factory):
    """One torchrun of 2 ranks decoding 24 tokens of a tiny target with each proposer, greedy and
    sampled. Drafts: a smaller model whose 3 heads cannot be split in two (each rank runs all of
    it), and the target with noise on its weights, split like the target (it agrees with the target
    often, not always)."""
    d = tmp_path_factory.mktemp("speculated")
    target = make_checkpoint(d / "target")
    small = make_checkpoint(d / "small", seed=1, n_layer=1, dim=48, n_head=3, n_local_heads=1,
                            intermediate_size=64)
    noisy = noisy_copy(target, d / "noisy", noise=0.02)
    greedy = [f"--draft_checkpoint_path {small} --speculate_k 3",
              f"--draft_checkpoint_path {noisy}", "--draft int8",
              "--draft int4 --speculate_k 4", "--prompt_lookup 2 --speculate_k 3"]
    sampled = [f"--draft_checkpoint_path {noisy} --temperature 0.8 --seed 3",
               "--draft int4 --temperature 0.8 --seed 3",
               f"--draft_checkpoint_path {small} --temperature 0.8 --seed 3"]
    out = d / "tp.pt"
    r = torchrun(2, "--out", out, "--steps", 24, *[f"--speculate={s}" for s in greedy + sampled],
                 target)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {flags: got for (_, flags), got in torch.load(out).items()}
    return SimpleNamespace(target=target, small=small, noisy=noisy, greedy=greedy, sampled=sampled,
                           results=results, stderr=r.stderr)


def test_speculative_greedy_on_two_processes_is_plain_greedy_in_one(speculated):
    """Every proposer, every rank: the tokens of single-process plain greedy decoding, token for
    token."""
    from tp_driver import decode
    plain = decode(speculated.target, steps=24)["tokens"]
    for flags in speculated.greedy:
        got = speculated.results[flags]
        assert got["tokens"] == [plain, plain], flags
        assert got["stats"]["verifications"] > 0, flags
    stats = speculated.results[f"--draft_checkpoint_path {speculated.noisy}"]["stats"]
    # kept some draft tokens, rejected others
    assert 0 < stats["accepted"] < 5 * stats["verifications"]


def test_sampled_speculation_keeps_the_two_processes_in_step(speculated):
    """Sampling (temperature 0.8): both ranks draw the same drafts, uniforms and replacements, so
    they take the same tokens; the noisy draft both kept and rejected tokens, so both branches of
    the acceptance test ran."""
    for flags in speculated.sampled:
        rank0, rank1 = speculated.results[flags]["tokens"]
        assert len(rank0) == 24 and rank0 == rank1, flags
    stats = speculated.results[speculated.sampled[0]]["stats"]
    assert 0 < stats["accepted"] < stats["verifications"] * 5


def test_a_draft_is_split_when_it_can_be_else_replicated_and_a_self_draft_is_written_once(speculated):
    """The small draft, in 2 configurations, is noted once in each (only rank 0 prints); the noisy
    draft, split, is not. Rank 0 alone wrote each self-draft, once, for the first configuration that
    needed it."""
    err = speculated.stderr
    assert err.count(f"the draft {speculated.small} runs whole on each of the 2 processes, not split: cannot split "
                     "the model across 2 processes: n_head 3 not divisible by 2 (possible: 1)") == 2
    assert f"the draft {speculated.noisy} runs whole" not in err
    for name in ("model_int8.pth", "model_int4.g32.pth"):
        assert (speculated.target.parent / name).is_file()
        assert err.count(f"{name} not found: writing it") == 1


def test_generate_py_speculates_under_torchrun(speculated, capsys):
    """The command line: torchrun generate.py with a draft prints single-process plain greedy text,
    once."""
    import generate
    args = ["--checkpoint_path", speculated.target, "--device", "cpu", "--dtype", "float32",
            "--prompt", "Once upon a time", "--max_new_tokens", 16, "--temperature", 0]
    generate.main(list(map(str, args)))
    alone = capsys.readouterr().out
    split = torchrun(2, *args, "--draft_checkpoint_path", speculated.noisy,
                     script=ROOT / "generate.py")
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == alone
    assert split.stderr.count("summary: speculation: acceptance rate") == 1


def test_check_divisible():
    config = ModelArgs(**{**dict(n_layer=1, vocab_size=32), **TINY3})
    for n in (1, 3):
        tp.check_divisible(config, n)
    with pytest.raises(BriskError,
                       match=r"n_head 6, n_local_heads 3 not divisible by 4 \(possible: 1, 3\)"):
        tp.check_divisible(config, 4)


def test_a_stalled_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    """Rank 1 stops answering after 2 steps: rank 0's all-reduce gives up after --dist_timeout and
    exits, and torchrun then ends rank 1 (without the timeout, rank 0 would wait for half an
    hour)."""
    f = make_checkpoint(tmp_path / "tiny", tokenizer=False)
    r = torchrun(2, "--out", tmp_path / "tp.pt", "--dist_timeout", 3, "--stall_after", 2, f,
                 timeout=90)
    assert r.returncode != 0
    assert "Timed out" in r.stderr


def test_a_crashed_rank_makes_the_others_fail(tmp_path):
    f = make_checkpoint(tmp_path / "tiny", tokenizer=False)
    r = torchrun(2, "--out", tmp_path / "tp.pt", "--dist_timeout", 30, "--crash_after", 2, f,
                 timeout=90)
    assert r.returncode != 0
    assert "exitcode  : 3" in r.stderr
    assert not (tmp_path / "tp.pt").exists()
