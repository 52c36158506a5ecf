"""bench.py and eval.py: benchmark figures that agree with each other, perplexity equal to
transformers' on the same weights and text, and the lm-evaluation-harness adapter on a model that
continues a sentence with certainty."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bench
import eval as brisk_eval
from conftest import make_checkpoint, write_tiny_tokenizer
from helpers import hf_perplexity, noisy_copy
from checkpoint import load_model
from cli import BriskError
from scripts import convert_hf_checkpoint as convert_hf
from tokenizer import load_tokenizer

# each word of it is a distinct token of the tiny tokenizer
SENTENCE = "the quick brown fox jumps over a lazy dog. "
HF_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=320, max_position_embeddings=256,
               rms_norm_eps=1e-5, rope_theta=10000.0)


def hf_checkpoint(directory: Path):
    """A tiny random transformers Llama saved to `directory` and converted to ours; returns it, in
    fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF_TINY)).eval()
    # wider than the default init, so that the text is far from uniformly likely
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(directory)
    write_tiny_tokenizer(directory, HF_TINY["vocab_size"])
    convert_hf.convert(directory)
    return model


def repeating_checkpoint(directory: Path, text: str) -> Path:
    """Weights that continue `text` with certainty: a bigram table over its tokens, each of which
    must always be followed by the same token. Attention and feed-forward outputs are zero, so the
    residual stream is the token's embedding, a one-hot vector e_i per token of the text; RMSNorm
    scales it to sqrt(dim) e_i and the head row of the token that follows has 10 e_i, a logit of 10
    sqrt(dim) against 0 for every other token."""
    path = make_checkpoint(directory)
    ids = load_tokenizer(directory).encode(text)
    follows = dict(zip(ids, ids[1:]))
    assert all(follows[a] == b for a, b in zip(ids, ids[1:])), "a token of the text has two successors"
    sd = torch.load(path, weights_only=True)
    dim = sd["norm.weight"].numel()
    emb, head = sd["tok_embeddings.weight"], sd["output.weight"]
    head.zero_()
    for i, (token, successor) in enumerate(follows.items()):
        emb[token] = torch.nn.functional.one_hot(torch.tensor(i), dim).float()
        head[successor, i] = 10.0
    for name, t in sd.items():
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            t.zero_()
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def random_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("random_hf")
    return hf_checkpoint(d), d / "model.pth"


@pytest.fixture(scope="module")
def repeater(tmp_path_factory) -> Path:
    """A checkpoint that continues SENTENCE (repeated) with certainty."""
    return repeating_checkpoint(tmp_path_factory.mktemp("repeater"), (SENTENCE * 3).rstrip())


# --------------------------------------------------------------------------------------------------
# bench.py


