"""scripts/random_checkpoint.py: random weights in a preset's shape, which load and benchmark like a converted
checkpoint (bench.py needs no tokenizer for them); existing files are kept unless --force."""
import json
import subprocess

import torch

import bench
from conftest import assert_one_line_error, run_script
from checkpoint import CONFIG_NAME, load_model
from model import ModelArgs


def run(*args) -> subprocess.CompletedProcess:
    return run_script("scripts/random_checkpoint.py", *args)


def test_a_preset_shaped_checkpoint_loads_and_benchmarks(tmp_path, capsys):
    out = tmp_path / "llama-68m"
    proc = run("--model", "llama-68m", "--out", out, "--std", "0.05")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / CONFIG_NAME).read_text()) == ModelArgs.from_name("llama-68m").to_dict()
    model = load_model(out / "model.pth", "cpu", torch.bfloat16)
    w = model.layers[0].feed_forward.w1.weight.float()
    assert abs(w.std().item() - 0.05) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert not (out / "tokenizer.json").exists()
    bench.main(["--checkpoint_path", str(out / "model.pth"), "--input-tokens", "4", "--max-new-tokens", "3",
                "--num-iter", "1", "--warmup", "0", "--copy_gib", "0.05"])
    assert "| brisk | model.pth | bfloat16 |" in capsys.readouterr().out


def test_the_same_seed_gives_the_same_weights(tmp_path):
    for d in ("a", "b"):
        assert run("--model", "llama-68m", "--out", tmp_path / d, "--seed", "3").returncode == 0
    a, b = (torch.load(tmp_path / d / "model.pth", weights_only=True) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_files_are_kept_unless_forced(tmp_path):
    out = tmp_path / "m"
    assert run("--model", "llama-68m", "--out", out, "--seed", "1").returncode == 0
    before = (out / "model.pth").read_bytes()
    assert_one_line_error(run("--model", "llama-68m", "--out", out, "--seed", "2"), "--force")
    assert (out / "model.pth").read_bytes() == before
    assert run("--model", "llama-68m", "--out", out, "--seed", "2", "--force").returncode == 0
    assert (out / "model.pth").read_bytes() != before


def test_bad_arguments_end_in_one_line(tmp_path):
    assert_one_line_error(run("--model", "Llama-9", "--out", tmp_path / "x"), "unknown model")
    assert_one_line_error(run("--model", "llama-68m", "--out", tmp_path / "x", "--std", "0"), "--std")
    assert not (tmp_path / "x").exists()
