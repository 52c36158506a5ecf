"""generate.py: cached decoding, stopping, streaming, batching, compilation and the command line."""
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compile_cache
import engine
import generate as gen
from conftest import ROOT, make_checkpoint, run_script
from helpers import compiled_steps
from checkpoint import load_model
from cli import BriskError, TextStream, run_cli
from tokenizer import load_tokenizer

PROMPT = [5, 17, 42, 99, 7, 250, 3]


def tiny_model(path: Path, batch_size: int = 1, max_seq_length: int = 64, device="cpu",
               dtype=torch.float32):
    model = load_model(path, device, dtype)
    model.setup_caches(batch_size, max_seq_length)
    return model


def greedy(model, n: int, batch_size: int = 1, prompt=PROMPT, **kwargs) -> list:
    prompt = torch.tensor(prompt, device=model.norm.weight.device)
    rows, _ = engine.generate(model, prompt, n, batch_size, temperature=0.0, **kwargs)
    return rows


def run_generate(*args, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "generate.py"), "--device", "cpu", "--dtype", "float32",
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, cwd=ROOT, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


# --------------------------------------------------------------------------------------------------
# Generation on token ids


def test_cached_decoding_matches_recomputing_the_whole_sequence(tiny_checkpoint, device, dtype,
                                                                tol):
    model = tiny_model(tiny_checkpoint, device=device, dtype=dtype)
    tokens = greedy(model, 12)[0]
    seq = torch.tensor([PROMPT + tokens], device=device)  # [1, T + 12]
    pos = torch.arange(seq.size(1), device=device)
    # step by step through the cache, as generate does
    with torch.no_grad():
        cached = [model(seq[:, :len(PROMPT)], pos[:len(PROMPT)])[:, -1]]
        for i in range(len(PROMPT), seq.size(1) - 1):
            cached.append(model(seq[:, i:i + 1], pos[i:i + 1])[:, -1])
        # every position at once in a fresh model, where nothing comes from an earlier call
        fresh = tiny_model(tiny_checkpoint, device=device, dtype=dtype)
        full = fresh(seq[:, :-1], pos[:-1])[0, len(PROMPT) - 1:]  # [12, V]
    torch.testing.assert_close(torch.cat(cached).float(), full.float(), **tol)
    assert torch.cat(cached).argmax(-1).tolist() == tokens


def test_eos_stops_generation_and_is_kept(tiny_checkpoint):
    model = tiny_model(tiny_checkpoint)
    free = greedy(model, 16)[0]
    eos = free[5]
    stopped = greedy(model, 16, eos_ids=[eos])[0]
    assert stopped == free[:free.index(eos) + 1]


def test_on_token_can_stop_a_row(tiny_checkpoint):
    model = tiny_model(tiny_checkpoint)
    seen = []
    rows = greedy(model, 16, on_token=lambda row, t: seen.append(t) or len(seen) == 4)
    assert len(rows[0]) == 4 and rows[0] == seen


def test_batch_rows_equal_a_single_sequence(tiny_checkpoint, device, dtype):
    single = greedy(tiny_model(tiny_checkpoint, device=device, dtype=dtype), 12)
    batch = greedy(tiny_model(tiny_checkpoint, batch_size=2, device=device, dtype=dtype), 12,
                   batch_size=2)
    assert batch == single * 2


def test_generation_stops_at_the_requested_length(tiny_checkpoint):
    rows, timing = engine.generate(tiny_model(tiny_checkpoint), torch.tensor(PROMPT), 9,
                                   temperature=0.0)
    assert len(rows[0]) == 9 and timing["steps"] == 8


