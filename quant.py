"""Weight-only quantization: int8 per output channel, int4 group-wise (round-to-nearest or GPTQ).

quantize.py is the command line that writes quantized checkpoints; checkpoint.load_model reads them
through swap_in_quantized and pack_for_device. What is quantized:
  - every linear of the transformer blocks: int8 (symmetric, one scale per output channel) or int4
    (asymmetric, a scale and a zero point per group of `groupsize` inputs);
  - the output head int8 by default (`--head int4` rounds it like the blocks). It is the largest
    matrix of small models; an int4 head decodes faster on some CPUs but raises perplexity
    (BENCHMARKS.md, "Quality: perplexity" and "AMD EPYC Zen 3"), so it is a choice, not the default.
    A tied embedding shares the head's quantized matrix and dequantizes the rows it looks up; an
    untied embedding stays float (a lookup reads one row, so it costs no time).
The file is device-neutral: int4 values are stored two per byte ([N, K/2] uint8, even column in the
high nibble) with `scales_and_zeros` [K/g, N, 2] (bf16). `pack_for_device` repacks them for the
device's int4 kernel when there is one (CPU: brisk's cpu_int4.cpp, which quantizes the activations
to int8 per block of 32, else aten's, on bf16 activations; CUDA) and otherwise dequantizes at run
time. A layer whose in_features the group size does not divide (SmolLM2's 576 with g128/g256) is
zero-padded to the next multiple; its input is padded to match at run time, so every group size
works with every model. brisk's int8 and int4 kernels serve every row count (a prompt as a decode
step: each row reduced alone, in one order), faster than dequantizing for a GEMM (BENCHMARKS.md,
"Split-invariant prefill").
"""
import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydoc_data.topics import topics
from torch import Tensor
from tqdm import tqdm

from cli import BriskError
from cpu import (INT4_ROWS, INT8_KERNEL_MAX_ROWS, gemm_dtype, int8_kernel, int8_rows_product,
                 kernel_isa, one_row_on_cpu, one_row_product, per_row)
from model import Transformer
from tokenizer import load_tokenizer

MODES = ("int8", "int4", "int4-gptq")
HEADS = ("int8", "int4")  # precisions of the output head
GROUPSIZES = (32, 64, 128, 256)
DEFAULT_GROUPSIZE = 32
INT4_PARAM_DTYPE = torch.bfloat16  # the int4 kernels read bf16 scales and zero points


def pydoc_text(part: int) -> str:
    """English text shipped with CPython: pydoc's topic help (`pydoc_data.topics.topics`), sorted by
    topic and joined with blank lines. Part 0 is the first half of the characters (GPTQ
    calibration), part 1 the rest (held out for perplexity). Its exact content depends on the Python
    version."""
    text = "\n\n".join(topics[k] for k in sorted(topics))
    half = len(text) // 2
    return text[:half] if part == 0 else text[half:]


# --------------------------------------------------------------------------------------------------
# The math: quantize and dequantize one weight matrix [N, K] (N outputs, K inputs).