def test_bench_figures_are_consistent(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    N = 6
    bench.main(["--checkpoint_path", str(ckpt), "--input-tokens", "4,9", "--batch-size", "1,2",
                "--max-new-tokens", str(N), "--num-iter", "2", "--warmup", "1", "--dtype",
                "float32", "--copy_gib", "0.05", "--json", str(out)])
    report = json.loads(out.read_text())
    results = report["results"]
    grid = [(r["input_tokens"], r["batch_size"]) for r in results]
    assert grid == [(4, 1), (4, 2), (9, 1), (9, 2)]
    config = load_model(ckpt, "cpu", torch.float32).config
    kv_per_token = bench.kv_bytes_per_token(config, torch.float32)
    for r in results:
        assert len(r["iterations"]) == 2 and r["compile_s"] is None
        for it in r["iterations"]:
            assert it["new_tokens"] == N and it["tokens_generated"] == N * r["batch_size"]
            assert it["decode_steps"] == N - 1
            assert it["next_token_p50_ms"] <= it["next_token_p90_ms"]
            assert it["decode_tokens_per_s"] == pytest.approx(it["decode_steps"] / it["decode_s"])
            # the per-token latencies add up to the decode time (the gaps are measured independently
            # of it)
            assert it["next_token_mean_ms"] * it["decode_steps"] / 1e3 == pytest.approx(it["decode_s"], abs=0.05)
            assert it["total_s"] == pytest.approx(it["ttft_s"] + it["decode_s"])
            kv = kv_per_token * r["batch_size"] * (r["input_tokens"] + N / 2)
            assert it["bandwidth_gb_s"] == pytest.approx((r["weight_bytes"] + kv) * it["decode_tokens_per_s"] / 1e9)
            assert it["bandwidth_pct"] == pytest.approx(
                100 * it["bandwidth_gb_s"] / report["environment"]["device_copy_gb_s"])
        for k, s in r["summary"].items():
            assert s["min"] <= s["median"] <= s["max"], k
        assert r["noisy"] == (r["spread"] > 1.15)
    table = capsys.readouterr().out
    assert table.count("| brisk | model.pth | float32 |") == 4


def test_bench_brisk_eager_runs_the_same_model_beside_brisk(tmp_path):
    """The brisk-eager peer (no --hf_model or --gguf needed) shares brisk's model and caches,
    uncompiled: beside --compile, what compiling gains."""
    ckpt = make_checkpoint(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    bench.main(["--checkpoint_path", str(ckpt), "--input-tokens", "5", "--batch-size", "2",
                "--max-new-tokens", "4", "--num-iter", "2", "--warmup", "1", "--dtype", "float32",
                "--copy_gib", "0.05", "--peers", "brisk-eager", "--json", str(out)])
    report = json.loads(out.read_text())
    brisk, eager = report["results"]
    assert (brisk["engine"], eager["engine"]) == ("brisk", "brisk-eager") and eager["compile"] is False
    assert eager["weight_bytes"] == brisk["weight_bytes"]
    assert [it["tokens_generated"] for it in eager["iterations"]] == [8, 8]
    assert [r["peer"] for r in report["ratios"]] == ["brisk-eager"]


def test_bench_peers_transformers_run_the_same_configuration(random_hf, tmp_path, capsys):
    """Eager and static cache + compile share one transformers model, taking turns in the timed
    rounds."""
    _, ckpt = random_hf
    out = tmp_path / "bench.json"
    bench.main(["--checkpoint_path", str(ckpt), "--input-tokens", "5", "--batch-size", "2",
                "--max-new-tokens", "4", "--num-iter", "2", "--warmup", "1", "--dtype", "float32",
                "--copy_gib", "0.05", "--peers", "transformers", "transformers-compile",
                "--hf_model", str(ckpt.parent), "--json", str(out)])
    report = json.loads(out.read_text())
    brisk, eager, compiled = report["results"]
    engines = (brisk["engine"], eager["engine"], compiled["engine"])
    assert engines == ("brisk", "transformers", "transformers-compile")
    for peer in (eager, compiled):
        for it in peer["iterations"]:
            assert (it["new_tokens"], it["tokens_generated"], it["decode_steps"]) == (4, 8, 3)
    assert compiled["compile_s"] > 0 and eager["compile_s"] is None
    ratios = {r["peer"]: r["decode_speedup"] for r in report["ratios"]}
    assert ratios["transformers"] == pytest.approx(
        brisk["summary"]["decode_tokens_per_s"]["median"] / eager["summary"]["decode_tokens_per_s"]["median"])
    assert "| transformers-compile |" in capsys.readouterr().out


def test_bench_times_engines_in_rounds_after_each_warms_up():
    """Warm-ups first, engine by engine; then one timed iteration per engine per round, so slow
    drift of a shared machine reaches every engine alike. An engine that skips the configuration is
    left out of the rounds."""
    calls = []

    class Fake:
        compiles, weights, checkpoint, dtype = False, 1, "ckpt", "float32"

        def __init__(self, name, skip=None):
            self.name, self.skip = name, skip

        def prepare(self, batch_size, max_seq_length):
            calls.append(f"prepare {self.name}")
            return self.skip

        def once(self, prompt, batch_size, max_new_tokens):
            calls.append(self.name)
            return dict(total_s=1.0, decode_tokens_per_s=10.0, bandwidth_gb_s=None)

    results = bench.measure([Fake("a"), Fake("b"), Fake("c", skip="batch size 1 only")],
                            torch.arange(4), 1, 8, warmup=1, num_iter=3, device_gb_s=1.0,
                            noise=1.15)
    assert calls == ["prepare a", "a", "prepare b", "b", "prepare c"] + ["a", "b"] * 3
    assert [r["engine"] for r in results] == ["a", "b", "c"]
    assert [len(r.get("iterations", [])) for r in results] == [3, 3, 0] and results[2]["skipped"]


@pytest.mark.parametrize("proposer", ["draft", "prompt_lookup"])
def test_bench_speculation_reports_acceptance_beside_the_figures(proposer, tmp_path, capsys):
    """generate.py's speculation flags: greedy speculative decoding of exactly N tokens, whose
    next-token latency spreads each verification's time over the tokens it yielded."""
    ckpt = make_checkpoint(tmp_path / "tiny")
    flags = (["--draft_checkpoint_path", str(noisy_copy(ckpt, tmp_path / "noisy", noise=0.02)),
              "--speculate_k", "3"]
             if proposer == "draft" else ["--prompt_lookup", "2"])
    out = tmp_path / "bench.json"
    N = 12
    bench.main(["--checkpoint_path", str(ckpt), *flags, "--input-tokens", "8", "--max-new-tokens",
                str(N), "--num-iter", "2", "--warmup", "1", "--dtype", "float32", "--copy_gib",
                "0.05", "--json", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    k = 3 if proposer == "draft" else 5
    assert r["speculation"]["speculate_k"] == k and r["batch_size"] == 1
    for it in r["iterations"]:
        assert it["new_tokens"] == it["tokens_generated"] == N
        assert it["decode_steps"] == it["verifications"] + it["plain_steps"] and it["verifications"] > 0
        # each verification yields its accepted draft tokens and one of the target's (the last may
        # be cut at N)
        assert N - 1 <= it["decode_steps"] + it["accepted_per_verification"] * it["verifications"] < N - 1 + k
        assert 0 <= it["acceptance_rate"] <= 1
        assert it["accepted_per_verification"] == pytest.approx(k * it["acceptance_rate"])
        assert it["decode_tokens_per_s"] == pytest.approx((N - 1) / it["decode_s"])
        # the gaps cover the decode time; the first may also hold the draft's prefill, which TTFT counts
        gaps = it["next_token_mean_ms"] * (N - 1) / 1e3
        assert it["decode_s"] - 0.02 <= gaps <= it["decode_s"] + it["ttft_s"]
    if proposer == "draft":  # the noisy draft is sometimes right, sometimes wrong
        assert 0 < r["summary"]["acceptance_rate"]["median"] < 1
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| brisk ("))
    cells = [c.strip() for c in row.split("|")]
    assert cells[11] == f"{r['summary']['acceptance_rate']['median']:.2f}"  # accept rate
    # accepted / verif.
    assert cells[12] == f"{r['summary']['accepted_per_verification']['median']:.2f}"


def test_latency_of_a_verification_is_spread_over_its_tokens():
    # prefill's token at 0 ms; a verification yields 3 tokens at 30 ms; a plain step 1 token at 40
    # ms
    stamps = [0.0, 0.030, 0.030, 0.030, 0.040]
    f = bench.latency_figures(stamps, [3, 1])
    assert f["next_token_mean_ms"] == pytest.approx(10.0) and f["next_token_p50_ms"] == pytest.approx(10.0)
    # token by token: 30, 0, 0, 10
    assert bench.latency_figures(stamps)["next_token_mean_ms"] == pytest.approx(10.0)
    assert bench.latency_figures(stamps)["next_token_p50_ms"] == pytest.approx(5.0)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], None),
    (["--input-tokens", "a,b"], None),
    (["--checkpoint_path", "missing/model.pth"], "checkpoint not found"),
    (["--prompt_lookup", "2", "--batch-size", "1,2"],
     "speculative decoding generates one sequence at a time"),
    (["--speculate_k", "3"],
     "--speculate_k needs --draft_checkpoint_path, --draft or --prompt_lookup"),
])
def test_bench_rejects_bad_arguments(argv, message, tiny_checkpoint):
    with pytest.raises((SystemExit, BriskError)) as e:
        bench.main(["--checkpoint_path", str(tiny_checkpoint), *argv])
    if message:
        assert message in str(e.value)


# --------------------------------------------------------------------------------------------------
# eval.py: perplexity


def test_perplexity_equals_transformers_on_the_same_weights(random_hf, tmp_path):
    model, ckpt = random_hf
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little model that generated tokens very fast. " * 3)
    ids = load_tokenizer(ckpt.parent).encode(text.read_text())
    assert len(ids) > 40  # several overlapping windows
    report = brisk_eval.main(["--checkpoint_path", str(ckpt), "--dtype", "float32", "--text_file",
                              str(text), "--max_seq_length", "24", "--stride", "10", "--json",
                              str(tmp_path / "ppl.json")])
    ours = report["perplexity"]["perplexity"]
    assert ours > 5  # a random model: far from 1, so agreement means something
    assert ours == pytest.approx(hf_perplexity(model, ids, 24, 10), rel=1e-4)
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"]["tokens"] == len(ids) - 1


def test_perplexity_of_a_text_the_model_continues_with_certainty_is_near_1(repeater, tmp_path):
    text = tmp_path / "repeat.txt"
    text.write_text((SENTENCE * 8).rstrip())
    report = brisk_eval.main(["--checkpoint_path", str(repeater), "--dtype", "float32",
                              "--text_file", str(text), "--max_seq_length", "32", "--stride", "16"])
    assert report["perplexity"]["tokens"] > 64  # several windows
    assert 1 <= report["perplexity"]["perplexity"] < 1.001


def test_eval_rejects_a_missing_text_file(repeater):
    with pytest.raises(BriskError, match="text file not found"):
        brisk_eval.main(["--checkpoint_path", str(repeater), "--text_file", "no/such.txt"])


# --------------------------------------------------------------------------------------------------
# eval.py: the lm-evaluation-harness adapter


def adapter(checkpoint: Path, max_length: int = 64) -> "brisk_eval.BriskLM":
    model = load_model(checkpoint, "cpu", torch.float32)
    return brisk_eval.BriskLM(model, load_tokenizer(checkpoint.parent), max_length, max_gen_toks=16,
                              progress=False)


def request(*args):
    return SimpleNamespace(args=args)  # what the adapter reads of an lm_eval Instance


def test_loglikelihood_prefers_the_learned_continuation(repeater):
    lm = adapter(repeater)
    (good, good_greedy), (bad, bad_greedy) = lm.loglikelihood([
        request("the quick brown fox", " jumps over"),
        request("the quick brown fox", " the lazy"),
    ])
    assert good_greedy and good > -0.3
    assert not bad_greedy and bad < good - 3


def test_generate_until_stops_at_the_stop_string(repeater):
    lm = adapter(repeater)
    (text,) = lm.generate_until([request(SENTENCE + "the quick",
                                         {"until": ["lazy"], "max_gen_toks": 12})])
    assert text == " brown fox jumps over a "


def test_loglikelihood_rolling_equals_transformers(random_hf):
    pytest.importorskip("lm_eval")  # the rolling windows are lm_eval's
    model, ckpt = random_hf
    lm = adapter(ckpt, max_length=64)
    text = "The quick brown fox jumps over the lazy dog."
    ids = load_tokenizer(ckpt.parent).encode(text, bos=False)
    assert len(ids) < 64  # one window: the whole text after the prefix token
    x = torch.tensor([[lm.prefix, *ids]])
    with torch.no_grad():
        logp = model(x).logits[0, :-1].log_softmax(-1)  # [T, V]
    expected = logp.gather(-1, x[0, 1:, None]).sum().item()
    (ours,) = lm.loglikelihood_rolling([request(text)])
    assert ours == pytest.approx(expected, rel=1e-4)
    # windows shorter than the text split it; the sum stays a log-likelihood of every token exactly
    # once
    (split,) = adapter(ckpt, max_length=8).loglikelihood_rolling([request(text)])
    assert split < 0 and split != pytest.approx(ours, rel=1e-6)


TASK = """task: repeat_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_lm_eval_runs_a_local_task_through_the_adapter(repeater, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    words = SENTENCE.split()
    # lm_eval puts a space between the context and each choice
    docs = [dict(context=" ".join(words[:i]), choices=[words[i], words[i - 1] + "s"], answer=0)
            for i in (2, 4, 6)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "repeat_choice.yaml").write_text(TASK.format(data=data))
    report = brisk_eval.main(["--checkpoint_path", str(repeater), "--dtype", "float32", "--tasks",
                              "repeat_choice", "--include_path", str(tasks), "--json",
                              str(tmp_path / "tasks.json")])
    assert "perplexity" not in report
    assert report["tasks"]["repeat_choice"]["acc,none"] == 1.0
    assert json.loads((tmp_path / "tasks.json").read_text())["tasks"]["repeat_choice"]["acc,none"] == 1.0
