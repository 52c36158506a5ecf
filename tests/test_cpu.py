"""cpu.py: brisk's kernels (cpu_kernels.cpp) on each instruction-set path this CPU runs, the code
Inductor generates for one-row products on the CPU, and the dtype of many-row products."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode

import cpu
import model
import quant
from cpu import Linear

pytestmark = pytest.mark.cpu_only("Inductor's C++ code and torch's kernels for the CPU")


needs_kernel = pytest.mark.skipif(cpu.kernel_isa() == 0,
                                  reason="the CPU has no AVX2 (or no compiler)")
# every kernel path this process may take (BRISK_CPU_ISA=avx2 leaves the AVX2 one only)
each_isa = pytest.mark.parametrize("isa", [pytest.param(i, id=name) for name, i in cpu.ISAS.items()
                                            if 0 < i <= cpu.kernel_isa()])


def attend(isa, q, k, v, mask, prefix=None):
    return torch.ops.brisk.attend(q, k, v, mask, prefix, isa)


def test_the_kernel_path_is_the_highest_the_cpu_runs_unless_an_environment_variable_lowers_it():
    """BRISK_CPU_ISA=avx2 takes the AVX2 path on an AVX-512 CPU, and makes brisk's every choice an
    AVX2 CPU's (cpu.CPU_CAPABILITY); none leaves the kernels unbuilt; any other value is a one-line
    error."""
    def run(value):
        code = "import cpu; print(cpu.kernel_isa(), cpu.CPU_CAPABILITY)"
        env = dict(os.environ, BRISK_CPU_ISA=value)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              cwd=os.path.dirname(cpu.__file__))
    best = cpu.kernel_isa() if "BRISK_CPU_ISA" not in os.environ else None
    if best == 2:
        assert run("avx512").stdout.split()[0] == "2"
    if best:
        assert run("avx2").stdout.split() == ["1", "AVX2"]
    assert run("none").stdout.split()[0] == "0"
    wrong = run("avx3")
    assert wrong.returncode != 0 and "BRISK_CPU_ISA must be one of none, avx2, avx512, got 'avx3'" in wrong.stderr


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["float", "int8"])
def test_compiled_one_row_product_is_a_loop_where_it_was_measured_faster(monkeypatch, capability, dtype, mode):
    """Without brisk's kernels, a compiled product on the CPU of one row (a decode step) or a few
    (cpu.FEW_ROWS: a batch's step) is Inductor's own multiply-and-sum loop rather than aten's matrix
    product or int8 kernel where the loop measured faster (every dtype on AVX-512 CPUs, fp32 weights
    on AVX2 ones: cpu.ROW_LOOP_DTYPES), and gives F.linear's values either way; more rows always use
    a matrix product. The int8 layer with torch's kernel but activations it does not take (fp32)
    always takes the loop."""
    monkeypatch.setattr(cpu, "CPU_CAPABILITY", capability)
    monkeypatch.setattr(cpu, "KERNEL_ISA", 0)  # as where brisk's kernels are not built
    loop = capability == "AVX512" or dtype == torch.float32
    matrix_product = re.compile(r"extern_kernels\.(add)?mm\b|aten\.(add)?mm\b|_weight_int8pack_mm")
    torch.manual_seed(0)
    lin = Linear(96, 40, bias=True).to(dtype)
    if mode == "int8":
        q = quant.WeightOnlyInt8Linear(96, 40, bias=True)
        q.weight, scales = quant.int8_quantize(lin.weight.float())
        q.scales, q.bias, q.kernel = scales.to(dtype), lin.bias, "aten"
        with torch.no_grad():
            # the float layer that the int8 one stands for
            lin.weight.copy_(q.weight * scales[:, None])
        lin, layer = lin, q
    else:
        layer = lin
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    x = torch.randn(1, 1, 96, dtype=dtype)
    with torch.no_grad():
        y, codes = run_and_get_code(compiled, x)
        want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
        torch.testing.assert_close(y.float(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
        assert y.shape == (1, 1, 40) and bool(matrix_product.search("".join(codes))) != loop
        _, codes = run_and_get_code(compiled, torch.randn(1, 5, 96, dtype=dtype))
        assert bool(matrix_product.search("".join(codes))) != loop
        _, codes = run_and_get_code(compiled, torch.randn(1, cpu.FEW_ROWS + 1, 96, dtype=dtype))
        assert matrix_product.search("".join(codes))


@pytest.mark.parametrize("rows, blocks", [(40, 4), (42, 2), (41, 1)])
def test_compiled_one_row_product_walks_four_blocks_of_rows_side_by_side(rows, blocks):
    """The one-row loop sums the weight's rows as four equal blocks in one loop (one accumulator per
    block), or as two or one where the row count does not divide, with F.linear's values every
    time."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 1, 96, dtype=torch.bfloat16), torch.randn(rows, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        y, codes = run_and_get_code(torch.compile(cpu.one_row_product, fullgraph=True,
                                                  dynamic=False), x, w)
    torch.testing.assert_close(y, torch.nn.functional.linear(x.float(), w.float()), rtol=1e-5,
                               atol=1e-5)
    accumulators = set(re.findall(r"\btmp_acc(\d+)_vec\b", "".join(codes)))
    assert y.shape == (1, 1, rows) and len(accumulators) == blocks


