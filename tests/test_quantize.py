"""quant.py and quantize.py: the int8/int4 math, the packed kernels against the plain dequantize
path, checkpoints that load back to exactly the model they describe, GPTQ against round-to-nearest,
CLI errors; eval.py's perplexity."""
import math

import pytest
import torch
import torch.nn.functional as F

import cpu
import quant
import quantize
from checkpoint import DEFAULT_CHECKPOINT, load_model
from cli import BriskError, run_cli
from conftest import make_checkpoint
from quant import (WeightOnlyInt4Linear, WeightOnlyInt8Linear, gptq_quantize, int4_dequantize,
                   int4_quantize,
                      int8_quantize, pack_nibbles, to_scales_and_zeros, unpack_nibbles)
from eval import perplexity

SMALL = dict(dim=128, intermediate_size=256)  # every group size divides the inputs


def weights(n=48, k=256, seed=0):
    """Rows of very different magnitudes, as real layers have."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n)[:, None]


def logits(model, idx, rows=None):
    """model's logits for idx [1, T], in one pass, or in passes of `rows` positions."""
    model.setup_caches(1, idx.shape[1])
    idx = idx.to(model.norm.weight.device)
    pos = torch.arange(idx.shape[1], device=idx.device)
    with torch.no_grad():
        return torch.cat([model(idx[:, p], p) for p in pos.split(rows or idx.shape[1])],
                         dim=1).float().cpu()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def quantize_cli(path, *args):
    quantize.main(["--checkpoint_path", str(path), *args])


# --------------------------------------------------------------------------------------------------
# The math


