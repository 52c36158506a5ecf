"""Helpers that several test modules share (fixtures are in conftest.py)."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import httpx
import pydantic
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import cpu
import engine
import quant as brisk_quant
from batch import Batch, rows_step
from checkpoint import load_config, load_state_dict, save_checkpoint
from conftest import CHATML, ROOT, TOLERANCE, write_tiny_tokenizer


class Person(pydantic.BaseModel):
    # additionalProperties: false, as OpenAI's strict schemas (test_structured, test_serve)
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str
    age: int
    role: Literal["admin", "user"]


def noisy_copy(checkpoint: Path, directory: Path, noise: float = 0.08) -> Path:
    """The checkpoint (and its tokenizer) with noise of this std on its matrices (whose entries have
    std 0.15): a draft that sometimes agrees with it (0.02: more often than not)."""
    shutil.copytree(checkpoint.parent, directory, dirs_exist_ok=True)
    sd = torch.load(checkpoint, weights_only=True)
    torch.manual_seed(0)
    path = directory / "model.pth"
    noisy = {k: v + noise * torch.randn_like(v) if v.dim() == 2 else v for k, v in sd.items()}
    torch.save(noisy, path)
    return path


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    allowed = expected > 0
    assert counts[~allowed].sum() == 0, "sampled a token outside the allowed set"
    return float(((counts[allowed] - expected[allowed]) ** 2 / expected[allowed]).sum())


def compiled_steps(model, compile_prefill: bool = False) -> dict:
    """The steps engine.Engine compiles for model, whose caches are set up already."""
    e = engine.Engine(model, compile=True, compile_prefill=compile_prefill)
    e.setup(model.max_batch_size, model.max_seq_length)
    return dict(prefill_fn=e.prefill_fn, decode_fn=e.decode_fn)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list, log) -> subprocess.Popen:
    """serve.py with args on a free port, once its /health answers; .url is its address, .log its
    output file."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", str(port),
                                 *map(str, args)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    proc.url, proc.log, deadline = f"http://127.0.0.1:{port}", log, time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{proc.url}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)


# --------------------------------------------------------------------------------------------------
# transformers models, torchrun, GGUF vocabularies, perplexity, batch rows


HF_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=256)


# Llama 3.1 rope scaling, with original_max_position_embeddings shrunk so that it changes angles
# within 24 positions
HF_L31 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
           original_max_position_embeddings=64)


# family: (config class, model class, config overrides, how the weights are saved)
HF_FAMILIES = {
    "llama2-mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4, rms_norm_eps=1e-5),
                   "safetensors"),
    "llama3-gqa": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=500000.0), "safetensors-sharded"),
    "llama3.1-rope-scaling": (LlamaConfig, LlamaForCausalLM,
                              dict(rope_parameters=dict(rope_theta=500000.0, **HF_L31)),
                              "bin-sharded"),
    "llama3.2-tied": (LlamaConfig, LlamaForCausalLM,
                      dict(rope_parameters=dict(rope_theta=500000.0, **{**HF_L31, "factor": 32.0}),
                           tie_word_embeddings=True), "safetensors-bf16"),
    "qwen2-bias-tied": (Qwen2Config, Qwen2ForCausalLM,
                        dict(rope_theta=1000000.0, tie_word_embeddings=True), "bin"),
    "mistral": (MistralConfig, MistralForCausalLM, dict(head_dim=32), "safetensors-sharded"),
    "llama-68m-like": (LlamaConfig, LlamaForCausalLM,
                       dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=12,
                            intermediate_size=384), "bin-old"),
}


