r"""Tensor parallelism: one model split across N processes started by torchrun, each holding 1/N of
every block.

    torchrun --standalone --nproc_per_node 2 generate.py --checkpoint_path checkpoints/ORG/NAME/model.pth
    # several machines: the same command on each (R = 0..NNODES-1, HOST:PORT = an address of node 0 they all reach)
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank R --rdzv_id brisk --rdzv_backend c10d \
        --rdzv_endpoint HOST:29500 generate.py --checkpoint_path ...

Each transformer block is split Megatron-style, so that it needs two all-reduces and nothing else:
  - attention: wqkv column-wise by heads (q, k and v are each split by heads, so every rank keeps
    whole heads and their GQA grouping, and its own part of the KV cache; a single key/value head
    (multi-query) is kept whole by every rank), wo row-wise; the outputs are summed after wo; ALiBi
    slopes follow their heads;
  - feed-forward: w1 and w3 column-wise, w2 row-wise; the outputs are summed after w2.
A row-wise linear's bias is added once, by rank 0. The embedding, the norms and the output head are
replicated. An embedding lookup reads a few rows, so splitting it saves memory but no time.
Splitting the head's vocabulary would cut what each rank reads per decode step (on a GPU node the
head is a large part of a rank's share), at the cost of gathering each step's logits: not done.

The split happens while loading: `load_model(path, device, dtype, transform=apply_tp)` hands
apply_tp the memory-mapped state dict before any copy, so each rank reads and copies only its slices
and never holds the whole model, on the CPU or on its GPU. Quantized checkpoints split the same way
(int8 scales follow the output rows, and wo and w2 are split only between the CPU kernel's blocks
of INT8_BLOCK inputs; int4 is split in its file format, before it is packed for the device, and
only between groups). A draft model for speculative decoding is split the same way when it can be,
else each rank runs a whole copy (speculative.py).

Ranks communicate through torch.distributed (NCCL between GPUs, gloo on the CPU) with a timeout
(--dist_timeout, or BRISK_DIST_TIMEOUT, default 60 s): a rank that dies or stalls makes the others
fail instead of hanging.
"""
import atexit
import math
import os
import sys
import traceback
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch import Tensor

from cli import BriskError
from cpu import INT8_BLOCK
from model import ModelArgs, Transformer

DEFAULT_TIMEOUT_S = 60.0
WRITE_TIMEOUT_S = 3600.0  # rank0_first: how long the other ranks wait for rank 0's file
# which dimension of each tensor of a linear runs over its outputs (N) and over its inputs (K): int8
# `scales` are per output; int4 `weight` holds two inputs per byte ([N, K/2]) and `scales_and_zeros`
# one row per group [K/g, N, 2]
N_DIM = {"weight": 0, "bias": 0, "scales": 0, "scales_and_zeros": 1}
K_DIM = {"weight": 1, "scales_and_zeros": 0}