def test_int8_error_is_at_most_half_a_step_per_row():
    w = weights()
    q, s = int8_quantize(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert ((w - q.float() * s[:, None]).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()
    assert (q.abs().amax(1) == 127).all()  # the scale is no larger than it has to be


@pytest.mark.parametrize("groupsize", [32, 64, 128, 256])
def test_int4_error_is_at_most_half_a_step_per_group(groupsize):
    w = weights()
    q, s, z = int4_quantize(w, groupsize, dtype=torch.float32)
    assert q.dtype == torch.uint8 and s.shape == z.shape == (48, 256 // groupsize)
    err = (w - int4_dequantize(q, s, z)).reshape(48, -1, groupsize).abs()
    assert (err <= s[..., None] / 2 * (1 + 1e-5)).all()
    groups = q.reshape(48, -1, groupsize)
    assert (groups.amin(-1) == 0).all() and (groups.amax(-1) == 15).all()  # each group spans the whole range
    # the file's bf16 scales/zero points: the values are chosen for the rounded parameters, so the
    # only extra error is at the ends of a group's range, from rounding the zero point (8 bits of
    # mantissa)
    q, s, z = int4_quantize(w, groupsize)
    err = (w - int4_dequantize(q, s, z)).reshape(48, -1, groupsize).abs()
    assert (err <= s[..., None] / 2 + z.abs()[..., None] * 2 ** -8 + 1e-7).all()


def test_nibble_packing_round_trips_with_even_columns_high():
    q = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    p = pack_nibbles(q)
    assert p.shape == (4, 32) and (p[:, 0] == q[:, 0] * 16 + q[:, 1]).all()
    assert torch.equal(unpack_nibbles(p), q)


# --------------------------------------------------------------------------------------------------
# Kernels: the packed CPU paths compute what the plain dequantize path computes


def int4_linear(w, groupsize, kernel, device="cpu"):
    n, k = w.shape
    m = WeightOnlyInt4Linear(k, n, groupsize)
    q, s, z = int4_quantize(F.pad(w, (0, m.scales_and_zeros.shape[0] * groupsize - k)), groupsize)
    m.weight, m.scales_and_zeros = pack_nibbles(q).to(device), to_scales_and_zeros(s, z).to(device, torch.bfloat16)
    m.pack(kernel)
    return m


# 96: inputs padded to 128
@pytest.mark.parametrize("groupsize, k", [(32, 256), (128, 256), (64, 96)])
def test_the_devices_int4_kernels_equal_the_dequantize_path(groupsize, k, device):
    """The packed weight of the device's kernel (CPU: brisk's cpu_int4.cpp, and aten's
    _weight_int4pack_mm_for_cpu where it cannot be built; CUDA: _weight_int4pack_mm with its inner k
    tiles) computes what the plain dequantize path computes."""
    w = weights(n=64, k=k) * 10
    kernel = quant.int4_kernel(device, 64, quant.padded(k, groupsize))
    if kernel is None:
        pytest.skip(f"no int4 kernel on this {device.type} device")
    plain = int4_linear(w, groupsize, None, device)
    x = torch.randn(2, 5, k, dtype=torch.bfloat16, device=device)
    want = plain(x).float()
    # aten's CPU kernel: the fallback
    for kernel in [kernel] + (["cpu"] if kernel == "brisk" else []):
        packed = int4_linear(w, groupsize, kernel, device)
        assert packed.kernel == kernel and plain.kernel is None
        torch.testing.assert_close(packed(x).float(), want, rtol=2e-2,
                                   atol=2e-2 * want.abs().max().item())
        y = packed(x.float())  # other dtypes: fp32 in, fp32 out
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.cpu_only("the int8 kernels for the CPU")
@pytest.mark.parametrize("kernel", ["aten", "brisk"])
def test_cpu_int8_kernel_equals_plain_path(kernel):
    """torch's int8 kernel and brisk's (activations quantized per block of 32) give the plain path's
    values within bf16 and activation rounding."""
    if kernel == "brisk" and cpu.kernel_isa() == 0:
        pytest.skip("the CPU has no AVX2 (or no compiler)")
    w = weights(n=40, k=96)
    m = WeightOnlyInt8Linear(96, 40)
    m.weight, scales = int8_quantize(w)
    m.scales = scales.to(torch.bfloat16)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    plain = m(x).float()
    m.kernel = kernel
    torch.testing.assert_close(m(x).float(), plain, rtol=2e-2, atol=2e-2 * plain.abs().max().item())


# --------------------------------------------------------------------------------------------------
# Checkpoints


def fake_quantized(path, mode, groupsize, head="int8"):
    """The float model with each quantized matrix replaced by its dequantized value, computed
    independently."""
    model = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        for name, lin in quant.linear_layers(model):
            if (head if name == "output" else mode) == "int8":
                q, s = int8_quantize(lin.weight)
                # a tied head shares this with the embedding
                lin.weight.copy_(q.float() * s[:, None])
            else:
                k = lin.in_features
                # zero-padded inputs
                q, s, z = int4_quantize(F.pad(lin.weight, (0, -k % groupsize)), groupsize)
                lin.weight.copy_(int4_dequantize(q, s, z)[:, :k])
    return model


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode, groupsize, head, name", [
    ("int8", None, "int8", "model_int8.pth"),
    ("int4", 32, "int8", "model_int4.g32.pth"),
    ("int4", 256, "int8", "model_int4.g256.pth"),  # 128 inputs padded to one group of 256
    ("int4", 32, "int4", "model_int4.g32.int4-head.pth"),
    ("int4", 256, "int4", "model_int4.g256.int4-head.pth"),
])
def test_checkpoint_loads_back_to_the_model_it_describes(tmp_path, monkeypatch, mode, groupsize,
                                                         head, name, tied,
                                                        device):
    path = make_checkpoint(tmp_path, tokenizer=False, tie_embeddings=tied, qkv_bias=True, **SMALL)
    quantize_cli(path, "--mode", mode, "--head", head,
                 *(["--groupsize", str(groupsize)] if groupsize else []))
    out = quant.output_path(path, mode, groupsize, head)
    assert out.name == name and out.is_file()
    idx = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    # a tied embedding reads the same rows
    expected = logits(fake_quantized(path, mode, groupsize, head), idx)
    monkeypatch.setattr(quant, "int4_kernel", lambda *_: None)  # the exact fp32 path
    monkeypatch.setattr(quant, "int8_kernel", lambda *_: None)
    model = load_model(out, device, torch.float32)
    torch.testing.assert_close(logits(model, idx), expected, rtol=1e-4, atol=1e-4)
    assert isinstance(model.output, {"int8": WeightOnlyInt8Linear,
                                     "int4": WeightOnlyInt4Linear}[head])
    if tied and head == "int8":  # one int8 matrix serves the embedding and the head
        assert model.tok_embeddings.weight is model.output.weight


def test_an_int4_head_runs_through_the_devices_kernel_like_the_dequantize_path(tmp_path, monkeypatch, device):
    # the head is repacked for the kernel while the tied embedding keeps reading the file's layout
    path = make_checkpoint(tmp_path, tokenizer=False, tie_embeddings=True, **SMALL)
    quantize_cli(path, "--mode", "int4", "--head", "int4")
    out = quant.output_path(path, "int4", 32, "int4")
    idx = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(0))
    packed = load_model(out, device)
    kernel = quant.int4_kernel(device, 320, 64)
    assert kernel and packed.output.kernel == kernel and packed.tok_embeddings.weight.shape == (320, 64)
    monkeypatch.setattr(quant, "int4_kernel", lambda *_: None)
    plain = logits(load_model(out, device), idx)
    # through every layer of this random model: ~0.014 with bf16 activations (aten's CPU kernel),
    # ~0.026 with brisk's int8 ones; a wrong layout or parameter gives about 1
    assert rel_err(logits(packed, idx), plain) < 0.05