def int8_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: w ~= q * scales[:, None], |w - q * s| <= s / 2. Returns q int8 [N,
    K], scales fp32 [N]."""
    w = w.float()
    scales = w.abs().amax(1).clamp(min=1e-10) / 127
    q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_params(w: Tensor, groupsize: int, dtype: torch.dtype = INT4_PARAM_DTYPE) -> tuple[Tensor, Tensor]:
    """Scale and zero point [N, K/g] of each group of `groupsize` columns, in the convention of
    torch's int4 kernels (gpt-fast/torchao): w ~= (q - 8) * scale + zero, q in 0..15, so zero = min
    + 8 * scale. Rounded to `dtype` (the kernels' bf16) before the values are chosen, so the values
    fit the parameters actually used."""
    g = w.float().reshape(w.shape[0], -1, groupsize)  # [N, K/g, g]
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(dtype).float()
    zeros = (lo + 8 * scales).to(dtype).float()
    return scales, zeros


def int4_round(w: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """Nearest int4 value 0..15 (as float) of w under scales/zeros of the same (broadcast) shape."""
    return ((w - zeros) / scales).round().add(8).clamp(0, 15)


def int4_quantize(w: Tensor, groupsize: int, dtype: torch.dtype = INT4_PARAM_DTYPE) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest group-wise int4. Returns q uint8 [N, K] (0..15), scales and zeros fp32 [N,
    K/g]."""
    scales, zeros = int4_params(w, groupsize, dtype)
    g = w.float().reshape(w.shape[0], -1, groupsize)  # [N, K/g, g]
    q = int4_round(g, scales[..., None], zeros[..., None])
    return q.to(torch.uint8).reshape(w.shape), scales, zeros


def int4_dequantize(q: Tensor, scales: Tensor, zeros: Tensor,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """q [N, K] (0..15), scales/zeros [N, K/g] -> w [N, K] = (q - 8) * scale + zero in dtype (one
    rounding)."""
    N, K = q.shape
    g = q.reshape(N, scales.shape[1], -1).to(dtype) - 8  # [N, K/g, g]
    return torch.addcmul(zeros[..., None].to(dtype), g, scales[..., None].to(dtype)).reshape(N, K)


def pack_nibbles(q: Tensor) -> Tensor:
    # [N, K] values 0..15 -> [N, K/2] uint8, even column in the high nibble (the layout CUDA's int4
    # packer reads)
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibbles(p: Tensor) -> Tensor:
    # [N, K/2] uint8 -> [N, K] uint8 values 0..15
    return torch.stack([p >> 4, p & 15], dim=-1).reshape(p.shape[0], -1)


def to_scales_and_zeros(scales: Tensor, zeros: Tensor) -> Tensor:
    # [N, K/g] each -> [K/g, N, 2], the layout of the int4 kernels
    return torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()


def from_scales_and_zeros(sz: Tensor) -> tuple[Tensor, Tensor]:
    # [K/g, N, 2] -> scales, zeros [N, K/g]
    return sz[..., 0].t(), sz[..., 1].t()


def padded(k: int, groupsize: int) -> int:
    return math.ceil(k / groupsize) * groupsize


# --------------------------------------------------------------------------------------------------
# Modules that replace nn.Linear / nn.Embedding (built on the meta device, filled by load_state_dict).


class WeightOnlyInt8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # [N, K]
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        # [N], in the model's dtype once loaded
        self.register_buffer("scales", torch.empty(out_features))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features)) if bias else None)
        # set by pack_for_device: "brisk" (cpu_kernels.cpp), "aten" or None
        self.kernel: Optional[str] = None

    def forward(self, x: Tensor) -> Tensor:
        # activations as int8 (cpu_kernels.cpp), any number of rows, each alone
        if self.kernel == "brisk":
            y = int8_rows_product(x, self.weight, self.scales).to(x.dtype)
        # one row or a few, compiled: as cpu.Linear, Inductor's loop where it beats aten's kernel,
        # and always rather than converting the whole weight for a GEMM; otherwise a few rows one at
        # a time (cpu.per_row)
        elif one_row_on_cpu(x, self.weight if self.aten_kernel(x) else None):
            y = (one_row_product(x, self.weight) * self.scales.float()).to(x.dtype)
        else:
            return per_row(x, self.gemm)
        return y if self.bias is None else y + self.bias

    def aten_kernel(self, x: Tensor) -> bool:
        # torch's CPU int8 kernel reads the weight once per row: with more rows one GEMM on the
        # converted weight wins
        return (self.kernel == "aten" and x.dtype == torch.bfloat16
                and self.scales.dtype == torch.bfloat16
                and x.numel() <= INT8_KERNEL_MAX_ROWS * self.in_features)

    def gemm(self, x: Tensor) -> Tensor:
        if self.aten_kernel(x):
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight,
                                                   self.scales)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            dt = gemm_dtype(x)
            y = (F.linear(x.to(dt), self.weight.to(dt)) * self.scales).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """Embedding that shares a tied int8 head's matrix and scales, dequantizing only the rows looked
    up."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        # [V, D]
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(num_embeddings))  # [V]

    def forward(self, idx: Tensor) -> Tensor:
        return self.weight[idx].to(self.scales.dtype) * self.scales[idx, None]  # [B, T, D]


class Int4Embedding(nn.Module):
    """Embedding that reads a tied int4 head's values in the file's layout (two per byte) and its
    group parameters, dequantizing only the rows looked up. The head itself is repacked for its
    kernel."""

    def __init__(self, num_embeddings: int, embedding_dim: int, groupsize: int):
        super().__init__()
        self.embedding_dim = embedding_dim
        k = padded(embedding_dim, groupsize)
        # [V, K/2]
        self.register_buffer("weight", torch.empty(num_embeddings, k // 2, dtype=torch.uint8))
        # [K/g, V, 2]
        self.register_buffer("scales_and_zeros", torch.empty(k // groupsize, num_embeddings, 2))

    def forward(self, idx: Tensor) -> Tensor:
        rows = idx.reshape(-1)  # [B*T]
        sz = self.scales_and_zeros[:, rows]  # [K/g, B*T, 2]
        w = int4_dequantize(unpack_nibbles(self.weight[rows]), *from_scales_and_zeros(sz),
                            dtype=sz.dtype)
        return w[:, :self.embedding_dim].reshape(*idx.shape, self.embedding_dim)  # [B, T, D]


class WeightOnlyInt4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, groupsize: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        k = padded(in_features, groupsize)
        # [N, K/2], two per byte
        self.register_buffer("weight", torch.empty(out_features, k // 2, dtype=torch.uint8))
        # [K/g, N, 2]
        self.register_buffer("scales_and_zeros", torch.empty(k // groupsize, out_features, 2))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features)) if bias else None)
        # set by pack(): "brisk", "cpu", "cuda", or None for the dequantize path
        self.kernel: Optional[str] = None

    def pack(self, kernel: Optional[str]) -> None:
        """Repack the file's two-per-byte values for `kernel` ("brisk": cpu_int4.cpp's layout, which
        holds the scales and zeros too; "cpu": aten's; "cuda"), or unpack them (None)."""
        q = unpack_nibbles(self.weight)  # [N, K]
        if kernel == "brisk":
            # [N/16, K/g, bytes]
            self.weight = torch.ops.brisk.int4_pack(q, self.scales_and_zeros, self.groupsize)
            self.scales_and_zeros = None
        elif kernel == "cpu":
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        elif kernel == "cuda":
            tiles = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)
            self.weight = torch.ops.aten._convert_weight_to_int4pack(self.weight, tiles)
        else:
            self.weight = q
        if kernel in ("cpu", "cuda"):
            self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        # brisk's kernel reduces each row alone whatever rows are beside it; other kernels take a
        # few rows one at a time, each as if alone (cpu.per_row)
        return self.gemm(x) if self.kernel == "brisk" else per_row(x, self.gemm)

    def gemm(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], padded(self.in_features, self.groupsize)
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if k != self.in_features:
            x2 = F.pad(x2, (0, k - self.in_features))
        dt = gemm_dtype(x2)
        # every row count: each row alone, faster than dequantizing for a GEMM
        if self.kernel == "brisk":
            y = torch.ops.brisk.int4_product(x2, self.weight, self.groupsize, kernel_isa())
        # these kernels take bf16 activations: others round-trip through bf16
        elif self.kernel in ("cpu", "cuda"):
            aten = torch.ops.aten
            mm = aten._weight_int4pack_mm_for_cpu if self.kernel == "cpu" else aten._weight_int4pack_mm
            y = mm(x2.to(torch.bfloat16), self.weight, self.groupsize, self.scales_and_zeros)
        else:  # `weight` holds the values [N, K]
            w = int4_dequantize(self.weight, *from_scales_and_zeros(self.scales_and_zeros),
                                dtype=dt)
            y = F.linear(x2.to(dt), w)
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


