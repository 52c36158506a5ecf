"""Everything brisk does differently on a CPU, each with why in a line; the figures are in
BENCHMARKS.md.

- kernel_isa: the path of brisk's C++ kernels (SOURCES): AVX-512, AVX2 or none, once per
  process.
- Linear: nn.Linear whose products reduce each row as if alone (batch and split invariance): bf16
  ones, of any number of rows, in brisk's kernel where the CPU has AVX2 at least; without it those
  of a few rows (a decode step, a batch's step, a verify pass) compiled in a loop Inductor writes,
  faster than aten's.
- gemm_dtype: on AVX2 CPUs many bf16 rows are multiplied in fp32.
- kv_cache_dtype, attend_dtype: the KV cache and attention in fp32 on the CPU (bf16 where brisk's
  kernel attends: kernel_attends).
- kv_store, kv_load: an int8 KV cache (--kv_cache_dtype int8, on any device): a scale per position
  and head.
- int8_rows_product: brisk's int8 kernel for quant.WeightOnlyInt8Linear.
- INDUCTOR_OPTIONS: Inductor settings of a compiled CPU step.
- cache_dir: where compiled steps are kept, Inductor's C++ beside them (one folder per CPU
  capability).
- int8_kernel: the kernel of an int8 layer; kernel_isa, the SIMD path of brisk's kernels (int4:
  cpu_int4.cpp). A fork that runs on GPUs only can replace `Linear` with nn.Linear in model.py and
  ignore the rest.
"""
import contextlib
import hashlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils import cpp_extension

from cli import BriskError

# Weight dtypes whose compiled one-row product Inductor's loop computes faster than aten's kernel,
# by CPU capability: without AVX-512 Inductor's bf16 and int8 conversions are slow, fp32 still wins
# (BENCHMARKS.md, "AMD EPYC Zen 3").
ROW_LOOP_DTYPES = {"AVX512": {torch.float32, torch.bfloat16, torch.float16, torch.int8},
                   "AVX2": {torch.float32}}
# torch's CPU capability, read once (torch.compile cannot trace the call); an AVX2 CPU's under
# BRISK_CPU_ISA=avx2, so that every choice brisk makes is that CPU's (torch's own kernels and
# Inductor follow ATEN_CPU_CAPABILITY=avx2)
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
if os.environ.get("BRISK_CPU_ISA") == "avx2" and CPU_CAPABILITY.startswith("AVX512"):
    CPU_CAPABILITY = "AVX2"

# Inductor settings of a compiled CPU step (engine.compile_step), each measured (BENCHMARKS.md,
# "Compiled decode step"):
INDUCTOR_OPTIONS = {
    "cpp_wrapper": True,  # kernels called from C++: no Python between them
    "cpp_wrapper_build_separate": True,  # the glue that calls them built apart from them: a cold compile's largest part
    "aot_inductor.compile_wrapper_opt_level": "O0",  # and unoptimised: a third of the build, and no slower
    "size_asserts": False, "alignment_asserts": False, "scalar_asserts": False,  # no checks of shapes the trace proved
    "cpp.vec_isa_ok": True,  # the CPU's flags suffice: Inductor's check runs a Python per instruction set, every run
    "realize_opcount_threshold": 4,  # an activation read by a row loop (exact GELU) is computed once, not per row
    "realize_acc_reads_threshold": 1,  # a norm's output is stored once, not recomputed inside every row loop
    "cpp.enable_floating_point_contract_flag": "fast",  # multiply-adds of the row loops become FMAs
    # each bf16 rounding that eager code makes is kept (else dropped inside a fusion, differently
    # per graph shape): rows reduced alike (FEW_ROWS) then give the same logits in every graph, a
    # verify pass its decode steps'
    "emulate_precision_casts": True,
}

INT8_KERNEL_MAX_ROWS = 16  # up to this many rows torch's int8 kernel (no brisk kernel) beats one GEMM
# inputs per block of activations the int8 kernel rounds to int8 (cpu_kernels.cpp), as Q8_0
INT8_BLOCK = 32
# weight rows a block of brisk's int4 layout interleaves (cpu_int4.cpp): N must be a multiple
INT4_ROWS = 16


