"""Shared fixtures: tiny random checkpoints in our own format, with a small trained BPE tokenizer,
the real default model when it has been prepared, and the device and dtype of the device-aware
tests.

Tests that take the `device` fixture run on BRISK_TEST_DEVICE (default cpu) in BRISK_TEST_DTYPE
(default float32): `BRISK_TEST_DEVICE=cuda BRISK_TEST_DTYPE=bfloat16 python -m pytest` runs them on
a GPU (scripts/gpu_check.sh does). There every other test is skipped: it runs on the CPU only, and
`@pytest.mark.cpu_only(reason)` says why."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import DTYPES
from model import ModelArgs
from scripts.random_checkpoint import write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
REAL_CHECKPOINT = ROOT / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct" / "model.pth"

TINY = dict(block_size=256, vocab_size=320, n_layer=2, n_head=4, n_local_heads=2, dim=64,
            intermediate_size=128)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEVICE = torch.device(os.environ.get("BRISK_TEST_DEVICE", "cpu"))
DTYPE = DTYPES[os.environ.get("BRISK_TEST_DTYPE", "float32")]
# max |difference| of logits that agree up to rounding in the test dtype (logits of the tiny models
# are ~1-5)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25, torch.float16: 0.05}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Once upon a time there was a little model that generated tokens very fast.",
    "Grüße aus München — naïve café, 東京, emoji 🙂🚀 and numbers 0123456789.",
    "def forward(self, x):\n    return self.w2(F.silu(self.w1(x)) * self.w3(x))\n",
]


def write_tiny_tokenizer(directory: Path, vocab_size: int = TINY["vocab_size"]) -> None:
    """A byte-level BPE `tokenizer.json` (ids < vocab_size) with ChatML special tokens and
    template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 8, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                  add_bos_token=False, chat_template=CHATML,
                  tokenizer_class="PreTrainedTokenizerFast")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def make_checkpoint(directory: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """Random weights for a tiny model (TINY updated with `overrides`) saved as
    directory/model.pth."""
    args = ModelArgs(**{**TINY, **overrides})
    # weights larger than usual, so that logits are peaked and argmax is stable
    path = write_random_checkpoint(directory, args, force=True, seed=seed, std=0.15,
                                   dtype=torch.float32)
    if tokenizer:
        write_tiny_tokenizer(directory, args.vocab_size)
    return path


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    """Run `script` (a path from the repository root) with `args` in a subprocess, as a user
    would."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def assert_one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert match in lines[0]


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """Path to model.pth of a tiny random GQA model with a tokenizer beside it."""
    return make_checkpoint(tmp_path / "tiny")


@pytest.fixture(scope="session")
def real_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as left by ./scripts/prepare.sh; CI prepares it, elsewhere its absence
    skips."""
    if not REAL_CHECKPOINT.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{REAL_CHECKPOINT} missing: .ci/run must run ./scripts/prepare.sh first")
        pytest.skip("run ./scripts/prepare.sh to enable tests on the real model")
    return REAL_CHECKPOINT


@pytest.fixture
def device() -> torch.device:
    """The device of the device-aware tests: BRISK_TEST_DEVICE, default cpu."""
    return DEVICE


@pytest.fixture
def dtype() -> torch.dtype:
    """The float dtype of the device-aware tests: BRISK_TEST_DTYPE, default float32."""
    return DTYPE


@pytest.fixture
def tol(dtype) -> dict:
    """assert_close's tolerances for logits computed two ways in the test dtype."""
    return dict(atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): runs on the CPU only, skipped when "
                                       "BRISK_TEST_DEVICE is another device")


def pytest_collection_modifyitems(config, items):
    if DEVICE.type == "cpu":
        return
    for item in items:
        if "device" not in item.fixturenames:
            mark = item.get_closest_marker("cpu_only")
            reason = mark.args[0] if mark and mark.args else "not device-aware: runs on the CPU only"
            item.add_marker(pytest.mark.skip(reason=f"BRISK_TEST_DEVICE={DEVICE}: {reason}"))