def make_hf_model(directory: Path, family: str, seed: int = 0):
    """A tiny random transformers model of `family`, saved to `directory`; returns it in fp32 for
    reference."""
    config_cls, model_cls, overrides, layout = HF_FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**HF_TINY, **overrides})).eval()
    # wider than the default init so logits are far from flat; norms random so a swap shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    if layout == "safetensors":
        model.save_pretrained(directory)
    elif layout == "safetensors-sharded":
        model.save_pretrained(directory, max_shard_size="60KB")
    elif layout == "safetensors-bf16":
        # bf16 weights (not buffers: rope stays fp32); the reference upcasts them
        for p in model.parameters():
            p.data = p.data.bfloat16()
        model.save_pretrained(directory)
        for p in model.parameters():
            p.data = p.data.float()
    else:  # transformers 5 writes only safetensors; write pytorch_model*.bin as older releases did
        model.config.architectures = [model_cls.__name__]
        model.config.save_pretrained(directory)
        save_bin(model.state_dict(), directory, n_shards=3 if layout == "bin-sharded" else 1,
                 old=layout == "bin-old")
    return model


def save_bin(sd: dict, directory: Path, n_shards: int, old: bool) -> None:
    if old:  # checkpoints from transformers < 4.31 also saved a rotary buffer
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    if n_shards == 1:
        torch.save(sd, directory / "pytorch_model.bin")
        return
    # round robin puts the q, k and v of a layer in different shards
    weight_map = {k: f"pytorch_model-{i % n_shards + 1:05d}-of-{n_shards:05d}.bin"
                  for i, k in enumerate(sd)}
    for file in set(weight_map.values()):
        torch.save({k: v for k, v in sd.items() if weight_map[k] == file}, directory / file)
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {},
                                                                        "weight_map": weight_map}))


DRIVER = Path(__file__).resolve().parent / "tp_driver.py"


ATOL = 1e-4


# the CPU int4 kernel rounds its output to bf16, per rank before the sum and once after it in a
# single process
INT4_ATOL = 0.05


def quantized(float_path: Path, quant: dict) -> Path:
    out = brisk_quant.output_path(float_path, quant["mode"], quant.get("groupsize"))
    sd = brisk_quant.quantize_state_dict(load_state_dict(float_path), load_config(float_path),
                                         quant)
    save_checkpoint(sd, out)
    return out


def torchrun(nproc: int, *args, script: Path = DRIVER, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout)
    # decoded here rather than with text=True, which would turn a generated "\r" into "\n"
    return subprocess.CompletedProcess(cmd, r.returncode, r.stdout.decode(), r.stderr.decode())


def run_and_compare(nproc: int, tmp_path: Path, checkpoints: list[Path], *flags) -> dict:
    """Run the driver on nproc ranks; check each checkpoint it decoded against one process. Returns
    the refusals {checkpoint: message}."""
    from tp_driver import decode
    out = tmp_path / "tp.pt"
    r = torchrun(nproc, "--out", out, *flags, *checkpoints)
    assert r.returncode == 0, r.stderr[-3000:]
    results, refused = torch.load(out), {}
    for c in checkpoints:
        got = results[str(c)]
        if "error" in got:
            refused[c] = got["error"]
            continue
        want = decode(c, steps=8)
        atol = INT4_ATOL if "int4" in c.name else ATOL
        assert got["tokens"] == want["tokens"], c.name
        torch.testing.assert_close(got["logits"], want["logits"], atol=atol, rtol=0, msg=c.name)
    return refused


