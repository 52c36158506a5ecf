"""scripts/gpu_check.sh: the transformers copy of random weights computes brisk's logits (so the
peer runs the same model), and the CPU dry run goes through every stage and writes the figures as
JSON and markdown."""
import json
import subprocess

import pytest
import torch

from conftest import ROOT, assert_one_line_error, make_checkpoint
from checkpoint import load_model
from scripts.gpu_check import write_hf_checkpoint


@pytest.mark.parametrize("overrides", [
    {},  # Llama with grouped-query attention
    dict(qkv_bias=True, tie_embeddings=True, rope_base=1e6),  # Qwen2-like
    # Llama 3.1 rope, changing 16 positions
    dict(rope_base=5e5, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=64)),
])
def test_the_transformers_copy_of_the_weights_gives_brisks_logits(tmp_path, overrides):
    from transformers import AutoModelForCausalLM
    path = make_checkpoint(tmp_path / "brisk", tokenizer=False, **overrides)
    write_hf_checkpoint(path, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = load_model(path, dtype=torch.float32)
    ours.setup_caches(1, 16)
    idx = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hf(idx).logits, ours(idx, torch.arange(16))
    # far from flat: a wrong split of wqkv would move them by far more than the tolerance
    assert ref.std() > 0.5
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def gpu_check(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_the_cpu_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "check"
    proc = gpu_check("--device", "cpu", "--preset", "llama-68m", "--out", out, "--max_new_tokens",
                     4, "--tests", "test_the_devices_int4_kernel and 32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["ok"] * len(report["stages"])
    assert [r["precision"] for r in report["results"]] == ["bf16", "int8", "int4 g32", "int4 g128"]
    for r in report["results"] + [report["peer"]]:
        assert r["decode_tokens_per_s"] > 0 and r["bandwidth_pct"] > 0 and r["ttft_ms"] > 0
    assert report["peer"]["engine"] == "transformers" and report["peer"]["checkpoint"].endswith("hf")
    bf16 = report["results"][0]
    assert bf16["vs_peer"] == pytest.approx(bf16["decode_tokens_per_s"] / report["peer"]["decode_tokens_per_s"])
    # on the device: BRISK_TEST_DEVICE=cpu here
    assert list(report["tests"]) == ["float32", "bfloat16"]
    for t in report["tests"].values():
        assert (t["passed"], t["failed"], t["skipped"], t["failures"]) == (1, 0, 0, [])
    table = (out / "gpu_check.md").read_text()
    assert "| int4 g32 |" in table and "| transformers (bf16) |" in table and "Targets" in table
    assert table in proc.stdout
    # the report is not overwritten without --force; the weights are reused by the next run
    assert_one_line_error(gpu_check("--device", "cpu", "--preset", "llama-68m", "--out", out),
                          "--force")


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu", "--preset", "Lama-2-7b"], "unknown model 'Lama-2-7b'"),
    (["--device", "cpu", "--max_new_tokens", "1"], "--max_new_tokens at least 2"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    assert_one_line_error(gpu_check(*args, "--out", tmp_path / "check"), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_without_cuda_the_default_device_is_one_line(tmp_path):
    assert_one_line_error(gpu_check("--out", tmp_path / "check"), "CUDA is not available")