@pytest.mark.parametrize("chunk", [3, 4, 7])
def test_a_prompt_longer_than_prefill_chunk_is_prefilled_in_pieces_with_the_same_answer(tiny_checkpoint, monkeypatch,
                                                                                       device, dtype, chunk):
    # pieces of PREFILL_CHUNK positions (the last may be shorter, or the prompt one piece): memory
    # stays bounded
    whole = greedy(tiny_model(tiny_checkpoint, device=device, dtype=dtype), 10)
    calls = []
    monkeypatch.setattr(engine, "PREFILL_CHUNK", chunk)
    model = tiny_model(tiny_checkpoint, batch_size=2, device=device, dtype=dtype)
    model.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[1]))
    assert greedy(model, 10, batch_size=2) == whole * 2
    pieces = [chunk] * (len(PROMPT) // chunk) + [len(PROMPT) % chunk] * (len(PROMPT) % chunk > 0)
    assert calls[:len(pieces)] == pieces and set(calls[len(pieces):]) == {1}


def test_reusing_the_cached_prefix_matches_a_full_prefill(tiny_checkpoint, device, dtype):
    # a conversation's second turn: the first turn's tokens are already in the cache
    model = tiny_model(tiny_checkpoint, device=device, dtype=dtype)
    first = PROMPT + greedy(model, 6)[0][:-1]  # what the cache holds after the first turn
    second = first + [11, 12, 13]
    reused = greedy(model, 8, prompt=second, start_pos=len(first))
    fresh = greedy(tiny_model(tiny_checkpoint, device=device, dtype=dtype), 8, prompt=second)
    assert reused == fresh


@pytest.mark.slow
def test_compiled_greedy_matches_eager(tmp_path, device, dtype):
    path = make_checkpoint(tmp_path / "one_layer", tokenizer=False, n_layer=1)
    eager = greedy(tiny_model(path, device=device, dtype=dtype), 6)
    model = tiny_model(path, device=device, dtype=dtype)
    fns = compiled_steps(model, compile_prefill=True)
    assert greedy(model, 6, **fns) == eager
    assert greedy(model, 6, **fns) == eager  # the second run replays the compiled code


@pytest.mark.slow
def test_a_compiled_step_refuses_a_cache_it_was_not_traced_with(tmp_path):
    """setup_caches reallocates caches of another size (shrinking too); a step compiled for the old
    cache then refuses to run with one clear error instead of reading buffers the model no longer
    uses."""
    path = make_checkpoint(tmp_path / "one_layer", tokenizer=False, n_layer=1)
    model = tiny_model(path)
    fns = compiled_steps(model)
    assert greedy(model, 3, **fns) == greedy(tiny_model(path), 3)
    model.setup_caches(1, 32)
    assert model.max_seq_length == 32 and model.layers[0].attention.kv_cache.k_cache.shape[2] == 33
    with pytest.raises(BriskError,
                       match="a compiled step ran against a KV cache other than the one "
                             "it was traced"):
        greedy(model, 3, **fns)


@pytest.mark.slow
def test_compiled_step_attends_to_the_written_cache_in_one_graph(tmp_path, device, dtype, tol):
    """The compiled step's attended length (attend_len: 64, 128, ... of a 256-position cache) is a
    dynamic size: decoding across those blocks gives the eager logits at every position and compiles
    one graph (on CUDA, one CUDA graph is recorded per length)."""
    from torch._dynamo.utils import counters
    path = make_checkpoint(tmp_path / "one_layer", tokenizer=False, n_layer=1)
    eager = tiny_model(path, max_seq_length=256, device=device, dtype=dtype)
    model = tiny_model(path, max_seq_length=256, device=device, dtype=dtype)
    step = engine.compile_step(lambda model, x, input_pos,
                               attend_len: model(x, input_pos, attend_len=attend_len), device)
    # traced, or loaded (CPU: saved)
    graphs = counters["stats"]["unique_graphs"] + compile_cache.TALLY["loaded"]
    tokens = torch.randint(0, 320, (1, 200), device=device)
    with torch.no_grad():
        for pos in range(200):
            x, input_pos = tokens[:, pos:pos + 1], torch.tensor([pos], device=device)
            torch.testing.assert_close(step(model, x, input_pos, model.attend_len(pos)).float(),
                                       eager(x, input_pos).float(), **tol)
    assert counters["stats"]["unique_graphs"] + compile_cache.TALLY["loaded"] - graphs == 1


@pytest.mark.slow
def test_compiled_steps_of_two_models_keep_to_their_own_model(tmp_path, device, dtype):
    """A compiled step skips the guards on the model's modules, so each compile_step call must keep
    its own compiled graphs: a second model (two layers, not one) called in turn with the first gets
    its own graph."""
    models = [tiny_model(make_checkpoint(tmp_path / f"m{n}", seed=n, tokenizer=False, n_layer=n),
                         device=device, dtype=dtype) for n in (1, 2)]
    eager = [greedy(m, 6) for m in models]
    steps = [compiled_steps(m) for m in models]
    for _ in range(2):
        assert [greedy(m, 6, **fns) for m, fns in zip(models, steps)] == eager


# --------------------------------------------------------------------------------------------------
# Text: stop strings and streaming


class LetterTokenizer:
    """Token i is the i-th character of `alphabet`; enough to drive TextStream without a real
    vocabulary."""

    def __init__(self, alphabet: str):
        self.alphabet = alphabet

    def stream_decoder(self):
        tok = self

        class Decoder:
            def push(self, i):
                return tok.alphabet[i]

            def flush(self):
                return ""
        return Decoder()


def test_text_stream_cuts_before_a_stop_string_and_never_prints_it():
    tok = LetterTokenizer("abcdefgh")
    out = io.StringIO()
    stream = TextStream(tok, ["def", "zz"], out)
    stopped = [stream.push(i) for i in [0, 1, 2, 3, 4, 5, 6]]  # a b c d e f g
    assert stopped == [False, False, False, False, False, True, True]
    assert stream.finish() == "abc" and out.getvalue() == "abc"


def test_text_stream_prints_everything_without_a_stop():
    tok = LetterTokenizer("abcdefgh")
    out = io.StringIO()
    stream = TextStream(tok, ["hx"], out)
    for i in [7, 0, 7]:
        assert not stream.push(i)
    assert out.getvalue() == "ha"  # the last "h" might start "hx"
    assert stream.finish() == "hah" and out.getvalue() == "hah"


def test_streaming_multibyte_text_is_exact(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint.parent)
    text = "Grüße aus München — 東京 🙂🚀!"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some characters span several tokens
    out = io.StringIO()
    stream = TextStream(tok, [], out)
    pieces = []
    for i in ids:
        stream.push(i)
        pieces.append(out.getvalue())
    assert stream.finish() == text and out.getvalue() == text
    assert all("\ufffd" not in p for p in pieces)  # no half character was ever printed


# --------------------------------------------------------------------------------------------------
# Command line


def echo_checkpoint(directory: Path, text: str) -> Path:
    """A tiny model whose greedy continuation of `text` is `text` again, over and over: token t_i is
    followed by t_(i+1) (cyclically). Embeddings of the cycle's tokens are orthogonal unit vectors
    and every block writes nothing to the residual stream, so the head sees a scaled copy of the
    current token's vector."""
    path = make_checkpoint(directory)
    ids = load_tokenizer(directory).encode(text)
    assert len(set(ids)) == len(ids), "the cycle needs distinct tokens"
    sd = torch.load(path)
    dim = sd["tok_embeddings.weight"].shape[1]
    for k in sd:
        if k.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            sd[k].zero_()
    sd["output.weight"].zero_()
    for i, t in enumerate(ids):
        sd["tok_embeddings.weight"][t] = torch.eye(dim)[i]
        sd["output.weight"][ids[(i + 1) % len(ids)]] = 10 * torch.eye(dim)[i]
    torch.save(sd, path)
    return path


def test_cli_streams_multibyte_text_byte_exactly(tmp_path):
    text = "東京🙂"
    path = echo_checkpoint(tmp_path / "echo", text)
    n = len(load_tokenizer(path.parent).encode(text))
    proc = run_generate("--checkpoint_path", path, "--prompt", text, "--temperature", 0,
                        "--max_new_tokens", 2 * n)
    assert proc.stdout == (text * 3 + "\n").encode()


def cli(*args):
    """main() in this process, on the CPU in float32."""
    gen.main(["--device", "cpu", "--dtype", "float32", *map(str, args)])


def test_stop_string_ends_generation_before_it(tmp_path, capsys):
    text = "東京🙂"
    path = echo_checkpoint(tmp_path / "echo", text)
    cli("--checkpoint_path", path, "--prompt", text, "--temperature", 0, "--max_new_tokens", 20,
        "--stop", "🙂", "--json", tmp_path / "out.json")
    assert capsys.readouterr().out == text + "東京\n"
    assert json.loads((tmp_path / "out.json").read_text())["samples"][0]["new_tokens"] < 20


def test_cli_json_figures_count_the_generated_tokens(tiny_checkpoint, tmp_path):
    out = tmp_path / "figures.json"
    proc = run_generate("--checkpoint_path", tiny_checkpoint, "--prompt", "The quick brown fox",
                        "--temperature", 0, "--max_new_tokens", 10, "--num_samples", 2,
                        "--batch_size", 2, "--json", out)
    report = json.loads(out.read_text())
    tok = load_tokenizer(tiny_checkpoint.parent)
    model = tiny_model(tiny_checkpoint)
    rows, _ = engine.generate(model, torch.tensor(tok.encode("The quick brown fox")), 10,
                              temperature=0.0,
                           eos_ids=tok.eos_ids)
    cfg = report["config"]
    assert (cfg["device"], cfg["dtype"], cfg["batch_size"], cfg["compile"]) == ("cpu", "float32", 2, False)
    assert cfg["prompt_tokens"] == len(tok.encode("The quick brown fox"))
    assert len(report["samples"]) == 2
    for s in report["samples"] + [report["summary"]]:
        assert s["new_tokens"] == len(rows[0]) and s["tokens_generated"] == 2 * len(rows[0])
        assert s["ttft_s"] > 0 and s["decode_tokens_per_s"] > 0 and s["bandwidth_gb_s"] > 0
        assert s["peak_memory_gb"] > 0
    text = "The quick brown fox" + tok.decode([t for t in rows[0] if t not in tok.eos_ids])
    assert proc.stdout.decode() == f"{text}\n{text}\n" * 2  # batch of two, two samples
    assert "summary" in proc.stderr.decode()


def test_an_integer_prompt_is_that_many_random_tokens(tiny_checkpoint, tmp_path):
    out = tmp_path / "figures.json"
    cli("--checkpoint_path", tiny_checkpoint, "--prompt", 40, "--max_new_tokens", 5, "--seed", 1,
        "--json", out)
    assert json.loads(out.read_text())["config"]["prompt_tokens"] == 40


def test_cli_bad_input_is_one_error_line(tmp_path):
    proc = run_generate("--checkpoint_path", tmp_path / "missing" / "model.pth", check=False)
    assert proc.returncode != 0
    assert proc.stderr.decode().splitlines() == [f"error: checkpoint not found: {tmp_path / 'missing' / 'model.pth'}"
                                                 " (run ./scripts/prepare.sh first?)"]


@pytest.mark.parametrize("args, message", [
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--top_k", "0"], "--top_k must be at least 1"),
    (["--top_p", "nan"], "--top_p must be in (0, 1]"),
    (["--temperature", "-0.1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0 and finite"),
    (["--temperature", "inf"], "--temperature must be >= 0 and finite"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--num_samples", "0"], "--num_samples must be at least 1"),
    (["--prompt", "a b c d e f g h i j", "--max_seq_length", "4"], "more than --max_seq_length 4"),
    (["--prompt", "300"], "more than the model's block_size 256"),
    (["--max_seq_length", "1000"], "exceeds the model's block_size 256"),
    (["--num_beams", "0"], "--num_beams must be at least 1"),
    (["--num_beams", "2", "--num_return_sequences", "3"],
     "--num_return_sequences 3 exceeds --num_beams 2"),
    (["--num_beams", "2", "--length_penalty", "nan"], "--length_penalty must be finite, got nan"),
    (["--num_beams", "2", "--prompt_lookup", "2"], "speculative decoding runs one sequence"),
    (["--prompt", "a", "--prompt", "b", "--interactive"], "--interactive takes one first message"),
    (["--prompt", "a", "--prompt", "a b c d e f g h i j", "--max_seq_length", "4"], "prompt 2 has"),
    (["--prompt", "a", "--prompt", ""], "prompt 2 is empty"),
    (["--prompts_file", "missing.txt"], "no such file"),
])
def test_bad_input_is_rejected_before_loading_the_model(tiny_checkpoint, capsys, monkeypatch, args,
                                                        message):
    monkeypatch.setattr(engine, "load_model",
                        lambda *a: pytest.fail("loaded the model despite bad input"))
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: gen.main(["--checkpoint_path", str(tiny_checkpoint), *args]))
    assert exit.value.code.startswith("error: ") and message in exit.value.code
    assert "\n" not in exit.value.code and capsys.readouterr().err == ""


@pytest.mark.parametrize("script, args, message", [
    ("generate.py", ["--max_new_tokens", "many"],
     "argument --max_new_tokens: invalid int value: 'many'"),
    ("bench.py", ["--input-tokens", "0"],
     "argument --input-tokens/--input_tokens: expected positive integers, got '0'"),
    ("quantize.py", [], "the following arguments are required: --mode"),
    *[(script, ["--kv_cache_dtype", "int4"],
       "argument --kv_cache_dtype: invalid choice: 'int4' (choose from 'int8')")
      for script in ("generate.py", "generate_prefill.py", "serve.py", "bench.py")],
])
def test_a_malformed_flag_is_one_line_that_points_to_help(script, args, message):
    proc = run_script(script, *args)
    assert proc.returncode == 2 and proc.stderr == f"error: {message} (usage: {script} -h)\n"


def test_existing_json_is_not_overwritten(tiny_checkpoint, tmp_path):
    out = tmp_path / "figures.json"
    out.write_text("keep")
    with pytest.raises(BriskError, match="--force"):
        gen.main(["--checkpoint_path", str(tiny_checkpoint), "--json", str(out)])
    assert out.read_text() == "keep"


@pytest.mark.parametrize("flags", [(), ("--compile",)])
def test_interactive_reuses_the_conversation_cache(tiny_checkpoint, capsys, monkeypatch, flags):
    """Each reply equals a fresh generation from the whole conversation; compiled, the step is
    compiled (and reported) before the first turn, or said to be saved (a warm start), and the first
    turn's figures do not include it."""
    turns = iter(["The quick brown fox", "Once upon a time"])

    def ask(prompt=""):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", ask)
    cli("--checkpoint_path", tiny_checkpoint, "--interactive", "--temperature", 0,
        "--max_new_tokens", 8, *flags)
    out, err = capsys.readouterr()
    reused = int(re.search(r"(\d+) reused", err.splitlines()[-1]).group(1))
    assert reused > 0  # the second turn did not prefill the first again
    assert ("compiled in" in err or "decode step is saved" in err) == bool(flags)

    # each reply equals generating from the whole conversation so far in a fresh cache
    tok = load_tokenizer(tiny_checkpoint.parent)

    def reply(messages):
        model = tiny_model(tiny_checkpoint, max_seq_length=256)
        rows, _ = engine.generate(model, torch.tensor(tok.encode_chat(messages)), 8,
                                  temperature=0.0,
                               eos_ids=tok.eos_ids)
        return tok.decode([t for t in rows[0] if t not in tok.eos_ids])
    conversation = [dict(role="user", content="The quick brown fox")]
    first = reply(conversation)
    conversation += [dict(role="assistant", content=first),
                     dict(role="user", content="Once upon a time")]
    assert out == f"{first}\n{reply(conversation)}\n\n"


def test_chat_on_smollm2_answers_sensibly(real_checkpoint, capsys):
    cli("--checkpoint_path", real_checkpoint, "--chat", "--temperature", 0, "--max_new_tokens", 12,
        "--prompt", "What is the capital of France? Answer in one sentence.")
    assert "Paris" in capsys.readouterr().out