def _check_quant(quant: dict) -> tuple[str, Optional[int], str]:
    # files written before the head could be int4 have no "head": theirs is int8
    mode, groupsize, head = quant.get("mode"), quant.get("groupsize"), quant.get("head", "int8")
    if (mode == "int8" and head == "int8") or (mode == "int4" and groupsize in GROUPSIZES
                                               and head in HEADS):
        return mode, groupsize, head
    raise BriskError(f"unsupported quantization {quant}: this version reads int8 and int4 with group size in "
                     f"{GROUPSIZES}, with an int8 head or (int4 only) an int4 one")


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def swap_in_quantized(model: Transformer, quant: dict) -> None:
    """Swap the linears (and a tied embedding) for quantized modules, so load_state_dict accepts the
    file."""
    mode, groupsize, head = _check_quant(quant)
    for name, lin in linear_layers(model):
        bias = lin.bias is not None
        if (head if name == "output" else mode) == "int8":
            new = WeightOnlyInt8Linear(lin.in_features, lin.out_features, bias)
        else:
            new = WeightOnlyInt4Linear(lin.in_features, lin.out_features, groupsize, bias)
        model.set_submodule(name, new)
    if model.config.tie_embeddings:
        c = model.config
        model.tok_embeddings = (Int8Embedding(c.vocab_size, c.dim) if head == "int8"
                                else Int4Embedding(c.vocab_size, c.dim, groupsize))