# Products of at most this many rows (the decode step of a batch, a speculative verify pass) reduce
# each row alone and as a single row's product does, so that a row's product never depends on the
# other rows. Eagerly a batch's greedy rows then equal their prompts run alone, and a verify pass
# its decode steps, in any dtype; compiled too where bf16 takes brisk's kernels (tested;
# INDUCTOR_OPTIONS keeps eager's roundings), else within rounding only (Inductor may order the rest
# of the step's reductions per graph: fp32 differs in the last bits).
FEW_ROWS = 16


def one_row_on_cpu(x: Tensor, weight: Optional[Tensor] = None) -> bool:
    """True while torch.compile traces a product of a single row (a decode step), or of a few
    (FEW_ROWS), on the CPU, with a weight whose dtype Inductor's loop handles faster than aten does
    on this CPU (ROW_LOOP_DTYPES); any weight if None. aten's one-row mm moves a weight well below
    memory speed; Inductor turns `(x * w).sum(-1)` into a vectorized loop over w's rows that reaches
    it. Eagerly the same expression would build x * w in memory."""
    if not (torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.numel() <= FEW_ROWS * x.shape[-1]):
        return False
    return weight is None or weight.dtype in ROW_LOOP_DTYPES.get(CPU_CAPABILITY,
                                                                 ROW_LOOP_DTYPES["AVX2"])


