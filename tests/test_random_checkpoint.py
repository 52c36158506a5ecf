"""scripts/random_checkpoint.py: random weights in a preset's shape, which load and benchmark like a
converted checkpoint (bench.py needs no tokenizer for them); existing files are kept unless
--force."""
import dataclasses
import json
import subprocess

import pytest
import torch

import bench
from conftest import assert_one_line_error, run_script
from checkpoint import CONFIG_NAME, load_model
from model import ModelArgs
from presets import transformer_configs
from scripts import convert_gguf
from scripts.random_checkpoint import random_state_dict, write_gguf


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
    bench.main(["--checkpoint_path", str(out / "model.pth"), "--input-tokens", "4",
                "--max-new-tokens", "3", "--num-iter", "1", "--warmup", "0", "--copy_gib", "0.05"])
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
    assert_one_line_error(run("--model", "llama-68m", "--out", tmp_path / "x", "--std", "0"),
                          "--std")
    assert not (tmp_path / "x").exists()


def tiny(preset: str, **kw) -> ModelArgs:
    return ModelArgs(**{**transformer_configs[preset], "n_layer": 2, "n_head": 4, "dim": 64,
                        "intermediate_size": 128, "vocab_size": 300, "block_size": 64, **kw})


@pytest.mark.parametrize("preset", ["gpt2", "bloom-560m", "SmolLM2-135M", "Qwen2-0.5B"])
def test_a_gguf_of_the_weights_reads_back_as_the_same_checkpoint(preset, tmp_path):
    """llama.cpp's layout of gpt2 and bloom (checked against transformers by test_families), and of
    llama (q and k permuted for its rotary) and qwen2 gives back every tensor and switch."""
    gqa = preset in ("SmolLM2-135M", "Qwen2-0.5B")
    args = tiny(preset, n_local_heads=2) if gqa else tiny(preset)
    sd = random_state_dict(args, dtype=torch.float32)
    write_gguf(tmp_path / "m.gguf", args, sd, "F32")
    back, back_args = convert_gguf.convert_weights(*convert_gguf.read_gguf(tmp_path / "m.gguf"),
                                                   torch.float32)
    assert back.keys() - {"output.weight"} == sd.keys() and all(torch.equal(back[k], sd[k])
                                                                for k in sd)
    # GGUF keeps the epsilon in float32
    assert dataclasses.replace(back_args, norm_eps=args.norm_eps) == args
    assert back_args.norm_eps == pytest.approx(args.norm_eps, rel=1e-6)


@pytest.mark.parametrize("preset,arch",
                         [("pythia-70m", "gptneox"), ("santacoder", "starcoder"), ("gpt2", "gpt2"),
                          ("Llama-2-7b", "llama"), ("Qwen2.5-0.5B", "qwen2")])
def test_a_gguf_names_only_tensors_of_its_llama_cpp_architecture(preset, arch, tmp_path):
    import gguf
    args = tiny(preset, rope_dim=8) if arch == "gptneox" else tiny(preset)
    if arch in ("llama", "qwen2"):
        args = tiny(preset, n_local_heads=2)
    sd = random_state_dict(args)
    write_gguf(tmp_path / "m.gguf", args, sd, "Q8_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == arch
    kind = gguf.MODEL_ARCH[arch.upper()]
    known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[kind]
             for i in range(args.n_layer)}
    names = {t.name.rsplit(".", 1)[0] for t in reader.tensors}
    qkv = sum(".wqkv." in name for name in sd)  # three tensors each in llama and qwen2
    assert names <= known and len(reader.tensors) == len(sd) + (2 * qkv if arch in ("llama", "qwen2") else 0)
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"Q8_0"}


def test_a_gguf_is_refused_for_switches_llama_cpp_has_no_architecture_for(tmp_path):
    assert_one_line_error(run("--model", "opt-125m", "--out", tmp_path / "x", "--gguf", "BF16"),
                          "gptneox")
    assert_one_line_error(run("--model", "Llama-3.1-8B", "--out", tmp_path / "x", "--gguf", "BF16"),
                          "rope scaling")
    assert_one_line_error(run("--model", "gpt2", "--out", tmp_path / "x", "--gguf", "Q9_9"),
                          "unknown GGUF type")
    assert not (tmp_path / "x").exists()