def int4_kernel(device: torch.device, out_features: int, k: int) -> Optional[str]:
    aten = torch.ops.aten
    if device.type == "cpu" and out_features % INT4_ROWS == 0 and kernel_isa() > 0:
        return "brisk"
    if device.type == "cpu" and hasattr(aten, "_weight_int4pack_mm_for_cpu") and out_features % 16 == 0:
        return "cpu"
    # CUDA's kernel (tinygemm) runs on Ampere (sm80) and later only; its op exists in every build
    if (device.type == "cuda" and hasattr(aten, "_weight_int4pack_mm") and out_features % 8 == 0
        and k % 32 == 0
            and torch.cuda.get_device_capability(device) >= (8, 0)):
        return "cuda"
    return None


def pack_for_device(model: Transformer, device) -> None:
    """After loading: let a tied embedding share the head's tensors in the file's layout (the loader
    cast the scales as two tensors), then pack int4 weights for the device's kernel (or unpack them
    for the dequantize path) and pick the int8 kernel once per layer."""
    device = torch.device(device)
    if model.config.tie_embeddings:
        for name, _ in list(model.tok_embeddings.named_buffers()):
            setattr(model.tok_embeddings, name, getattr(model.output, name))
    for _, m in model.named_modules():
        if isinstance(m, WeightOnlyInt8Linear):
            m.kernel = int8_kernel(device, m.in_features)
        elif isinstance(m, WeightOnlyInt4Linear):
            m.pack(int4_kernel(device, m.out_features, m.weight.shape[1] * 2))


# --------------------------------------------------------------------------------------------------
# Quantizing a checkpoint


# (name, padded w [N, K]) -> q, scales, zeros
Int4Fn = Callable[[str, Tensor], tuple[Tensor, Tensor, Tensor]]


def quantize_state_dict(sd: dict, config, quant: dict, int4_fn: Optional[Int4Fn] = None,
                        device="cpu") -> dict:
    """The quantized state dict of float `sd` (our names), with `__quant__` = quant, in CPU memory.
    int4_fn quantizes the block linears in int4 mode (default: round-to-nearest; an int4 head is
    always rounded to nearest); each matrix is rounded on `device` (a GPU quantizes a 7B model in
    seconds)."""
    mode, groupsize, head = _check_quant(quant)
    rtn = lambda name, w: int4_quantize(w, groupsize)  # noqa: E731
    int4_fn = int4_fn or rtn
    with torch.device("meta"):
        linears = linear_layers(Transformer(config))
    out = dict(sd)
    for name, lin in tqdm(linears, desc=f"quantizing ({quant['mode']})", unit="layer"):
        key = "tok_embeddings.weight" if name == "output" and config.tie_embeddings else f"{name}.weight"
        w = sd[key].to(device)
        out.pop(f"{name}.weight", None)
        if (head if name == "output" else mode) == "int8":
            q, scales = int8_quantize(w)
            out[f"{name}.weight"], out[f"{name}.scales"] = q.cpu(), scales.cpu()
        else:
            w = F.pad(w.float(), (0, padded(w.shape[1], groupsize) - w.shape[1]))
            q, scales, zeros = (rtn if name == "output" else int4_fn)(name, w)
            out[f"{name}.weight"] = pack_nibbles(q.to(device)).cpu()
            sz = to_scales_and_zeros(scales.to(device), zeros.to(device))
            out[f"{name}.scales_and_zeros"] = sz.to(INT4_PARAM_DTYPE).cpu()
    if config.tie_embeddings:  # the same tensors under both names: torch.save stores them once
        for leaf in ("weight", "scales", "scales_and_zeros"):
            if f"output.{leaf}" in out:
                out[f"tok_embeddings.{leaf}"] = out[f"output.{leaf}"]
    out["__quant__"] = quant
    return out