@pytest.mark.parametrize("mode, groupsize, head, bound", [
    ("int8", None, "int8", 0.08), ("int4", 32, "int8", 0.55), ("int4", 128, "int8", 0.7),
    ("int4", 32, "int4", 0.6)])
def test_quantized_logits_stay_close_to_float(tmp_path, mode, groupsize, head, bound, device):
    # these random models give relative errors of ~0.04 (int8), ~0.41 (int4 g32), 0.47-0.57 (int4
    # g128) and ~0.45 (int4 g32 with an int4 head) over seeds; an off-by-one zero point or a wrong
    # scale gives about 1 or more
    path = make_checkpoint(tmp_path, tokenizer=False, tie_embeddings=True, **SMALL)
    quantize_cli(path, "--mode", mode, "--head", head,
                 *(["--groupsize", str(groupsize)] if groupsize else []))
    idx = torch.randint(0, 320, (1, 32), generator=torch.Generator().manual_seed(0))
    reference = logits(load_model(path, device, torch.bfloat16), idx)
    quantized = load_model(quant.output_path(path, mode, groupsize, head), device)
    assert rel_err(logits(quantized, idx), reference) < bound
    # a few rows at a time too, as decode steps and verify passes run (on the CPU: brisk's int8
    # kernel, which quantizes activations to int8; the checks are the same)
    assert rel_err(logits(quantized, idx, rows=cpu.FEW_ROWS), reference) < bound


# --------------------------------------------------------------------------------------------------
# GPTQ


@pytest.mark.parametrize("groupsize", [32, 128])
def test_gptq_output_error_is_lower_than_round_to_nearest(groupsize):
    g = torch.Generator().manual_seed(0)
    # correlated inputs with a few loud features, like activations after a norm
    X = torch.randn(1024, 256, generator=g) @ torch.randn(256, 256, generator=g) / 16
    X[:, :8] *= 10
    w = torch.randn(96, 256, generator=g)
    q, s, z = gptq_quantize(w, X.t() @ X, groupsize)
    assert q.dtype == torch.uint8 and q.max() <= 15 and s.shape == (96, 256 // groupsize)
    gptq_err = (X @ (w - int4_dequantize(q, s, z)).t()).norm()
    rtn_err = (X @ (w - int4_dequantize(*int4_quantize(w, groupsize))).t()).norm()
    assert gptq_err < 0.8 * rtn_err


def test_gptq_checkpoint_beats_round_to_nearest_on_its_calibration_text(tmp_path):
    path = make_checkpoint(tmp_path, **SMALL)
    calib = tmp_path / "calib.txt"
    calib.write_text(quant.pydoc_text(0)[:6000])
    quantize_cli(path, "--mode", "int4", "--groupsize", "64")
    quantize_cli(path, "--mode", "int4-gptq", "--groupsize", "64", "--calibration_file", str(calib),
                 "--calibration_samples", "8", "--calibration_seq_length", "64")
    samples = quant.calibration_samples(path.parent, calib.read_text(), 8, 64)
    reference = torch.cat([logits(load_model(path, dtype=torch.float32), s[None]) for s in samples])

    def error(name):
        model = load_model(path.with_name(name), dtype=torch.float32)
        return rel_err(torch.cat([logits(model, s[None]) for s in samples]), reference)

    assert error("model_int4-gptq.g64.pth") < 0.9 * error("model_int4.g64.pth")


# --------------------------------------------------------------------------------------------------
# CLI errors: one line, exit status 1, nothing written


@pytest.mark.parametrize("args, message", [
    (["--mode", "int3"], "unknown mode 'int3'"),
    (["--mode", "int4", "--groupsize", "48"],
     "--groupsize must be one of 32, 64, 128, 256, got 48"),
    (["--mode", "int8", "--groupsize", "32"], "--groupsize applies to the int4 modes only"),
    (["--mode", "int4", "--head", "int2"], "--head must be one of int8, int4, got 'int2'"),
    (["--mode", "int8", "--head", "int4"], "--head int4 applies to the int4 modes only"),
    (["--mode", "int4-gptq", "--calibration_samples", "100000"], "calibration text has"),
    (["--mode", "int4-gptq", "--calibration_file", "nope.txt"], "calibration file not found"),
])
def test_bad_arguments_are_one_line_errors(tiny_checkpoint, args, message):
    before = sorted(tiny_checkpoint.parent.iterdir())
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: quantize_cli(tiny_checkpoint, *args))
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
    assert message in e.value.code
    assert sorted(tiny_checkpoint.parent.iterdir()) == before


