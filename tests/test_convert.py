"""Hugging Face checkpoints: scripts/convert_hf_checkpoint.py must give the logits transformers
gives, for each supported family and file layout; scripts/download.py asks the Hub for only the
files brisk needs; bad input ends in one `error:` line. Everything runs offline on tiny random
models."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from conftest import ROOT, assert_one_line_error, run_script
from helpers import HF_FAMILIES, HF_L31, HF_TINY, make_hf_model
from checkpoint import CONFIG_NAME, load_model, load_state_dict
from cli import BriskError
from scripts import convert_hf_checkpoint as convert_hf
from scripts import download

def run_convert(*args) -> subprocess.CompletedProcess:
    return run_script("scripts/convert_hf_checkpoint.py", *args)


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_converted_model_matches_transformers(tmp_path, family, device, dtype, tol):
    hf = make_hf_model(tmp_path, family).to(device, dtype)
    convert_hf.convert(tmp_path)
    ours = load_model(tmp_path / "model.pth", device, dtype)
    T = 24
    ours.setup_caches(2, T)
    idx = torch.randint(0, HF_TINY["vocab_size"], (2, T), device=device)
    pos = torch.arange(T, device=device)
    with torch.no_grad():
        ref = hf(idx).logits.float()
        full = ours(idx, pos).float()
        # through the cache
        steps = torch.cat([ours(idx[:, i:i + 1], pos[i:i + 1]) for i in range(T)], dim=1).float()
    full_err, step_err = (full - ref).abs().max().item(), (steps - ref).abs().max().item()
    print(f"{family} ({device}, {dtype}): max |logits - transformers| full {full_err:.2e}, cached {step_err:.2e}")
    # not flat: a wrong rope or swapped norm would move them well past the tolerance
    assert ref.std() > 0.5
    assert full_err <= tol["atol"] and step_err <= tol["atol"]


def test_conversion_keeps_stored_dtype_and_config(tmp_path):
    make_hf_model(tmp_path, "llama3.2-tied")
    convert_hf.convert(tmp_path)
    sd = load_state_dict(tmp_path / "model.pth")
    assert "output.weight" not in sd  # tied head: the embedding is stored once
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["tie_embeddings"] and cfg["rope_base"] == 500000.0 and cfg["rope_scaling"]["factor"] == 32.0


@pytest.mark.parametrize("hf_config, expected", [
    # transformers < 5: rope_theta and rope_scaling at the top level
    (dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3",
                                                 **{k: v for k, v in HF_L31.items()
                                                    if k != "rope_type"})),
     dict(rope_base=500000.0, rope_scaling={k: v for k, v in HF_L31.items() if k != "rope_type"})),
    (dict(rope_theta=1e6, rope_scaling=None), dict(rope_base=1e6, rope_scaling=None)),
    # Mistral 7B v0.1: a 4096-token sliding window caps the context brisk (full attention) can serve
    # exactly
    (dict(architectures=["MistralForCausalLM"], max_position_embeddings=32768, sliding_window=4096),
     dict(block_size=4096, qkv_bias=False)),
    # Qwen2 declares a window it does not use; its q/k/v bias is implicit
    (dict(architectures=["Qwen2ForCausalLM"], sliding_window=131072, use_sliding_window=False),
     dict(block_size=256, qkv_bias=True)),
])
def test_config_variants(hf_config, expected):
    cfg = {**HF_TINY, "architectures": ["LlamaForCausalLM"], **hf_config}
    args = convert_hf.config_from_hf(cfg).to_dict()
    assert {k: args[k] for k in expected} == expected


@pytest.mark.parametrize("hf_config, match", [
    (dict(architectures=["FalconForCausalLM"]),
     "unsupported architecture FalconForCausalLM; brisk converts Llama"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "rope_type 'yarn'"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_configs_are_refused(hf_config, match):
    with pytest.raises(BriskError, match=match):
        convert_hf.config_from_hf({**HF_TINY, "architectures": ["LlamaForCausalLM"], **hf_config})


def test_without_config_json_the_preset_is_used(tmp_path):
    d = tmp_path / "llama-68m"
    d.mkdir()
    make_hf_model(d, "llama-68m-like")
    (d / "config.json").unlink()
    # the llama-68m preset is the real 768-wide model, so the tiny weights are rejected against it
    with pytest.raises(BriskError,
                       match=r"tok_embeddings.weight is \[256, 96\], expected \[32000, 768\]"):
        convert_hf.convert(d)
    assert not (d / "model.pth").exists()


def test_llama3_tokenizer_model_is_copied_from_original(tmp_path):
    make_hf_model(tmp_path, "llama3-gqa")
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(b"tiktoken ranks")
    convert_hf.convert(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == b"tiktoken ranks"


# Bad input, through the command line: one `error:` line, non-zero exit, nothing written.

def test_missing_directory(tmp_path):
    assert_one_line_error(run_convert("--checkpoint_dir", tmp_path / "nope"), "is not a directory")


def test_truncated_safetensors(tmp_path):
    make_hf_model(tmp_path, "llama3-gqa")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_one_line_error(run_convert("--checkpoint_dir", tmp_path), f"cannot read {shard}")
    assert not list(tmp_path.glob("model.pth*")) and not (tmp_path / CONFIG_NAME).exists()


def test_unknown_architecture(tmp_path):
    make_hf_model(tmp_path, "llama2-mha")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg,
                                                      "architectures": ["FalconForCausalLM"]}))
    assert_one_line_error(run_convert("--checkpoint_dir", tmp_path),
                          "unsupported architecture FalconForCausalLM")
    assert not list(tmp_path.glob("model.pth*")) and not (tmp_path / CONFIG_NAME).exists()


def test_existing_output_needs_force(tmp_path):
    make_hf_model(tmp_path, "llama2-mha")
    convert_hf.convert(tmp_path)
    before = (tmp_path / "model.pth").read_bytes()
    assert_one_line_error(run_convert("--checkpoint_dir", tmp_path), "exists; pass --force")
    assert (tmp_path / "model.pth").read_bytes() == before
    make_hf_model(tmp_path, "llama2-mha", seed=1)
    convert_hf.convert(tmp_path, force=True)
    assert (tmp_path / "model.pth").read_bytes() != before


# scripts/prepare.sh on a local Hugging Face directory, run from elsewhere

def test_prepare_converts_a_local_directory_once(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    make_hf_model(d, "llama2-mha")
    prepare = [str(ROOT / "scripts" / "prepare.sh"), str(d)]
    first = subprocess.run(prepare, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (d / "model.pth").is_file() and (d / CONFIG_NAME).is_file()
    again = subprocess.run(prepare, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0 and "already exists" in again.stdout


# scripts/download.py, with the Hub replaced by a recorded file listing

LLAMA3_REPO = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "model.safetensors.index.json",
               "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
               "original/tokenizer.model", "original/consolidated.00.pth",
               "original/params.json", "LICENSE", "README.md", ".gitattributes"]
BIN_REPO = ["config.json", "pytorch_model.bin", "tokenizer.model", "tokenizer_config.json",
            "training_args.bin", "README.md"]
OPT_REPO = ["config.json", "generation_config.json", "merges.txt", "vocab.json",
            "pytorch_model.bin", "special_tokens_map.json", "tokenizer_config.json",
            "flax_model.msgpack", "tf_model.h5", "README.md"]
BOTH_REPO = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json",
             "flax_model.msgpack"]


@pytest.fixture
def hub(monkeypatch):
    """Records what download.py asks snapshot_download for; `files` is the fake repo's listing."""
    calls = {"files": []}
    monkeypatch.setattr(download, "list_repo_files", lambda repo_id, token=None: calls["files"])
    monkeypatch.setattr(download, "snapshot_download",
                        lambda repo_id, **kw: calls.update(repo_id=repo_id, **kw))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return calls


