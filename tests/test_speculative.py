"""speculative.py: the acceptance rule is unbiased, and greedy speculative decoding with each
proposer (a draft model, the target quantized to int4, prompt lookup) gives exactly the tokens of
plain greedy decoding."""
import argparse
import json
import shutil
import subprocess
import sys

import pytest
import torch

import cpu
import engine
import generate as gen
import quantize
import speculative as spec
from conftest import ROOT, make_checkpoint
from helpers import chi_square, noisy_copy
from checkpoint import CONFIG_NAME, load_config, load_model
from cli import BriskError, run_cli
from sampling import logits_to_probs
from tokenizer import load_tokenizer

PROMPTS = [[5, 17, 42, 99, 7, 250, 3], [1, 2, 3, 1, 2, 3, 1, 2], [300, 8, 8, 8, 64, 19]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run thousands of small forward passes: a second thread costs more than it
    brings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loaded(path, max_seq_length: int = 96, device="cpu", dtype=torch.float32):
    model = load_model(path, device, dtype)
    model.setup_caches(1, max_seq_length)
    return model


def greedy(model, prompt, n: int, speculator=None, **kwargs) -> list:
    prompt = torch.tensor(prompt, device=model.norm.weight.device)
    rows, _ = engine.generate(model, prompt, n, temperature=0.0, speculator=speculator, **kwargs)
    return rows[0]


@pytest.fixture
def fp32_device(device, dtype):
    """The test device; these tests run in fp32 only, where speculation gives plain greedy's tokens
    exactly on every device (in bf16 only where brisk's CPU kernel computes every product: the bf16
    tests below)."""
    if dtype != torch.float32:
        pytest.skip("exact only in float32")
    return device


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny target and a smaller draft with other random weights and the same tokenizer."""
    d = tmp_path_factory.mktemp("pair")
    target = make_checkpoint(d / "target", seed=0)
    draft = make_checkpoint(d / "draft", seed=1, n_layer=1, dim=32, n_head=2, n_local_heads=1,
                            intermediate_size=64)
    return target, draft


@pytest.fixture(scope="module")
def noisy_draft(pair, tmp_path_factory):
    return noisy_copy(pair[0], tmp_path_factory.mktemp("noisy"))


# --------------------------------------------------------------------------------------------------
# The acceptance rule


def test_greedy_acceptance_keeps_the_draft_up_to_the_first_disagreement():
    V = 10
    # the target's argmaxes, k = 3
    p = torch.nn.functional.one_hot(torch.tensor([4, 7, 1, 2]), V).float()
    for draft, want in [([4, 7, 1], [4, 7, 1, 2]), ([4, 7, 9], [4, 7, 1]), ([3, 7, 1], [4])]:
        d = torch.tensor(draft)
        q = torch.nn.functional.one_hot(d, V).float()
        assert spec.accept(d, q, p, greedy=True).tolist() == want


def first_tokens(p: torch.Tensor, q: torch.Tensor, trials: int,
                 deterministic: bool = False) -> torch.Tensor:
    """The first token of `trials` verifications of k draft tokens drawn from q [k, V] against p [k
    + 1, V]."""
    out = []
    for _ in range(trials):
        if deterministic:  # the proposal is always the argmax of q, and q is taken as one-hot
            draft = q.argmax(-1)
            qq = torch.nn.functional.one_hot(draft, q.size(-1)).float()
        else:
            draft, qq = torch.multinomial(q, 1).view(-1), q
        out.append(int(spec.accept(draft, qq, p)[0]))
    return torch.tensor(out)


CHI2_BOUND = 30.0  # 7 degrees of freedom at most: P(chi2 > 30) < 1e-4 when the distributions agree


@pytest.mark.parametrize("case", ["similar", "opposite", "draft_misses_tokens", "one_hot_draft"])
def test_the_first_token_follows_the_target_distribution(case):
    torch.manual_seed(0)
    V, k = 8, 3
    p = torch.softmax(torch.randn(k + 1, V) * 1.5, -1)
    if case == "similar":
        q = torch.softmax(p[:k].log() + 0.3 * torch.randn(k, V), -1)
    elif case == "opposite":  # the draft prefers what the target finds least likely
        q = torch.softmax(-3 * p[:k].log(), -1)
    elif case == "draft_misses_tokens":
        # the draft never proposes the target's four most likely tokens
        q = p[:k].scatter(1, p[:k].topk(4).indices, 0)
        q = q / q.sum(-1, keepdim=True)
    else:
        q = torch.softmax(torch.randn(k, V), -1)
    tokens = first_tokens(p, q, 3000, deterministic=case == "one_hot_draft")
    assert chi_square(tokens, p[0]) < CHI2_BOUND
    # far apart (total variation), so that taking the draft's tokens would show
    if case != "similar":
        proposal = torch.nn.functional.one_hot(q[0].argmax(), V).float() if case == "one_hot_draft" else q[0]
        assert (proposal - p[0]).abs().sum() / 2 > 0.2


def test_a_draft_with_a_larger_padded_vocabulary_never_yields_tokens_outside_the_target():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 6), -1)  # k = 2, V = 6
    q = torch.full((2, 8), 1 / 8)  # the draft proposes ids 6 and 7 too
    tokens = first_tokens(p, q, 3000)
    assert tokens.max() < 6 and chi_square(tokens, p[0]) < CHI2_BOUND


def test_sampled_speculation_with_real_models_follows_the_target(tmp_path):
    """A tiny vocabulary of 8; the first token after the prefill comes from a verification whose
    draft was sampled from a different random model, with temperature and top-k processing both
    distributions."""
    target = loaded(make_checkpoint(tmp_path / "t", seed=0, tokenizer=False, vocab_size=8,
                                    n_layer=1), 32)
    draft = loaded(make_checkpoint(tmp_path / "d", seed=3, tokenizer=False, vocab_size=8,
                                   n_layer=1), 32)
    sampling = dict(temperature=1.3, top_k=6)
    prompt = torch.tensor([1, 5, 2, 7])
    pos = torch.arange(4)
    speculator = spec.Speculator(spec.DraftModel(draft), k=2)
    with torch.no_grad():
        target(prompt[None, :3], pos[:3])
        # the draft reads the same; prompt[3] is the token just taken
        speculator.prefill(prompt[:3])
        want = logits_to_probs(target(prompt[None, 3:], pos[3:])[:, -1], **sampling)[0]
        p_draft = logits_to_probs(draft(prompt[None, 3:], pos[3:])[:, -1], **sampling)[0]
        torch.manual_seed(0)
        tokens = [int(next(speculator.decode(target, prompt[None, 3:], pos[3:], 1,
                                             **sampling))[0, 0])
                  for _ in range(1000)]  # every trial rewrites the same cache positions
    assert chi_square(torch.tensor(tokens), want) < CHI2_BOUND
    assert (want - p_draft).abs().sum() / 2 > 0.2  # far apart: taking the draft's tokens would show
    assert speculator.stats["verifications"] == 1000 and 0 < speculator.stats["accepted"] < 1000 * 2


# --------------------------------------------------------------------------------------------------
# Greedy speculative decoding is plain greedy decoding


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("kind", ["smaller", "noisy"])
def test_a_draft_model_gives_the_plain_greedy_tokens(pair, noisy_draft, kind, k, fp32_device):
    target = loaded(pair[0], device=fp32_device)
    draft = loaded(pair[1] if kind == "smaller" else noisy_draft, device=fp32_device)
    speculator = spec.Speculator(spec.DraftModel(draft), k)
    verifications = accepted = 0
    for prompt in PROMPTS:
        plain = greedy(target, prompt, 40)
        assert greedy(target, prompt, 40, speculator) == plain
        verifications += speculator.stats["verifications"]
        accepted += speculator.stats["accepted"]
    if kind == "noisy":  # both outcomes happened: some draft tokens kept, some rejected
        assert 0 < accepted < k * verifications


def test_a_draft_model_gives_the_plain_greedy_tokens_in_bf16_too(pair, noisy_draft):
    """A verify pass's few-row products and attention reduce each row as a decode step does
    (cpu.FEW_ROWS), so the tokens are exact in bf16 as well, not only where rounding errors are too
    small to flip an argmax."""
    target = loaded(pair[0], dtype=torch.bfloat16)
    speculator = spec.Speculator(spec.DraftModel(loaded(noisy_draft, dtype=torch.bfloat16)), 4)
    for prompt in PROMPTS:
        assert greedy(target, prompt, 40, speculator) == greedy(target, prompt, 40)


def test_the_target_as_its_own_draft_accepts_everything_also_in_a_conversation(pair):
    target_path, _ = pair
    target, draft = loaded(target_path), loaded(target_path)  # two caches
    speculator = spec.Speculator(spec.DraftModel(draft), k=4)
    # the first token, then 4 verifications of 4 + 1 tokens
    first = greedy(target, PROMPTS[0], 21, speculator)
    assert speculator.stats == dict(verifications=4, accepted=16, plain_steps=0)
    # the next turn reuses both caches: they hold every position before the last token taken
    second = PROMPTS[0] + first[:-1] + [11, 12, 13]
    reused = greedy(target, second, 17, speculator, start_pos=len(PROMPTS[0]) + len(first) - 1)
    assert speculator.stats == dict(verifications=4, accepted=16, plain_steps=0)
    assert reused == greedy(loaded(target_path), second, 17)


def test_prompt_lookup_gives_the_plain_greedy_tokens(pair, fp32_device):
    target = loaded(pair[0], device=fp32_device)
    stats = dict(verifications=0, accepted=0)
    for n, k in [(1, 2), (3, 5), (2, 8)]:
        speculator = spec.Speculator(spec.PromptLookup(n), k)
        for prompt in PROMPTS:
            assert greedy(target, prompt, 50, speculator) == greedy(target, prompt, 50)
            for key in stats:
                stats[key] += speculator.stats[key]
    assert stats["verifications"] > 0 and stats["accepted"] > 0  # random models repeat themselves


def test_speculation_stops_at_the_cache_end_and_at_eos(pair):
    target, draft = loaded(pair[0], 30), loaded(pair[1], 30)
    speculator = spec.Speculator(spec.DraftModel(draft), k=5)
    prompt = PROMPTS[0]
    plain = greedy(target, prompt, 24)  # fills the cache exactly: positions 0..29
    assert greedy(target, prompt, 24, speculator) == plain
    assert speculator.stats["plain_steps"] > 0  # the last tokens had no room for a verify pass
    eos = plain[10]
    assert greedy(target, prompt, 24, speculator, eos_ids=[eos]) == plain[:plain.index(eos) + 1]


def test_lookup_proposes_what_followed_the_latest_longest_match():
    seq = [1, 2, 3, 9, 2, 3, 8, 7, 5, 2, 3]
    assert spec.lookup(seq, 2, 2) == [8, 7]  # (2, 3) last seen before 8 7
    assert spec.lookup(seq + [6], 2, 2) is None
    # n = 1: the latest 2 was followed by 5 1 2
    assert spec.lookup([4, 1, 2, 5, 1, 2], 1, 3) == [5, 1, 2]
    assert spec.lookup([7, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2], 3, 2) == [3, 4]
    # runs past the end: the copy continues itself
    assert spec.lookup([5, 6, 5, 6], 2, 5) == [5, 6, 5, 6, 5]


def test_an_int4_self_draft_of_the_real_model_gives_the_plain_greedy_tokens(real_checkpoint, tmp_path, capsys):
    target_path = tmp_path / "model.pth"
    target_path.symlink_to(real_checkpoint)
    shutil.copy(real_checkpoint.parent / CONFIG_NAME, tmp_path / CONFIG_NAME)
    speculator = spec.Speculation(target_path, 4, draft="int4").build(torch.device("cpu"),
                                                                      torch.float32, 64)
    assert (tmp_path / "model_int4.g32.pth").is_file() and "model_int4.g32.pth not found" in capsys.readouterr().err
    target = loaded(target_path, 64)
    prompt = load_tokenizer(real_checkpoint.parent).encode("The quick brown fox jumps over the")
    plain = greedy(target, prompt, 32)
    assert greedy(target, prompt, 32, speculator) == plain
    # a good draft
    assert speculator.stats["accepted"] / (4 * speculator.stats["verifications"]) > 0.5


@pytest.mark.slow
def test_compiled_speculation_gives_the_plain_greedy_tokens(pair, fp32_device):
    target_path, draft_path = pair
    speculation = spec.Speculation(target_path, 3, draft_checkpoint_path=draft_path)
    speculator = speculation.build(fp32_device, torch.float32, 96, compile=True)
    target = loaded(target_path, device=fp32_device)
    for prompt in PROMPTS[:2]:  # the second prompt replays the compiled code
        assert greedy(target, prompt, 30, speculator) == greedy(target, prompt, 30)


def test_the_draft_cache_holds_what_the_targets_holds(pair):
    """--kv_cache_dtype int8: engine.prepare gives the draft (Speculation.build) the target's int8
    KV cache, and speculation then gives the greedy tokens of the target alone with that cache."""
    target_path, draft_path = pair
    speculation = spec.Speculation(target_path, 3, draft_checkpoint_path=draft_path)
    e = engine.prepare(target_path, torch.device("cpu"), torch.float32, 1, 64,
                       speculation=speculation, kv_cache_dtype=torch.int8)
    draft = e.speculator.proposer.model
    assert [m.layers[0].attention.kv_cache.k_cache.dtype for m in (e.model, draft)] == [torch.int8, torch.int8]
    for prompt in PROMPTS[:2]:
        assert greedy(e.model, prompt, 24, e.speculator) == greedy(e.model, prompt, 24)
    assert e.speculator.stats["verifications"] > 0


def logits(model, x, input_pos, attend_len=None):
    return model(x, input_pos, attend_len=attend_len)  # [B, T, V]


@pytest.mark.slow
@pytest.mark.skipif(cpu.kernel_isa() == 0, reason="the CPU has no AVX2 (or no compiler)")
def test_a_compiled_bf16_verify_pass_gives_its_decode_steps_logits_bitwise(pair):
    """Where brisk's kernel computes every product, a compiled verify pass of k + 1 tokens reduces
    each row as a compiled decode step does, and Inductor keeps each bf16 rounding that eager code
    makes (it would drop those inside a fusion, differently per graph shape): greedy speculative
    decoding is exact in bf16, compiled too."""
    model = loaded(pair[0], dtype=torch.bfloat16)
    assert cpu.two_rows_cost_one(model)
    step = engine.compile_step(logits, torch.device("cpu"))
    prompt, tokens = torch.tensor([PROMPTS[0]]), torch.tensor([[9, 250, 31, 4, 77]])
    model(prompt, torch.arange(prompt.shape[1]))
    start = prompt.shape[1]
    attend_len = model.attend_len(start + tokens.shape[1] - 1)
    steps = [step(model, tokens[:, i:i + 1], torch.tensor([start + i]), attend_len=attend_len)
             for i in range(tokens.shape[1])]
    verified = step(model, tokens, torch.arange(start, start + tokens.shape[1]),
                    attend_len=attend_len)
    assert torch.equal(verified, torch.cat(steps, dim=1))


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_reports_acceptance_in_json(pair, tmp_path, capsys):
    out = tmp_path / "figures.json"
    gen.main(["--device", "cpu", "--dtype", "float32", "--checkpoint_path", str(pair[0]),
              "--draft_checkpoint_path", str(pair[1]), "--speculate_k", "3", "--temperature", "0",
              "--max_new_tokens", "20", "--num_samples", "2",
              "--prompt", "The quick brown fox", "--json", str(out)])
    report = json.loads(out.read_text())
    assert (report["config"]["speculate_k"],
            report["config"]["draft_checkpoint"]) == (3, str(pair[1]))
    for s in report["samples"] + [report["summary"]]:
        assert 0 <= s["acceptance_rate"] <= 1 and s["verifications"] > 0 and s["decode_tokens_per_s"] > 0
        assert s["accepted_per_verification"] == pytest.approx(3 * s["acceptance_rate"])
    assert "summary: speculation: acceptance rate" in capsys.readouterr().err


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("other") / "draft", seed=1, vocab_size=300)


def test_a_draft_with_another_vocabulary_is_one_error_line_before_loading(pair, other_vocabulary):
    cmd = [sys.executable, str(ROOT / "generate.py"), "--device", "cpu", "--checkpoint_path",
           str(pair[0]), "--draft_checkpoint_path", str(other_vocabulary)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: the draft {other_vocabulary} and the target {pair[0]} have "
                                        "different vocabularies (compared their tokenizer.json)"]


@pytest.mark.parametrize("args, message", [
    (["--prompt_lookup", "2", "--speculate_k", "0"], "--speculate_k must be at least 1"),
    (["--prompt_lookup", "0"], "--prompt_lookup must be at least 1"),
    (["--draft_checkpoint_path", "nowhere/model.pth"],
     "draft checkpoint not found: nowhere/model.pth"),
    (["--draft", "int4", "--prompt_lookup", "2"],
     "choose one proposer: --draft or --prompt_lookup"),
    (["--prompt_lookup", "2", "--batch_size", "2"],
     "one sequence at a time; leave out --batch_size"),
    (["--speculate_k", "3"],
     "--speculate_k needs --draft_checkpoint_path, --draft or --prompt_lookup"),
])
def test_bad_speculation_input_is_rejected_before_loading(pair, capsys, monkeypatch, args, message):
    monkeypatch.setattr(engine, "load_model", lambda *a,
                        **kw: pytest.fail("loaded a model despite bad input"))
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: gen.main(["--checkpoint_path", str(pair[0]), *args]))
    assert exit.value.code.startswith("error: ") and message in exit.value.code
    assert "\n" not in exit.value.code and capsys.readouterr().err == ""


def test_a_draft_without_tokenizer_cannot_be_checked(pair, tmp_path):
    draft = make_checkpoint(tmp_path / "bare", tokenizer=False)
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: gen.main(["--checkpoint_path", str(pair[0]), "--draft_checkpoint_path",
                                  str(draft)]))
    assert "cannot check that the draft shares the target's vocabulary" in exit.value.code


def test_a_self_draft_is_made_from_the_float_model_only(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path / "q")
    quantize.main(["--checkpoint_path", str(path), "--mode", "int4"])
    int4 = path.with_name("model_int4.g32.pth")
    monkeypatch.setattr(engine, "load_model", lambda *a,
                        **kw: pytest.fail("loaded a model despite bad input"))
    for draft, message in [("int4", f"{int4} is that model already"),
                           ("int8", f"{int4} is quantized")]:
        with pytest.raises(SystemExit) as exit:
            run_cli(lambda: gen.main(["--checkpoint_path", str(int4), "--draft", draft]))
        assert message in exit.value.code


def test_a_self_draft_across_processes_must_split_like_the_target(tmp_path, monkeypatch):
    """Under torchrun the self-draft is split like the target: int4 groups of 32 must fit a rank's
    share of wo's 64 / 4 = 16 inputs (refused, before loading); int8 has no groups. A missing file
    is written by rank 0, which processes on other machines would not see."""
    # dim 64
    path = make_checkpoint(tmp_path / "t", n_head=4, n_local_heads=4, intermediate_size=128)
    config = load_config(path)

    def check(draft: str, world: int) -> None:
        args = argparse.Namespace(checkpoint_path=path, draft=draft, draft_checkpoint_path=None,
                                  prompt_lookup=None, speculate_k=None)
        spec.speculation(args, config, config.vocab_size, world)

    check("int4", 2)  # 32 inputs of wo per rank
    check("int8", 4)
    with pytest.raises(BriskError, match=r"^--draft int4 across 4 processes: cannot split int4 group "
                                         r"size 32 across 4 processes: attention.wo would have 16 "
                                         r"inputs per process; use --draft int8 or fewer processes$"):
        check("int4", 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 machines of 2 processes
    with pytest.raises(BriskError,
                       match="model_int8.pth is missing; on several machines make it first"):
        check("int8", 4)