def test_without_checkpoint_path_the_scripts_read_the_embedded_default():
    """`python quantize.py --mode int4 --groupsize 32` quantizes what ./scripts/prepare.sh prepared,
    the model generate.py, bench.py and eval.py read too when given no --checkpoint_path."""
    import bench
    import eval as evaluate
    import generate
    assert quantize.parse_args(["--mode", "int4"]).checkpoint_path == DEFAULT_CHECKPOINT
    assert generate.parse_args([]).checkpoint_path == DEFAULT_CHECKPOINT
    assert evaluate.parse_args([]).checkpoint_path == DEFAULT_CHECKPOINT
    assert bench.parse_args([]).checkpoint_path == [DEFAULT_CHECKPOINT]


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(BriskError, match="checkpoint not found"):
        quantize_cli(tmp_path / "nope" / "model.pth", "--mode", "int8")
    path = make_checkpoint(tmp_path, tokenizer=False)
    quantize_cli(path, "--mode", "int8")
    with pytest.raises(BriskError, match=r"model_int8.pth exists; pass --force"):
        quantize_cli(path, "--mode", "int8")
    quantize_cli(path, "--mode", "int8", "--force")
    with pytest.raises(BriskError, match=r"is already quantized \(\{'mode': 'int8'\}\)"):
        quantize_cli(path.with_name("model_int8.pth"), "--mode", "int4")
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------------------------------
# Perplexity


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tmp_path):
    model = load_model(make_checkpoint(tmp_path, tokenizer=False), dtype=torch.float32)
    with torch.no_grad():
        model.output.weight.zero_()  # every logit 0: each token has probability 1/320
    ppl, n = perplexity(model, list(range(100)), max_seq_length=32, stride=8, progress=False)
    assert n == 99 and ppl == pytest.approx(320, rel=1e-5)


def test_perplexity_windows_score_each_token_once_with_the_longest_context(tmp_path):
    model = load_model(make_checkpoint(tmp_path, tokenizer=False), dtype=torch.float32)
    ids = torch.randint(0, 320, (70,)).tolist()
    full = logits(model, torch.tensor([ids]))[0]
    nll = F.cross_entropy(full[:-1], torch.tensor(ids[1:]))
    assert perplexity(model, ids, 70, 16, progress=False) == (pytest.approx(math.exp(nll.item()), rel=1e-5), 69)
    # strided windows: every token is scored once (disjoint windows skip each window's first token)
    assert perplexity(model, ids, 32, 16, progress=False)[1] == 69
    assert perplexity(model, ids, 32, 32, progress=False)[1] == 69 - 2


@pytest.mark.slow
def test_real_model_int8_keeps_its_predictions(real_checkpoint, tmp_path):
    # quantize a linked copy, leaving the checkpoint dir untouched
    for f in real_checkpoint.parent.iterdir():
        if not (f.name.startswith("model_") and f.suffix == ".pth"):
            (tmp_path / f.name).symlink_to(f)
    quantize_cli(tmp_path / "model.pth", "--mode", "int8")
    from tokenizer import load_tokenizer
    # ~420 positions: on ~100 one flip of a near tie moved the share by 0.01 between the CPU paths
    idx = torch.tensor([load_tokenizer(tmp_path).encode(quant.pydoc_text(1)[:1600])])
    expected = logits(load_model(real_checkpoint), idx).argmax(-1)
    agree = (logits(load_model(tmp_path / "model_int8.pth"), idx).argmax(-1) == expected).float().mean()
    assert agree > 0.9