def test_compiled_one_row_loop_reads_an_activation_computed_once():
    """An activation that a one-row loop reads (GELU's erf before the down projection) is computed
    once into a buffer (cpu.INDUCTOR_OPTIONS' realize_opcount_threshold), not again inside the loop
    for every weight row, which Inductor did for exact GELU (pythia) but not for tanh or sigmoid
    (BENCHMARKS.md, "Other families, again")."""
    torch.manual_seed(0)
    layer = quant.WeightOnlyInt8Linear(256, 40)
    layer.weight, scales = quant.int8_quantize(torch.randn(40, 256))
    layer.scales = scales.bfloat16()
    step = torch.compile(lambda x: layer(torch.nn.functional.gelu(x)), fullgraph=True,
                         dynamic=False, options=cpu.INDUCTOR_OPTIONS)
    with torch.no_grad():
        _, codes = run_and_get_code(step, torch.randn(1, 1, 256, dtype=torch.bfloat16))
    loops = "".join(codes).split("#pragma omp for")
    assert any(".erf()" in loop for loop in loops)
    assert not any(".erf()" in loop and "Vectorized<int8_t>" in loop for loop in loops)


@pytest.mark.parametrize("capability, dtype, rows, gemm", [
    ("AVX2", torch.bfloat16, 32, torch.float32),  # torch's bf16 GEMM is 2-5x slower there than converting
    ("AVX2", torch.bfloat16, 16, torch.bfloat16),  # a few rows gain nothing
    ("AVX2", torch.float32, 512, torch.float32),
    ("AVX512", torch.bfloat16, 512, torch.bfloat16),
])
def test_many_bf16_rows_are_multiplied_in_fp32_on_avx2_cpus(monkeypatch, capability, dtype, rows,
                                                            gemm):
    monkeypatch.setattr(cpu, "CPU_CAPABILITY", capability)
    x = torch.randn(1, rows, 64, dtype=dtype)
    assert cpu.gemm_dtype(x) == gemm
    lin = Linear(64, 48, bias=True).to(dtype)
    y = lin(x)  # the layer's dtype either way, with F.linear's values
    assert y.dtype == dtype
    want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)