@pytest.mark.parametrize("files, wanted", [
    (LLAMA3_REPO, set(LLAMA3_REPO) - {"original/consolidated.00.pth", "original/params.json",
                                      "LICENSE", "README.md", ".gitattributes"}),
    (BIN_REPO, {"config.json", "pytorch_model.bin", "tokenizer.model", "tokenizer_config.json"}),
    (BOTH_REPO, {"config.json", "model.safetensors", "tokenizer.json"}),  # safetensors preferred
    (OPT_REPO, set(OPT_REPO) - {"flax_model.msgpack", "tf_model.h5", "README.md"}),  # GPT-2-style tokenizer files
])
def test_download_fetches_only_needed_files(hub, tmp_path, files, wanted):
    hub["files"] = files
    download.main(["--repo_id", "meta-llama/Llama-3.2-1B", "--checkpoint_dir", str(tmp_path)])
    assert hub["repo_id"] == "meta-llama/Llama-3.2-1B"
    assert Path(hub["local_dir"]) == tmp_path / "meta-llama" / "Llama-3.2-1B"
    # the same filter snapshot_download applies to the repo's files
    assert set(filter_repo_objects(files, allow_patterns=hub["allow_patterns"])) == wanted


def test_download_token_from_flag_or_environment(hub, monkeypatch, tmp_path):
    download.main(["--repo_id", "a/b", "--checkpoint_dir", str(tmp_path)])
    assert hub["token"] is None  # huggingface_hub then uses the saved login, if any
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    download.main(["--repo_id", "a/b", "--checkpoint_dir", str(tmp_path)])
    assert hub["token"] == "hf_env"
    download.main(["--repo_id", "a/b", "--checkpoint_dir", str(tmp_path), "--hf_token", "hf_flag"])
    assert hub["token"] == "hf_flag"


def hub_error(cls):
    # the Hub's HTTP errors want a live response object to be built; the mapping only looks at the
    # type
    return cls.__new__(cls)


@pytest.mark.parametrize("error, match", [
    (lambda: hub_error(download.GatedRepoError),
     "is gated: accept its license at https://huggingface.co/a/b"),
    (lambda: hub_error(download.RepositoryNotFoundError), "repository a/b not found"),
    (lambda: download.HTTPError("[Errno -2] Name or service not known"),
     "could not download a/b: .*network"),
    (lambda: OSError("No space left on device"), "could not download a/b: No space left"),
])
def test_download_errors_are_one_line(hub, monkeypatch, tmp_path, error, match):
    def fail(*args, **kwargs):
        raise error()
    monkeypatch.setattr(download, "list_repo_files", fail)
    with pytest.raises(BriskError, match=match) as e:
        download.download("a/b", tmp_path, None)
    assert "\n" not in str(e.value)