def byte_level_vocab(directory) -> dict:
    write_tiny_tokenizer(directory)
    spec = json.loads((directory / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return dict(model="gpt2", pre="qwen2", tokens=tokens, merges=merges, bos=1, eos=2,
                add_bos=False, types=[3 if t in specials else 1 for t in tokens],
                chat_template=CHATML)


def add_vocab(w, vocab: dict) -> None:
    """The tokenizer metadata of `vocab` (sentencepiece_vocab or byte_level_vocab) on GGUFWriter
    w."""
    w.add_tokenizer_model(vocab["model"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_add_bos_token(vocab["add_bos"])
    if "chat_template" in vocab:
        w.add_chat_template(vocab["chat_template"])


def hf_perplexity(model, ids: list, max_length: int, stride: int) -> float:
    """The sliding-window recipe of the transformers perplexity guide."""
    ids = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, :-(end - prev_end)] = -100  # only the tokens no earlier window scored
        with torch.no_grad():
            loss = model(x, labels=labels).loss
        n = (labels[:, 1:] != -100).sum().item()  # the first position has nothing to predict it
        nll, count, prev_end = nll + loss.item() * n, count + n, end
        if end == ids.size(1):
            break
    return math.exp(nll / count)


# prompt lengths: rows sit at positions up to ~110, over two attended lengths
LENGTHS = (5, 17, 40, 9, 70)


def prompts(vocab_size: int, lengths=LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def alone(model, ids: list[int], tokens: list[int], step) -> list[torch.Tensor]:
    """The logits after ids and after each of tokens, fed one at a time as generate() does with a
    batch of one."""
    model.setup_caches(1, 128)
    T = len(ids)
    logits = [model(torch.tensor([ids]), torch.arange(T), logits_to_keep=1)[0, -1].float()]
    for i, t in enumerate(tokens):
        pos = T + i
        logits.append(step(model, torch.tensor([[t]]), torch.tensor([pos]),
                           attend_len=model.attend_len(pos))[0])
    return logits


def alone_in(batch: Batch, ids: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """As alone, with the prompt by itself in a batch."""
    row = batch.add(ids)
    logits = [batch.last_logits(row)] + [batch.step({row: t})[row] for t in tokens]
    batch.remove(row)
    return logits


def check_rows_equal_alone(model, compile: bool, n_steps: int = 12, alone_in_batch: bool = False):
    """Three rows decode five prompts; rows join as others finish (at different steps), so every row
    meets different neighbours at different positions. Every row's logits must equal its prompt's
    alone: bitwise eagerly, and compiled where every product is brisk's kernel
    (cpu.two_rows_cost_one); else within the dtype's rounding (the alone run is fed the batch's
    tokens, so a flipped near tie does not end the comparison). alone_in_batch: alone is the prompt
    by itself in the same batch rather than in a one-row cache."""
    batch = Batch(model, 3, 128, compile=compile)
    assert batch.min_rows == 2 or not alone_in_batch
    ps = prompts(model.config.vocab_size)
    got = {i: [] for i in range(len(ps))}  # prompt -> logits after its prompt and each token fed
    waiting, running = list(range(len(ps))), {}
    while waiting or running:
        if waiting and batch.free_rows():
            i = waiting.pop(0)
            row = batch.add(ps[i])
            running[row] = i
            got[i].append(batch.last_logits(row))
        feed = {r: int(got[i][-1].argmax()) for r, i in running.items()}
        for row, logits in batch.step(feed).items():
            got[running[row]].append(logits)
            # rows of different lengths
            if len(got[running[row]]) == n_steps - 2 * (running[row] % 2):
                batch.remove(row)
                del running[row]
    step = engine.compile_step(rows_step, torch.device("cpu")) if compile else rows_step
    for i, p in enumerate(ps):
        tokens = [int(l.argmax()) for l in got[i][:-1]]
        want = alone_in(batch, p, tokens) if alone_in_batch else alone(model, p, tokens, step)
        assert len(want) == len(got[i])
        for j, (a, b) in enumerate(zip(want, got[i])):
            tol = TOLERANCE[model.norm.weight.dtype] if compile and not cpu.two_rows_cost_one(model) else 0
            assert torch.allclose(a, b, atol=tol, rtol=tol), f"prompt {i}, step {j}: max diff {(a - b).abs().max()}"


def scribble(model) -> None:
    """Fill the KV cache with noise, so that only restored positions can be right."""
    for layer in model.layers:
        for c in (layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache):
            c.copy_(cpu.kv_store(torch.randn(*c.shape[:-1], model.config.head_dim, device=c.device),
                                 c.dtype))