def test_a_few_rows_of_several_sequences_or_of_a_verify_pass_are_each_reduced_as_alone():
    """Eagerly, the rows of a batch's step ([B, 1, K]) and a verify pass's positions (within
    cpu.positions_alone) are multiplied one at a time, as a one-row call is (aten reduces a row
    differently beside others on some CPUs); a short prompt's positions go through one product, as a
    long prompt's do."""
    def rows_per_call(x):
        calls = []
        y = cpu.per_row(x, lambda r: calls.append(r.numel() // r.shape[-1]) or r * 2)
        assert torch.equal(y, x * 2)
        return calls
    x = torch.randn(1, 9, 8)
    assert rows_per_call(x.transpose(0, 1)) == [1] * 9  # 9 sequences of one position
    assert rows_per_call(x) == [9]  # one prompt of 9 tokens
    with cpu.positions_alone():
        assert rows_per_call(x) == [1] * 9
    assert rows_per_call(torch.randn(1, cpu.FEW_ROWS + 1, 8)) == [cpu.FEW_ROWS + 1]


class OpsSeen(TorchDispatchMode):
    """Records the name of every op dispatched eagerly."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# tails: n no multiple of 4, k none of 16, 32 or 64
SHAPES = [(40, 96), (43, 100), (7, 33), (1536, 576)]


def check_rows_alone(product, x, exact, rtol):
    """product(rows) of 1 to FEW_ROWS rows of x: exact's values within rtol of its largest, and each
    row's bitwise the same whatever rows are beside it (any count, first or last rows)."""
    alone = torch.cat([product(row[None]) for row in x])  # [FEW_ROWS, n]
    torch.testing.assert_close(alone.double(), exact, rtol=rtol,
                               atol=rtol * exact.abs().max().item())
    for m in range(2, cpu.FEW_ROWS + 1):
        assert torch.equal(product(x[:m]), alone[:m]), f"{m} rows"
        assert torch.equal(product(x[-m:]), alone[-m:]), f"the last {m} rows"


@needs_kernel
@each_isa
@pytest.mark.parametrize("n, k", SHAPES)
def test_the_bf16_kernel_reduces_each_row_as_if_it_were_alone(n, k, isa):
    """brisk's bf16 kernel, on each path: 1 to FEW_ROWS rows give the exact product within fp32
    rounding, each row's result bitwise the same whatever rows are beside it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(cpu.FEW_ROWS, k, generator=g).to(torch.bfloat16)
    check_rows_alone(lambda rows: torch.ops.brisk.rows_product(rows, w, isa), x,
                     x.double() @ w.double().t(), 1e-5)


def int8_reference(x, w, scales):
    """The int8 kernel's arithmetic in plain torch: each row's activations quantized per block of 32
    (round(x / s), s = max |x| / 127, as llama.cpp's Q8_0), each block's integer dot exact, scaled
    by its s, summed (fp64 here), times the weight's scale per output channel."""
    k = x.shape[-1]
    pad = -k % 32
    xb = torch.nn.functional.pad(x.float(), (0, pad)).view(x.shape[0], -1, 32)  # [M, K/32, 32]
    s = xb.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(s > 0, xb / s, 0).round()
    wb = torch.nn.functional.pad(w.double(), (0, pad)).view(w.shape[0], -1, 32)  # [N, K/32, 32]
    dots = torch.einsum("mbk,nbk->mnb", xq.double(), wb)  # [M, N, K/32], exact integers
    return (dots * s[:, None, :, 0].double()).sum(-1) * scales.double()


@needs_kernel
@each_isa
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_int8_kernel_is_its_reference_arithmetic_and_reduces_each_row_as_if_alone(n, k, dtype, isa):
    """brisk's int8 kernel, on each path, for bf16 or fp32 activations: int8_reference's values
    within fp32 rounding (a block's activation rounded otherwise would be off by far more), each row
    bitwise alone; a row of zeros gives zeros."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, generator=g) / 100).bfloat16()
    # blocks of every scale
    x = (torch.randn(cpu.FEW_ROWS, k, generator=g) * torch.logspace(-2, 1, k)).to(dtype)
    x[3] = 0
    check_rows_alone(lambda rows: torch.ops.brisk.int8_rows_product(rows, w, scales, isa), x,
                     int8_reference(x, w, scales), 1e-5)
    assert not torch.ops.brisk.int8_rows_product(x[3:4], w, scales, isa).any()


def run_seeing(layer, x, compile: bool, op: str):
    """(layer(x), whether the op named op ran): eagerly as dispatched, compiled as it stands in
    Inductor's code."""
    with torch.no_grad():
        if compile:
            y, codes = run_and_get_code(torch.compile(layer, fullgraph=True, dynamic=False), x)
            return y, op in "".join(codes)
        with OpsSeen() as seen:
            return layer(x), op in seen.names


@needs_kernel
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("rows, dtype, kernel", [
    (1, torch.bfloat16, True), (cpu.FEW_ROWS, torch.float32, True),
    (cpu.FEW_ROWS + 1, torch.bfloat16, True), (300, torch.bfloat16, True)])
def test_an_int8_linear_takes_brisks_kernel_for_every_row_count(compile, rows, dtype, kernel):
    """An int8 layer packed for the CPU (quant.pack_for_device: kernel "brisk") multiplies any
    number of rows (a decode step, a prompt's) in brisk's int8 kernel, eagerly and compiled, with
    int8_reference's values."""
    torch.manual_seed(0)
    layer = quant.WeightOnlyInt8Linear(96, 40, bias=True)
    layer.weight, scales = quant.int8_quantize(torch.randn(40, 96))
    layer.scales, layer.bias = scales.to(dtype), torch.nn.Parameter(torch.randn(40).to(dtype))
    layer.kernel = quant.int8_kernel(torch.device("cpu"), 96)
    assert layer.kernel == "brisk"
    x = torch.randn(1, rows, 96, dtype=dtype)
    y, used = run_seeing(layer, x, compile, "brisk.int8_rows_product")
    assert used == kernel and y.dtype == dtype
    if kernel:
        want = int8_reference(x[0], layer.weight, layer.scales) + layer.bias.double()
        torch.testing.assert_close(y[0].double(), want.to(dtype).double(), rtol=1e-2, atol=1e-2)


@needs_kernel
def test_a_linear_chooses_its_product_once_when_built_cast_or_loaded():
    """cpu.Linear decides its product per weight, not per call: built in fp32 it multiplies row by
    row; cast to bf16, or given bf16 tensors by load_state_dict(assign=True) on the meta device (as
    checkpoint.load_model does), it takes brisk's kernel."""
    lin = Linear(96, 40)
    assert lin.product is cpu.rows_linear
    assert lin.to(torch.bfloat16).product is cpu.kernel_linear
    with torch.device("meta"):
        loaded = Linear(96, 40)
    assert loaded.product is cpu.rows_linear
    loaded.load_state_dict(lin.state_dict(), assign=True)
    assert loaded.product is cpu.kernel_linear
    assert lin.float().product is cpu.rows_linear


@needs_kernel
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("rows, dtype, kernel", [
    (1, torch.bfloat16, True), (cpu.FEW_ROWS, torch.bfloat16, True),
    (cpu.FEW_ROWS + 1, torch.bfloat16, True), (300, torch.bfloat16, True),
    (3, torch.float32, False),
])
def test_a_bf16_linear_takes_the_kernel_for_every_row_count(compile, rows, dtype, kernel):
    """A bf16 Linear multiplies any number of rows in brisk's kernel (on this process's path),
    eagerly and compiled; an fp32 layer never takes it. F.linear's values every time."""
    torch.manual_seed(0)
    lin = Linear(96, 40, bias=True).to(dtype)
    x = torch.randn(1, rows, 96, dtype=dtype)
    y, used = run_seeing(lin, x, compile, "brisk.rows_product")
    assert used == kernel
    want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)


@needs_kernel
@each_isa
@pytest.mark.parametrize("rows, T, alibi", [(1, 1, False), (4, 1, False), (3, 5, True)])
def test_the_kernel_attends_as_model_attend_and_each_row_as_if_alone(rows, T, alibi, isa):
    """brisk's attention for a few queries (decode steps, a verify pass) against an fp32 cache, a
    view of fewer positions than the cache holds: model.attend's values within fp32 rounding, for a
    causal (bool) or ALiBi (float) mask, and each row's bitwise the same with any rows beside it."""
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, S = 6, 2, 64, 100
    k_cache, v_cache = (torch.randn(rows + 1, Hkv, S + 28, D, generator=g) for _ in range(2))
    k, v = k_cache[1:, :, :S], v_cache[1:, :, :S]  # as Attention passes them
    q = torch.randn(rows, T, H, D, generator=g).transpose(1, 2)  # [B, H, T, D], not contiguous
    # [B, 1, 1, S]: the last keys masked
    mask = torch.arange(S) < 90 - torch.arange(rows)[:, None, None, None]
    mask = mask.expand(rows, 1, T, S)
    if alibi:
        mask = torch.where(mask, -0.1 * (S - torch.arange(S)).float(), -float("inf"))
    y = attend(isa, q, k, v, mask)
    torch.testing.assert_close(y, model.attend(q, k, v, mask), rtol=1e-5, atol=1e-5)
    for i in range(rows):
        assert torch.equal(attend(isa, q[i:i + 1], k[i:i + 1], v[i:i + 1], mask[i:i + 1]),
                           y[i:i + 1])
    one = attend(isa, q[:1], k[:1], v[:1], mask[0])  # a 3-d mask, as one sequence's decode step has
    assert torch.equal(one, y[:1])


@needs_kernel
@each_isa
@pytest.mark.parametrize("D", cpu.ATTEND_HEAD_DIMS)
def test_the_kernel_reads_a_bf16_cache_as_the_same_values_in_fp32(D, isa):
    """A bf16 model's cache holds bf16 where the kernel attends (cpu.kv_cache_dtype): half the
    bytes, and bitwise the result of the same values held in fp32, for every head size the kernel is
    built for (S not a multiple of its tiles of 16 positions, a masked tail)."""
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 2, 37, D, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(2, 4, 1, D, generator=g)
    mask = (torch.arange(37) < 30)[None, None, None]
    y = attend(isa, q, k, v, mask)
    assert torch.equal(y, attend(isa, q, k.float(), v.float(), mask))
    torch.testing.assert_close(y, model.attend(q, k.float(), v.float(), mask), rtol=1e-5, atol=1e-5)


def test_an_int8_cache_holds_each_vector_as_int8_values_and_an_fp32_scale():
    """--kv_cache_dtype int8: each [position, head] vector x of D values is stored as q = round(x /
    d) and the 4 bytes of d = max |x| / 127 (cpu.kv_store), and read as q * d (cpu.kv_load): within
    half a step d of x, a vector of zeros exactly."""
    g = torch.Generator().manual_seed(0)
    # [B, Hkv, S, D], any magnitude
    x = torch.randn(2, 3, 5, 64, generator=g) * torch.logspace(-3, 3, 5)[:, None]
    x[0, 0, 0] = 0
    c = cpu.kv_store(x, torch.int8)
    assert c.dtype == torch.int8 and c.shape == (2, 3, 5, 64 + 4)
    q, d = c[..., :64], c[..., 64:].view(torch.float32)  # [..., D], [..., 1]
    assert torch.equal(d, x.abs().amax(-1, keepdim=True) / 127)
    assert torch.equal(q.abs().amax(-1).flatten()[1:], torch.full((29,), 127, dtype=torch.int8))
    y = cpu.kv_load(c, torch.float32)
    assert torch.equal(y, q.float() * d) and not y[0, 0, 0].any()
    assert ((y - x).abs() <= d * 0.5001).all()
    assert cpu.kv_load(c, torch.bfloat16).dtype == torch.bfloat16


# every path of brisk's attention: the SIMD ones this process may take and the scalar one (isa 0)
each_attend_path = pytest.mark.parametrize("isa", [pytest.param(i, id=name if i else "scalar")
                                                   for name, i in cpu.ISAS.items()
                                                   if i <= cpu.kernel_isa()])


@needs_kernel
@each_attend_path
@pytest.mark.parametrize("D, alibi",
                         [(16, True), (64, False), (96, True), (128, False), (256, False)])
def test_the_kernel_reads_an_int8_cache_as_its_dequantized_values(D, alibi, isa):
    """An int8 cache (cpu.kv_store: values and a scale per position and head, D + 4 bytes) is read
    as the values plain torch dequantizes (cpu.kv_load): bitwise the result of those values held in
    fp32, and model.attend's over them within fp32 rounding, on each SIMD path and in the scalar
    reference (isa 0), for a view of fewer positions than the cache holds, a causal (bool) or ALiBi
    (float) mask."""
    g = torch.Generator().manual_seed(0)
    rows, H, Hkv, T, S = 3, 6, 2, 2, 70
    k, v = (cpu.kv_store(torch.randn(rows, Hkv, S + 9, D, generator=g), torch.int8)[:, :, :S]
            for _ in range(2))
    q = torch.randn(rows, H, T, D, generator=g)
    # [1, 1, T, S]: the last keys masked
    mask = (torch.arange(S) <= 60 + torch.arange(T)[:, None])[None, None]
    if alibi:
        mask = torch.where(mask, -0.1 * (S - torch.arange(S)).float(), -float("inf"))
    kf, vf = cpu.kv_load(k, torch.float32), cpu.kv_load(v, torch.float32)
    y = attend(isa, q, k, v, mask)
    assert torch.equal(y, attend(isa, q, kf, vf, mask))
    torch.testing.assert_close(y, model.attend(q, kf, vf, mask), rtol=1e-5, atol=1e-5)


@needs_kernel
@each_isa
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_rows_that_share_a_prompt_read_it_from_one_row(isa, dtype):
    """model.KVCache.prefix (set by Batch.fork for beams): a row whose first n positions equal row
    src's reads them from there, so that they come from memory once for all beams; bitwise the
    result of reading its own copy, which spoiling that copy shows is not read. A hint to a row
    outside the call's rows is ignored. In a bf16 or an int8 cache alike."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D, S, n = 4, 6, 2, 2, 64, 77, 50
    k, v = (cpu.kv_store(torch.randn(B, Hkv, S, D, generator=g), dtype) for _ in range(2))
    # rows 1-3 forked from row 0 after n positions
    k[1:, :, :n], v[1:, :, :n] = k[:1, :, :n], v[:1, :, :n]
    q = torch.randn(B, H, T, D, generator=g)
    mask = (torch.arange(S) < 70 + torch.arange(T)[:, None])[None, None]  # [1, 1, T, S]
    prefix = torch.tensor([[0, 0], [-1, n], [-2, n], [-3, n]])  # (src - row, n)
    want = attend(isa, q, k, v, mask)
    assert torch.equal(attend(isa, q, k, v, mask, prefix), want)
    spoiled_k, spoiled_v = k.clone(), v.clone()
    spoiled_k[1:, :, :n], spoiled_v[1:, :, :n] = 0, 0
    assert torch.equal(attend(isa, q, spoiled_k, spoiled_v, mask, prefix), want)
    assert not torch.equal(attend(isa, q, spoiled_k, spoiled_v, mask), want)
    # src -1: ignored
    alone = attend(isa, q[1:2], spoiled_k[1:2], spoiled_v[1:2], mask, prefix[1:2])
    assert torch.equal(alone, attend(isa, q[1:2], spoiled_k[1:2], spoiled_v[1:2], mask))


# --------------------------------------------------------------------------------------------------
# brisk's int4 kernel (cpu_int4.cpp)

needs_int4_kernel = pytest.mark.skipif(cpu.kernel_isa() == 0,
                                       reason="no AVX2 (or no compiler): aten's int4 kernel")
ISA_PATHS = [isa for isa in (1, 2) if isa <= cpu.kernel_isa()]  # the SIMD paths this CPU runs


def int4_weight(n, k, groupsize, seed=0):
    """A random int4 weight: its values [n, k], scales and zeros [n, k/g] (bf16 values), and brisk's
    packing."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, scales, zeros = quant.int4_quantize(w, groupsize)
    packed = torch.ops.brisk.int4_pack(q, quant.to_scales_and_zeros(scales, zeros).bfloat16(),
                                       groupsize)
    return q, scales, zeros, packed


def int4_reference(x, q, scales, zeros, groupsize):
    """What the kernel computes, in plain torch (fp64 sums): each row of x [M, K] quantized to int8
    in blocks of 32 (x ~ d * xq, xq = round(x / d), d = max|x| / 127), as the int8 kernel's
    activations, then y = sum over groups of scale * sum_b d_b (q - 8) . xq_b + zero * sum_b d_b
    sum(xq_b)."""
    M, K = x.shape
    xb = x.float().reshape(M, K // 32, 32)
    d = xb.abs().amax(-1) / 127  # [M, K/32]
    xq = torch.where(d[..., None] != 0, xb / d[..., None], 0).round().double()
    dots = torch.einsum("nbk,mbk->mnb", (q.double() - 8).reshape(-1, K // 32, 32),
                        xq) * d.double()[:, None]
    sums = xq.sum(-1) * d.double()  # [M, K/32]
    per = groupsize // 32  # blocks per group
    dots, sums = dots.reshape(M, -1, K // groupsize, per).sum(-1), sums.reshape(M, K // groupsize, per).sum(-1)
    return (dots * scales.double()).sum(-1) + sums @ zeros.double().t()  # [M, N]


@needs_int4_kernel
@pytest.mark.parametrize("n, k, groupsize",
                         [(48, 96, 32), (16, 64, 64), (592, 384, 128), (80, 256, 256),
                          (1536, 576, 32)])
def test_the_int4_kernel_computes_its_arithmetic_on_every_path(n, k, groupsize):
    """brisk's int4 kernel: the plain-torch reference of its arithmetic (int8 activations per block
    of 32) within fp32 rounding, bitwise the same on the AVX2 and AVX-512 paths as in the scalar
    reference (isa 0), and each row's result bitwise the same with any rows beside it (row counts
    that leave tails of the tiles of 4 and 2 rows, numbers of 16-row blocks that the threads do not
    share evenly)."""
    q, scales, zeros, packed = int4_weight(n, k, groupsize)
    x = torch.randn(cpu.FEW_ROWS, k, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 1, k)
    x[3, :32] = 0  # a block of zeros: d = 0
    want = int4_reference(x, q, scales, zeros, groupsize)
    scalar = torch.ops.brisk.int4_product(x, packed, groupsize, 0)
    torch.testing.assert_close(scalar.double(), want, rtol=1e-5,
                               atol=1e-5 * want.abs().max().item())
    for isa in ISA_PATHS:
        alone = torch.cat([torch.ops.brisk.int4_product(row[None], packed, groupsize, isa)
                           for row in x])
        assert torch.equal(alone, scalar), f"isa {isa}"
        for m in (2, 3, 5, 7, cpu.FEW_ROWS):
            assert torch.equal(torch.ops.brisk.int4_product(x[-m:], packed, groupsize, isa),
                               alone[-m:]), (isa, m)
    assert torch.equal(torch.ops.brisk.int4_product(x.bfloat16(), packed, groupsize, ISA_PATHS[-1]),
                       torch.ops.brisk.int4_product(x.bfloat16().float(), packed, groupsize,
                                                    ISA_PATHS[-1]))


@needs_int4_kernel
def test_int8_activations_stay_within_a_percent_of_the_float_product():
    """The precision of the int8 activations (what the README states): against the product of the
    same int4 weight with the activations unrounded, an error of well under 1% of the output's
    norm."""
    q, scales, zeros, packed = int4_weight(256, 1024, 32)
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(1))
    exact = x.double() @ quant.int4_dequantize(q, scales, zeros).double().t()
    y = torch.ops.brisk.int4_product(x, packed, 32, cpu.kernel_isa())
    assert ((y - exact).norm() / exact.norm()).item() < 0.01


@needs_int4_kernel
@pytest.mark.parametrize("groupsize", [32, 64, 128, 256])
def test_the_int4_layout_holds_every_weight_where_the_product_reads_it(groupsize):
    """brisk's int4 layout (int4_pack) read back through its product: unit rows of activations (127
    at input k, quantized exactly: d = 1, q = 127) give 127 times column k of the file's weight,
    quant.int4_dequantize's values, within fp32 rounding; a value, scale or zero in the wrong place
    would be off by a whole step."""
    q, scales, zeros, packed = int4_weight(48, 512, groupsize)
    want = 127 * quant.int4_dequantize(q, scales, zeros).t()  # [K, N]
    for isa in [0] + ISA_PATHS:
        y = torch.ops.brisk.int4_product(127 * torch.eye(512), packed, groupsize, isa)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def int4_layer(n, k, groupsize, kernel):
    layer = quant.WeightOnlyInt4Linear(k, n, groupsize, bias=True)
    kp = quant.padded(k, groupsize)
    q, scales, zeros = quant.int4_quantize(torch.nn.functional.pad(torch.randn(n, k), (0, kp - k)),
                                           groupsize)
    layer.weight, layer.bias = quant.pack_nibbles(q), torch.nn.Parameter(torch.randn(n))
    layer.scales_and_zeros = quant.to_scales_and_zeros(scales, zeros).bfloat16()
    layer.pack(kernel)
    return layer


@needs_int4_kernel
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("rows", [1, cpu.FEW_ROWS, 600])
def test_an_int4_layer_takes_the_kernel_for_every_row_count(compile, rows):
    """An int4 layer packed for the CPU (quant.int4_kernel: "brisk") multiplies any number of rows
    in brisk's kernel, eagerly and compiled (100 inputs padded to whole groups of 32). The values of
    the dequantized weight (within the kernel's int8 activations)."""
    assert quant.int4_kernel(torch.device("cpu"), 48, 128) == "brisk"
    torch.manual_seed(0)
    layer = int4_layer(48, 100, 32, "brisk")
    torch.manual_seed(0)
    plain = int4_layer(48, 100, 32, None)  # the same weight, dequantized at every call
    x = torch.randn(1, rows, 100, dtype=torch.bfloat16)
    with torch.no_grad():
        if compile:
            compiled = torch.compile(layer, fullgraph=True, dynamic=False,
                                     options=cpu.INDUCTOR_OPTIONS)
            y, codes = run_and_get_code(compiled, x)
            assert "brisk.int4_product" in "".join(codes)
            assert torch.equal(y, layer(x))  # the compiled step keeps eager's roundings
        else:
            with OpsSeen() as seen:
                y = layer(x)
            assert "brisk.int4_product" in seen.names
    want = plain(x.float())
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