def gptq_quantize(w: Tensor, H: Tensor, groupsize: int, blocksize: int = 128,
                  percdamp: float = 0.01, name: str = "layer") -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ (Frantar et al. 2022) in the int4 group format: quantize w [N, K] column by column,
    spreading each column's error over the columns not yet quantized, weighted by the inverse
    Hessian of H = X^T X [K, K]. Returns q uint8 [N, K], scales and zeros [N, K/g], as
    int4_quantize."""
    W, H = w.float().clone(), H.float().clone()
    N, K = W.shape
    dead = H.diagonal() == 0  # inputs that never fire (or padding): their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise BriskError(f"GPTQ: the Hessian of {name} is not positive definite; raise --percdamp") from None
    Q = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(N, K // groupsize, device=W.device)
    zeros = torch.zeros_like(scales)
    # whole groups per block: params see updated weights
    blocksize = max(blocksize // groupsize, 1) * groupsize
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if i % groupsize == 0:
                s, z = int4_params(W1[:, i:i + groupsize], groupsize)  # [N, 1]
                scales[:, (i1 + i) // groupsize], zeros[:, (i1 + i) // groupsize] = s[:, 0], z[:, 0]
            col = W1[:, i]
            q = int4_round(col, s[:, 0], z[:, 0])
            Q[:, i1 + i] = q.to(torch.uint8)
            err = (col - ((q - 8) * s[:, 0] + z[:, 0])) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, scales, zeros


@torch.no_grad()
def gptq_model(model: Transformer, samples: Tensor, groupsize: int, blocksize: int = 128,
               percdamp: float = 0.01) -> dict:
    """GPTQ of every block linear of a float model, one block at a time: run the calibration
    activations through the block collecting H = X^T X per linear, quantize, then propagate them
    through the block with its quantized weights (written back into the model dequantized). samples:
    token ids [S, T]. Returns {name: (q, s, z)}."""
    S, T = samples.shape
    model.setup_caches(1, T)
    pos = torch.arange(T, device=samples.device)
    # the first block's inputs as the model's forward makes them, whatever its positions (rotary,
    # learned, ALiBi)
    inputs = []
    hook = model.layers[0].register_forward_pre_hook(lambda _, args: inputs.append(args))
    for i in range(S):
        model(samples[i:i + 1], pos, logits_to_keep=1)
    hook.remove()
    xs = [args[0] for args in inputs]  # S x [1, T, D]
    rest = inputs[0][1:]  # the positions, rotary tables, mask, ... as the model passes them
    results = {}
    for li, block in enumerate(tqdm(model.layers, desc="GPTQ", unit="layer")):
        linears = dict(linear_layers(block))
        H = {n: torch.zeros(m.in_features, m.in_features, device=samples.device)
             for n, m in linears.items()}

        def collect(name):
            def hook(_, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()  # [T, K]
                H[name].addmm_(x.t(), x)
            return hook

        hooks = [m.register_forward_pre_hook(collect(n)) for n, m in linears.items()]
        for x in xs:
            block(x, *rest)
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            k = padded(m.in_features, groupsize)
            w = F.pad(m.weight.float(), (0, k - m.in_features))
            q, s, z = gptq_quantize(w, F.pad(H[n], (0, k - m.in_features, 0, k - m.in_features)),
                                    groupsize, blocksize, percdamp, name=f"layers.{li}.{n}")
            results[f"layers.{li}.{n}"] = (q, s, z)
            m.weight.copy_(int4_dequantize(q, s, z)[:, :m.in_features])
        xs = [block(x, *rest) for x in xs]
    return results


def calibration_samples(checkpoint_dir: Path, text: str, n: int, seq_length: int) -> Tensor:
    """n consecutive windows of seq_length tokens from the start of text: [n, seq_length]."""
    ids = load_tokenizer(checkpoint_dir).encode(text)
    if len(ids) < n * seq_length:
        raise BriskError(f"calibration text has {len(ids)} tokens; {n} samples of {seq_length} need "
                         f"{n * seq_length} (lower --calibration_samples or --calibration_seq_length)")
    return torch.tensor(ids[:n * seq_length]).reshape(n, seq_length)


def output_path(checkpoint_path: Path, mode: str, groupsize: Optional[int],
                head: str = "int8") -> Path:
    suffix = ("" if mode == "int8" else f".g{groupsize}")
    suffix += "" if head == "int8" else f".{head}-head"
    return Path(checkpoint_path).with_name(f"model_{mode}{suffix}.pth")