def maybe_init_dist(timeout_s: Optional[float] = None, quiet: bool = True) -> tuple[int, int]:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK) and return (rank, world_size); (0, 1) when the script was not started by torchrun.

    Also: each rank uses GPU LOCAL_RANK; all ranks share one random seed (sampled tokens must agree
    or the ranks would run different computations); with `quiet`, ranks other than 0 print nothing
    but a traceback."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if timeout_s is None:
        timeout_s = float(os.environ.get("BRISK_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "cpu:gloo,cuda:nccl"  # the model may still run on the CPU with --device cpu
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(dist.destroy_process_group)
    rank = dist.get_rank()
    seed = torch.randint(2**62, (1,))
    dist.broadcast(seed, src=0)
    torch.manual_seed(seed.item())
    if quiet and rank > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)
    return rank, world


def check_divisible(config: ModelArgs, world_size: int, int4_groupsize: Optional[int] = None,
                    int8: bool = False) -> None:
    """Refuse a number of processes that does not divide the heads and the feed-forward width, or
    that would cut a block of the linears split along their inputs (wo, w2): an int4 group, or for
    int8 weights a block of INT8_BLOCK inputs (the CPU kernel rounds activations per block: a cut
    block would round differently than in one process)."""
    sizes = dict(n_head=config.n_head, n_local_heads=config.n_local_heads,
                 intermediate_size=config.intermediate_size)
    if config.n_local_heads == 1:  # a single key/value head is replicated
        del sizes["n_local_heads"]
    bad = [f"{k} {v}" for k, v in sizes.items() if v % world_size]
    if bad:
        g = math.gcd(*sizes.values())
        fits = [str(n) for n in range(1, g + 1) if g % n == 0]
        raise BriskError(f"cannot split the model across {world_size} processes: {', '.join(bad)} not divisible "
                         f"by {world_size} (possible: {', '.join(fits)})")
    blocks = [(f"int4 group size {int4_groupsize}", int4_groupsize)] if int4_groupsize else []
    blocks += [(f"int8 activations' blocks of {INT8_BLOCK}", INT8_BLOCK)] if int8 else []
    for what, block in blocks:
        for name, k in (("attention.wo", config.n_head * config.head_dim),
                        ("feed_forward.w2", config.intermediate_size)):
            if k // world_size % block:
                raise BriskError(f"cannot split {what} across {world_size} processes: "
                                 f"{name} would have {k // world_size} inputs per process")


def rank0_first(fn: Callable[[], None], timeout_s: float = WRITE_TIMEOUT_S) -> None:
    """Run fn on rank 0 alone while the other ranks wait for it (fn writes a file that every rank
    reads next); just run it in a single process. The wait has its own timeout: writing a model's
    worth of weights can take longer than a collective should (a rank 0 that fails closes its
    connections, which ends the wait at once)."""
    if not dist.is_initialized():
        return fn()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    if dist.get_rank() == 0:
        fn()
    dist.barrier(group=group)
    dist.destroy_process_group(group)


def _all_reduce(module: nn.Module, inputs, output: Tensor) -> Tensor:
    # forward hook: sum the partial outputs of the ranks (functional, so torch.compile traces it
    # into the graph)
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def _split(t: Tensor, leaf: str, parts: Optional[list[int]], rank: int, world: int,
           whole: int = 0) -> Tensor:
    """This rank's slice of tensor `leaf` of a linear: of each of `parts` (sizes along N) when split
    column-wise, except the last `whole` parts, kept whole; along K when split row-wise (parts
    None), where a per-output tensor is kept whole and a bias kept by rank 0 only (zeros elsewhere),
    as the ranks' outputs are summed."""
    if parts is None:
        if leaf == "bias":
            return t if rank == 0 else torch.zeros_like(t)
        if leaf not in K_DIM:
            return t
        dim = K_DIM[leaf]
        n = t.shape[dim] // world
        return t.narrow(dim, rank * n, n)
    dim = N_DIM[leaf]
    pieces = [p if i >= len(parts) - whole
              else p.narrow(dim, rank * (p.shape[dim] // world), p.shape[dim] // world)
              for i, p in enumerate(t.split(parts, dim))]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def apply_tp(model: Transformer, state_dict: Optional[dict] = None) -> Optional[dict]:
    """Split `model` for this rank in place (a no-op in a single process).

    With `state_dict` (the checkpoint, for load_model's `transform`), `model` is not loaded yet and
    the state dict of this rank's slices is returned; without, the loaded model's own weights are
    split."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return state_dict
    rank, world = dist.get_rank(), dist.get_world_size()
    c = model.config
    # int4 linears
    groupsizes = {m.groupsize for m in model.modules() if getattr(m, "groupsize", None)}
    int8 = any(getattr(m, "weight", None) is not None
               and m.weight.dtype == torch.int8 for m in model.layers.modules())
    check_divisible(c, world, max(groupsizes, default=None), int8)
    out = None if state_dict is None else dict(state_dict)
    H, Hkv, D = c.n_head, c.n_local_heads, c.head_dim
    Hkv_rank = 1 if Hkv == 1 else Hkv // world
    for i, block in enumerate(model.layers):
        attn, ffn = block.attention, block.feed_forward
        plan = [("attention.wqkv", attn.wqkv, [H * D, Hkv * D, Hkv * D]),
                ("attention.wo", attn.wo, None), ("feed_forward.w1", ffn.w1, [c.intermediate_size]),
                ("feed_forward.w3", ffn.w3, [c.intermediate_size]),
                ("feed_forward.w2", ffn.w2, None)]
        for name, lin, parts in plan:
            if lin is None:  # no w3 outside SwiGLU
                continue
            whole = 2 if name == "attention.wqkv" and Hkv == 1 else 0
            # int4; int8 kernels read any split
            if getattr(lin, "groupsize", None) and lin.kernel is not None:
                raise BriskError("int4 weights packed for a kernel cannot be split: split while loading, with "
                                 "load_model(..., transform=tp.apply_tp)")
            if parts is None:
                lin.in_features //= world
            else:
                lin.out_features = sum(parts[:len(parts) - whole]) // world + sum(parts[len(parts) - whole:])
            for leaf, t in [*lin.named_parameters(recurse=False),
                            *lin.named_buffers(recurse=False)]:
                new = _split(t, leaf, parts, rank, world, whole)
                if out is not None:
                    key = f"layers.{i}.{name}.{leaf}"
                    # a copy if strided
                    out[key] = _split(out[key], leaf, parts, rank, world, whole).contiguous()
                else:
                    new = new.clone()  # do not keep the whole tensor alive through a view
                setattr(lin, leaf, nn.Parameter(new, t.requires_grad)
                        if isinstance(t, nn.Parameter) else new)
        attn.n_head, attn.n_local_heads = H // world, Hkv_rank
        attn.register_forward_hook(_all_reduce)
        ffn.register_forward_hook(_all_reduce)
    model.alibi_heads = (rank * (H // world), H // world, H)
    # the config now describes this rank's share: setup_caches sizes the KV cache by n_local_heads
    c.n_head, c.n_local_heads, c.intermediate_size = H // world, Hkv_rank, c.intermediate_size // world
    return out