def cache_dir() -> Path:
    """Where brisk keeps what it compiles: $BRISK_CACHE_DIR, else ~/.cache/brisk/compiled."""
    base = os.environ.get("BRISK_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "brisk" / "compiled"


# Inductor's cache (the C++ it builds, which a saved step loads) inside brisk's, one per CPU
# capability: in /tmp it would not outlive a reboot (a warm start would build the C++ again), and
# Inductor does not key it on the capability (a loop built for AVX-512 gave wrong values under
# ATEN_CPU_CAPABILITY=avx2)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      str(cache_dir() / f"inductor-{torch.backends.cpu.get_cpu_capability()}"))

# brisk's kernel paths: BRISK_CPU_ISA's values, kernel_isa's levels
ISAS = {"none": 0, "avx2": 1, "avx512": 2}
# the files of brisk's C++ extension, built as one (in parallel), and the header they share
SOURCES = ["cpu_kernels.cpp", "cpu_attend.cpp", "cpu_int4.cpp"]
HEADER = "cpu_kernels.h"
KERNEL_ISA: Optional[int] = None  # see kernel_isa


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the answer
def kernel_isa() -> int:
    """The path brisk's C++ kernels (SOURCES) take, decided once: 2 AVX-512 (F, BW, VL, BF16, VNNI),
    1 AVX2 (with FMA and F16C), 0 none (another architecture, no compiler: aten's and Inductor's
    code serve). The highest this CPU runs, capped by the environment variable BRISK_CPU_ISA
    (avx512, avx2 or none), which tests both paths on one machine. Every kernel op takes it as its
    last argument. The first call builds the extension (10-60 s; torch keeps it in
    ~/.cache/torch_extensions)."""
    global KERNEL_ISA
    if KERNEL_ISA is None:
        KERNEL_ISA = load_kernels()
    return KERNEL_ISA


def load_kernels() -> int:
    forced = os.environ.get("BRISK_CPU_ISA", "avx512")
    if forced not in ISAS:
        raise BriskError(f"BRISK_CPU_ISA must be one of {', '.join(ISAS)}, got {forced!r}")
    if ISAS[forced] == 0 or platform.machine().lower() not in ("x86_64", "amd64"):
        return 0
    here = os.path.dirname(os.path.abspath(__file__))
    # torch rebuilds when a source or a flag changes: the header's hash as a flag covers it too
    header = hashlib.sha1(open(os.path.join(here, HEADER), "rb").read()).hexdigest()[:16]
    start = time.perf_counter()
    try:
        # OpenMP, else at::parallel_for runs its range on one thread; at run time the extension
        # binds to the libgomp.so.1 torch has loaded (one pool of threads), and takes
        # torch.set_num_threads' count
        cpp_extension.load("brisk_cpu_kernels", [os.path.join(here, f) for f in SOURCES],
                           extra_cflags=["-O3", "-fopenmp", f"-DBRISK_HEADER={header}"],
                           extra_ldflags=["-fopenmp"],
                           is_python_module=False)
    except (RuntimeError, OSError) as e:  # no compiler, or no ninja
        print(f"brisk: {', '.join(SOURCES)} not built ({str(e).splitlines()[0]}); aten and Inductor serve",
              file=sys.stderr)
        return 0
    if (seconds := time.perf_counter() - start) > 2:  # built now, not loaded from torch's cache
        print(f"brisk: built {', '.join(SOURCES)} in {seconds:.0f} s (once: torch caches it)",
              file=sys.stderr)
    best = torch.ops.brisk.cpu_isa()
    if "BRISK_CPU_ISA" in os.environ and ISAS[forced] > best:
        raise BriskError(f"BRISK_CPU_ISA={forced}, but this CPU runs {[k for k, v in ISAS.items() if v == best][0]} "
                         "at most")
    register_fakes()
    return min(best, ISAS[forced])


def register_fakes() -> None:
    # the shapes of the kernels' results, for torch.compile
    def rows(x: Tensor, w: Tensor, *_) -> Tensor:
        return x.new_empty((x.numel() // x.shape[-1], w.shape[0]), dtype=torch.float32)
    torch.library.register_fake("brisk::rows_product")(rows)
    torch.library.register_fake("brisk::int8_rows_product")(rows)
    torch.library.register_fake("brisk::attend")(
        lambda q, *_: torch.empty_like(q, memory_format=torch.contiguous_format))
    torch.library.register_fake("brisk::int4_product")(
        lambda x, w, g, isa: x.new_empty((x.numel() // x.shape[-1], w.shape[0] * INT4_ROWS),
                                         dtype=torch.float32))


def kernel_rows(weight: Tensor) -> bool:
    """True for a bf16 weight on a CPU with brisk's kernel (either path), which then multiplies
    (bf16) activations of any number of rows: each row reduced in one order, a prompt's whole, in
    chunks or one position at a time alike."""
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and kernel_isa() > 0


ATTEND_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128, 256)  # those cpu_attend.cpp's attend is built for


def kernel_attends(q: Tensor, k: Tensor, mask: Optional[Tensor]) -> bool:
    """True where brisk's kernel computes attention, a step's or a prompt's (model.attend's
    contract, a tile of keys loaded once for the queries that read it): a cache in fp32, bf16 or
    int8 (kv_store) on a CPU with the kernel, a head size in ATTEND_HEAD_DIMS, a bool, fp32 or int64
    (last positions: model.last_mask) mask."""
    return (mask is not None and mask.dtype in (torch.bool, torch.float32, torch.long)
            and q.device.type == "cpu" and k.dtype in KV_DTYPES.values()
            and q.shape[-1] in ATTEND_HEAD_DIMS and kernel_isa() > 0)


def two_rows_cost_one(model: nn.Module) -> bool:
    """True where every product of model's one-row step is brisk's kernel (bf16 weights on the CPU,
    with the kernel): a step of two rows then costs no more than one, so a lone row can take a
    compiled step's multi-row graph (one graph for every count), and every row is reduced alike
    whatever the graph: with eager's bf16 roundings kept (INDUCTOR_OPTIONS), compiled rows are
    bitwise a row alone."""
    layers = [m for m in model.modules() if hasattr(m, "in_features")]
    return all(m.weight.dtype == torch.bfloat16
               and m.weight.device.type == "cpu" for m in layers) and kernel_isa() > 0


def rows_product(x: Tensor, weight: Tensor) -> Tensor:
    # x [..., K] bf16 (any rows), weight [N, K] bf16 -> [..., N] fp32, each row as if alone
    return torch.ops.brisk.rows_product(x, weight, kernel_isa()).view(*x.shape[:-1],
                                                                      weight.shape[0])


def int8_rows_product(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    # x [..., K] (any rows), weight [N, K] int8, scales [N] -> [..., N] fp32, each row as if alone
    return torch.ops.brisk.int8_rows_product(x, weight, scales, kernel_isa()).view(*x.shape[:-1], weight.shape[0])


def gemm_dtype(x: Tensor) -> torch.dtype:
    """The dtype to multiply x's rows in: fp32 for 32 or more bf16 rows on an AVX2 CPU, where
    torch's bf16 GEMM runs slower than converting both operands to fp32 (BENCHMARKS.md, "AMD EPYC
    Zen 3"); x's own dtype otherwise."""
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and CPU_CAPABILITY == "AVX2"
            and x.numel() >= 32 * x.shape[-1]):
        return torch.float32
    return x.dtype


def one_row_product(x: Tensor, weight: Tensor) -> Tensor:
    # x: [..., K] (up to FEW_ROWS rows), weight: [N, K] of any dtype -> [..., N] in fp32, the loop
    # one_row_on_cpu means. The weight's rows are summed as four blocks that Inductor walks side by
    # side: four memory streams in flight instead of one, and each load of x serves four rows
    # (BENCHMARKS.md, "Second Intel Xeon"). x's rows are the outermost loop, each reduced alone
    # exactly as a single row is; a loop over the weight's rows outside them makes Inductor store
    # every product before summing (10x slower: BENCHMARKS.md, "Few-row products").
    # fewer where N is not a multiple of 4
    nb = next(b for b in (4, 2, 1) if weight.shape[0] % b == 0)
    xs = x.reshape(-1, 1, x.shape[-1]).float()  # [M, 1, K]
    y = torch.cat([(block.float() * xs).sum(-1) for block in weight.chunk(nb)], dim=1)  # [M, N]
    return y.reshape(*x.shape[:-1], weight.shape[0])


_positions_alone = False  # see positions_alone


@contextlib.contextmanager
def positions_alone():
    """Within it, per_row also splits the positions of one sequence ([1, T, K]: a speculative verify
    pass, which must equal its decode steps). Outside, only rows of several sequences are split: a
    short prompt's positions go through one product, as a long prompt's do (one per position was
    much slower: BENCHMARKS.md, "The server under load")."""
    global _positions_alone
    before, _positions_alone = _positions_alone, True
    try:
        yield
    finally:
        _positions_alone = before


def per_row(x: Tensor, product) -> Tensor:
    """product(x) for x [B, T, K], computed one row at a time for 2 to FEW_ROWS rows of several
    sequences (B > 1), or of one within positions_alone, as a batch of one would be: aten's kernels
    reduce a row differently with other rows beside it (bf16 most of all)."""
    M = x.numel() // x.shape[-1]
    if not (1 < M <= FEW_ROWS and (x.shape[0] > 1 or _positions_alone)):
        return product(x)
    ys = [product(row) for row in x.reshape(M, 1, 1, x.shape[-1])]  # M x [1, 1, N]
    return torch.cat(ys).reshape(*x.shape[:-1], -1)


class Linear(nn.Linear):
    """nn.Linear whose products on the CPU reduce each row as if alone: bf16 ones, of any number of
    rows, in brisk's kernel (kernel_linear); otherwise row by row (rows_linear). Which one is
    decided once per weight (choose): when the layer is built, cast or moved, and loaded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.choose()

    def choose(self) -> None:
        # F.linear's stand-in: a function, not a bound method (no cycle keeps the layer alive)
        self.product = kernel_linear if kernel_rows(self.weight) else rows_linear

    def _apply(self, *args, **kwargs):  # .to(), .bfloat16(), ...
        super()._apply(*args, **kwargs)
        self.choose()
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # load_state_dict(..., assign=True)
        super()._load_from_state_dict(*args, **kwargs)
        self.choose()

    def forward(self, x: Tensor) -> Tensor:
        return self.product(x, self.weight, self.bias)


def kernel_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    y = rows_product(x, weight).to(x.dtype)  # any number of rows, each as if alone
    return y if bias is None else y + bias


def rows_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    # up to FEW_ROWS rows compiled in Inductor's loop (one_row_on_cpu), else eagerly one row at a
    # time (per_row)
    if one_row_on_cpu(x, weight):
        y = one_row_product(x, weight).to(x.dtype)
        return y if bias is None else y + bias
    return per_row(x, lambda rows: gemm(rows, weight, bias))


def gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    dt = gemm_dtype(x)
    bias = None if bias is None else bias.to(dt)
    return F.linear(x.to(dt), weight.to(dt), bias).to(x.dtype)


def attend_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """What attention computes in outside brisk's kernel: fp32 on the CPU, whose attention runs
    bf16/fp16 several times slower than fp32 (BENCHMARKS.md, "KV cache in fp32 on the CPU"); the
    model's dtype elsewhere."""
    return torch.float32 if device.type == "cpu" else dtype


def kv_cache_dtype(device: torch.device, dtype: torch.dtype, head_dim: int) -> torch.dtype:
    """What the KV cache holds: a bf16 model's own dtype where brisk's kernel reads it (half the
    bytes of fp32, the same values), else attend_dtype."""
    if device.type == "cpu" and dtype == torch.bfloat16 and head_dim in ATTEND_HEAD_DIMS and kernel_isa() > 0:
        return dtype
    return attend_dtype(device, dtype)


# the caches the kernel reads
KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
# an int8 cache's fp32 scale, after each vector's values (cpu_attend.cpp's block_kv8)
KV_SCALE_BYTES = 4


def kv_width(head_dim: int, dtype: torch.dtype) -> int:
    """The last dimension of a KV cache of dtype: head_dim values, and an int8 cache's scale in 4
    more bytes."""
    return head_dim + KV_SCALE_BYTES * (dtype == torch.int8)


def kv_store(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Keys or values x [..., D] as a KV cache of dtype holds them. int8: [..., D + 4], round(x / d)
    in -127..127 then the 4 bytes of d = max |x| / 127 (fp32), one scale per vector of D (a
    position's head), as llama.cpp's Q8_0 has one per 32 values; an fp32 scale costs 2 bytes a
    vector more than a bf16 one (3% at D 64) and rounds nothing."""
    if dtype != torch.int8:
        return x.to(dtype)
    xf = x.float()
    d = xf.abs().amax(-1, keepdim=True) / 127  # [..., 1]
    q = torch.where(d > 0, xf / d, 0).round().to(torch.int8)
    return torch.cat([q, d.view(torch.int8)], dim=-1)


def kv_load(c: Tensor, dtype: torch.dtype) -> Tensor:
    # a KV cache's keys or values [..., D (int8: D + 4)] -> [..., D] in dtype; int8: q * d, one fp32
    # product each
    if c.dtype != torch.int8:
        return c.to(dtype)
    return (c[..., :-KV_SCALE_BYTES].float() * c[..., -KV_SCALE_BYTES:].view(torch.float32)).to(dtype)


def int8_kernel(device: torch.device, in_features: int) -> Optional[str]:
    """The kernel of an int8 layer's few-row products: brisk's ("brisk": int8 activations, integer
    dots; BENCHMARKS.md, "Kernels for AVX2 and int8 rows"), else torch's CPU one ("aten") where it
    fits, else None."""
    if device.type != "cpu":
        return None
    if kernel_isa() > 0:
        return "brisk"
    # torch's int8 kernel does not check its shapes and reads out of bounds unless K % 16 == 0
    # (measured)
    return "aten" if hasattr(torch.ops.aten, "_weight_int8pack_mm") and in_features % 16 == 0 else None

