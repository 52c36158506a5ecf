"""Check and measure brisk on a CUDA card in about ten minutes, with no network: the driver of
scripts/gpu_check.sh.

    scripts/gpu_check.sh --out gpu_check                                # Llama-2-7B-shaped weights on cuda
    scripts/gpu_check.sh --device cpu --preset llama-68m --out /tmp/dry  # a dry run of the same steps on the CPU

Stages, each time-boxed (a stage that fails or runs out of time is reported and the others still
run):
  1. tests: the suite's device-aware tests on the device (BRISK_TEST_DEVICE), in float32 and in
     bfloat16: two pytest processes that run beside stage 2;
  2. weights: random weights in the preset's shape drawn on the device
     (scripts/random_checkpoint.py), quantized there to int8, int4 g32 and int4 g128 (quantize.py
     --device), and written once more as a transformers checkpoint; files already in --weights are
     reused, so a second run skips this stage;
  3. bench: bench.py on bf16, int8, int4 g32 and int4 g128 one after the other (with --compile:
     compiled, CUDA graphs on CUDA); the bf16 run also times transformers' static cache +
     torch.compile recipe on the same weights (--peers transformers-compile) in alternating rounds;
  4. report: DIR/gpu_check.json (every figure; each stage's command and log under DIR/logs) and
     DIR/gpu_check.md (decode tok/s, GB/s and its share of bench.py's copy bandwidth, time to first
     token, compile time, peak memory, brisk / peer ratios, and the targets for a 7B model on an
     H100/H200).
The exit status is 0 when every stage passed. With --device cpu the defaults shrink to a dry run:
two tests, 8 new tokens, one timed iteration, no compilation (the eager transformers peer).
"""
import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from checkpoint import load_config, load_state_dict  # noqa: E402
from cli import BriskError, check_writable, parse_device, run_cli, save_atomic, save_json  # noqa: E402
from model import ModelArgs  # noqa: E402

TEST_FILES = ["tests/test_convert.py", "tests/test_model.py", "tests/test_generate.py",
              "tests/test_quantize.py", "tests/test_speculative.py", "tests/test_prefill.py"]
DRY_RUN_TESTS = "test_converted_model_matches_transformers and llama2 or test_the_devices_int4_kernel and 32"
# (label, file, quantize.py arguments)
PRECISIONS = [("bf16", "model.pth", None), ("int8", "model_int8.pth", ["--mode", "int8"]),
              ("int4 g32", "model_int4.g32.pth", ["--mode", "int4", "--groupsize", "32"]),
              ("int4 g128", "model_int4.g128.pth", ["--mode", "int4", "--groupsize", "128"])]
NOTES = re.compile(r"(Recompiling function|skipping cudagraphs|graph break).*",
                   re.IGNORECASE)  # in a bench log
# seconds each stage may take at most (guesses for a 7B model on an H100, where nothing has run yet:
# the tests beside the weights, then each bench run mostly compiling); stages that no longer fit in
# --budget_s are skipped
CAPS = dict(tests=240, random=150, quantize=120, hf=150, bench=200, peer=300)


# --------------------------------------------------------------------------------------------------
# Stages: subprocesses with a time limit, their output in DIR/logs/NAME.log


class Stages:
    def __init__(self, out: Path, budget_s: float):
        self.logs, self.deadline, self.done, self.running = out / "logs", time.monotonic() + budget_s, [], []
        self.logs.mkdir(parents=True, exist_ok=True)

    def left(self, cap: float) -> float:
        return min(cap, self.deadline - time.monotonic())

    def start(self, name: str, cmd: list, cap: float, env: dict = None) -> dict:
        """Start cmd in its own process group; finish() waits for it."""
        stage = dict(name=name, cmd=" ".join(map(str, cmd)), log=str(self.logs / f"{name}.log"),
                     status="skipped", seconds=0.0, limit_s=round(self.left(cap)))
        if stage["limit_s"] < 5:
            stage["status"] = "skipped: out of time"
            return stage
        with open(stage["log"], "w") as log:
            stage["proc"] = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=log,
                                             stderr=subprocess.STDOUT,
                                             env={**os.environ, **(env or {})},
                                             start_new_session=True)
        stage["t0"] = time.monotonic()
        self.running.append(stage["proc"])
        print(f"[{name}] {stage['cmd']}", file=sys.stderr)
        return stage

    def finish(self, stage: dict) -> dict:
        proc = stage.pop("proc", None)
        if proc is not None:
            t0 = stage.pop("t0")
            try:
                rc = proc.wait(timeout=max(0.0, t0 + stage["limit_s"] - time.monotonic()))
                stage["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                self.kill(proc)
                stage["status"] = f"timed out after {stage['limit_s']} s"
            self.running.remove(proc)
            stage["seconds"] = round(time.monotonic() - t0, 1)
            if stage["status"] != "ok":
                stage["log_tail"] = Path(stage["log"]).read_text(errors="replace")[-2000:]
                last = [line for line in stage["log_tail"].splitlines() if line.strip()][-1:]
                stage["notes"] = [f"last line: {line.strip()[:300]}" for line in last]
        print(f"[{stage['name']}] {stage['status']} ({stage['seconds']} s)", file=sys.stderr)
        self.done.append(stage)
        return stage

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)  # with the compile workers it started
        proc.wait()

    def stop(self) -> None:
        """End the stages still running (after Ctrl-C or an error: they run in sessions of their
        own)."""
        for proc in self.running:
            self.kill(proc)

    def run(self, name: str, cmd: list, cap: float, env: dict = None) -> dict:
        return self.finish(self.start(name, cmd, cap, env))

    def record(self, name: str, fn, cap: float) -> dict:
        """An in-process step, recorded like a stage (not interruptible: for quick steps only)."""
        stage, t0 = dict(name=name, cmd=f"(in process) {fn.__name__}", status="ok",
                         seconds=0.0), time.monotonic()
        if self.left(cap) < 5:
            stage["status"] = "skipped: out of time"
        else:
            print(f"[{name}] {fn.__name__}", file=sys.stderr)
            try:
                fn()
            except Exception as e:  # reported, and the next stages still run
                stage["status"], stage["log_tail"] = "failed", f"{type(e).__name__}: {e}"
        stage["seconds"] = round(time.monotonic() - t0, 1)
        print(f"[{name}] {stage['status']} ({stage['seconds']} s)", file=sys.stderr)
        self.done.append(stage)
        return stage


# --------------------------------------------------------------------------------------------------
# The same weights as a transformers checkpoint, for the peer


def hf_config(c) -> dict:
    """config.json of the transformers model that brisk's ModelArgs describes (Llama, or Qwen2 for
    q/k/v bias)."""
    arch, model_type = ("Qwen2ForCausalLM", "qwen2") if c.qkv_bias else ("LlamaForCausalLM", "llama")
    rope_scaling = None if c.rope_scaling is None else dict(rope_type="llama3", **c.rope_scaling)
    return dict(architectures=[arch], model_type=model_type, hidden_size=c.dim,
                intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_local_heads,
                head_dim=c.head_dim, vocab_size=c.vocab_size, max_position_embeddings=c.block_size,
                rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, rope_scaling=rope_scaling,
                hidden_act="silu", tie_word_embeddings=c.tie_embeddings, attention_bias=False,
                torch_dtype="bfloat16")


# brisk's names -> transformers' Llama/Qwen2 names (the converter reads these and many more)
HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight",
                "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
HF_LAYER_NAMES = {"attention_norm.weight": "input_layernorm.weight",
                  "ffn_norm.weight": "post_attention_layernorm.weight",
                  "attention.wo.weight": "self_attn.o_proj.weight",
                  "feed_forward.w1.weight": "mlp.gate_proj.weight",
                  "feed_forward.w3.weight": "mlp.up_proj.weight",
                  "feed_forward.w2.weight": "mlp.down_proj.weight"}


def write_hf_checkpoint(checkpoint: Path, out: Path) -> None:
    """out/config.json and out/model.safetensors holding the float checkpoint's weights under
    transformers' names (wqkv split into q, k and v; brisk keeps q/k in transformers' rotary layout,
    so nothing is permuted)."""
    c, sd = load_config(checkpoint), load_state_dict(checkpoint)
    hf = {}
    for name, t in sd.items():
        if name in HF_TOP_NAMES:
            hf[HF_TOP_NAMES[name]] = t.contiguous()
            continue
        i, rest = name.split(".", 2)[1:]
        if rest.startswith("attention.wqkv."):
            leaf = rest.rsplit(".", 1)[1]  # weight or bias
            sizes = [c.n_head * c.head_dim, c.n_local_heads * c.head_dim,
                     c.n_local_heads * c.head_dim]
            for part, piece in zip("qkv", t.split(sizes)):
                hf[f"model.layers.{i}.self_attn.{part}_proj.{leaf}"] = piece.contiguous()
        else:
            hf[f"model.layers.{i}.{HF_LAYER_NAMES[rest]}"] = t.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "config.json", hf_config(c), force=True)
    save_atomic(out / "model.safetensors",
                lambda tmp: save_file(hf, str(tmp), metadata={"format": "pt"}), force=True)


# --------------------------------------------------------------------------------------------------
# Reading the results


def compiler_notes(log: Path, most: int = 8) -> list[str]:
    """Distinct log lines about recompilations, skipped CUDA graphs and graph breaks (TORCH_LOGS),
    at most `most`."""
    if not log.is_file():
        return []
    lines = log.read_text(errors="replace").splitlines()
    hits = [m.group(0)[:300] for m in map(NOTES.search, lines) if m]
    return list(dict.fromkeys(hits))[:most]


def test_counts(junit: Path) -> dict:
    if not junit.is_file():
        return dict(passed=0, failed=0, skipped=0, failures=["no report: see the log"])
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failures = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None]
    return dict(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                failed=n["failures"] + n["errors"], skipped=n["skipped"],
                seconds=float(suite.get("time", 0)), failures=failures)


def bench_rows(path: Path) -> tuple[list[dict], dict]:
    """The figures of each engine in a bench.py --json file, and its environment."""
    if not path.is_file():
        return [], {}
    report = json.loads(path.read_text())
    rows = []
    for r in report["results"]:
        med = {k: v["median"] for k, v in r.get("summary", {}).items()}
        rows.append(dict(engine=r["engine"], checkpoint=r["checkpoint"],
                         weight_gb=r["weight_bytes"] / 1e9,
                         decode_tokens_per_s=med.get("decode_tokens_per_s"),
                         bandwidth_gb_s=med.get("bandwidth_gb_s"),
                         bandwidth_pct=med.get("bandwidth_pct"),
                         ttft_ms=_scale(med.get("ttft_s"), 1e3), compile_s=r.get("compile_s"),
                         peak_memory_gb=med.get("peak_memory_gb"),
                         noisy=r.get("noisy"), skipped=r.get("skipped")))
    return rows, report["environment"]


def _scale(v, k):
    return None if v is None else v * k


def _ratio(a, b):
    return None if a is None or not b else a / b


def summarize(results: list[dict], peer: dict, peer_name: str) -> tuple[list[dict], list[dict]]:
    """brisk / bf16 and brisk / peer decode ratios per precision, and the issue's targets."""
    bf16 = next((r for r in results if r["precision"] == "bf16"), {}).get("decode_tokens_per_s")
    p = (peer or {}).get("decode_tokens_per_s")
    for r in results:
        r["vs_bf16"] = _ratio(r["decode_tokens_per_s"], bf16)
        r["vs_peer"] = _ratio(r["decode_tokens_per_s"], p)
    by = {r["precision"]: r for r in results}

    def get(precision, key):
        return by.get(precision, {}).get(key)

    targets = [("bf16 decode >= 80% of the copy bandwidth", get("bf16", "bandwidth_pct"), 80, "%"),
               ("int8 decode >= 1.6x bf16", get("int8", "vs_bf16"), 1.6, "x"),
               ("int4 g32 decode >= 2.4x bf16", get("int4 g32", "vs_bf16"), 2.4, "x"),
               (f"bf16 decode >= 1.5x {peer_name}", get("bf16", "vs_peer"), 1.5, "x"),
               ("bf16 compile <= 90 s", get("bf16", "compile_s"), 90, "s")]
    rows = [dict(target=t, measured=v, unit=u,
                 met=None if v is None else (v <= bound if u == "s" else v >= bound))
            for t, v, bound, u in targets]
    return results, rows


def fmt(v, spec=".1f", unit=""):
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def markdown(report: dict) -> str:
    env, a = report["environment"], report["settings"]
    lines = [f"# brisk GPU check: {env['device_name']}, {env['date']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, Python {env['python']}; "
             f"{a['preset']} random weights, {a['input_tokens']}-token prompt, {a['max_new_tokens']} new tokens, "
             f"greedy, batch 1, {'compiled' if a['compile'] else 'eager'}, median of {a['num_iter']} runs. "
             f"Copy bandwidth (bench.py): {fmt(env.get('device_copy_gb_s'), '.0f', ' GB/s')}.", "",
             "| precision | weights GB | decode tok/s | vs bf16 | GB/s | % of copy | TTFT ms | compile s | peak GB "
             f"| brisk / {report['peer_name']} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"] + ([dict(report["peer"], precision=f"{report['peer_name']} (bf16)")]
                                  if report["peer"] else []):
        lines.append(f"| {r['precision']} | {fmt(r['weight_gb'], '.2f')} | {fmt(r['decode_tokens_per_s'])} | "
                     f"{fmt(r.get('vs_bf16'), '.2f', 'x')} | {fmt(r['bandwidth_gb_s'])} | "
                     f"{fmt(r['bandwidth_pct'], '.0f', '%')} | {fmt(r['ttft_ms'])} | {fmt(r['compile_s'])} | "
                     f"{fmt(r['peak_memory_gb'], '.2f')} | {fmt(r.get('vs_peer'), '.2f', 'x')} |")
    lines += ["", "Targets for a 7B model on an H100/H200:", "", "| target | measured | met |",
              "|---|---|---|"]
    for t in report["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['target']} | {fmt(t['measured'], '.2f', t['unit'])} | {met} |")
    lines += ["", f"Device-aware tests on {a['device']}:", "",
              "| dtype | passed | failed | skipped | failures |", "|---|---|---|---|---|"]
    if not report["tests"]:
        lines.append("| (not run) | | | | |")
    for dtype, t in report["tests"].items():
        lines.append(f"| {dtype} | {t['passed']} | {t['failed']} | {t['skipped']} | {', '.join(t['failures'])} |")
    lines += ["",
              "| stage | status | seconds | notes (an error; recompilations, skipped CUDA graphs) |",
              "|---|---|---|---|"]
    for s in report["stages"]:
        notes = "<br>".join(s.get("notes", [])).replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {notes} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda",
                   help="default cuda; cpu makes the defaults a dry run")
    p.add_argument("--preset", default="Llama-2-7b",
                   help="model.py preset of the random weights (default Llama-2-7b)")
    p.add_argument("--out", type=Path, default=Path("gpu_check"),
                   help="folder for the report (default gpu_check)")
    p.add_argument("--weights", type=Path, default=None,
                   help="folder for the weights, kept for the next run (default OUT/weights; 7B: ~41 GB in all)")
    p.add_argument("--tests", default=None,
                   help="pytest -k expression of the device-aware tests to run (default: "
                   "all; --device cpu: two of them); 'none' skips the tests")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="bench.py --compile and the compiled transformers peer (default: on, off with --device cpu)")
    p.add_argument("--input_tokens", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default 128; --device cpu: 8")
    p.add_argument("--num_iter", type=int, default=None,
                   help="timed iterations (default 3; --device cpu: 1)")
    p.add_argument("--copy_gib", type=float, default=None,
                   help="GiB bench.py copies to measure the copy bandwidth (default 1; --device cpu: 0.25)")
    p.add_argument("--budget_s", type=float, default=600,
                   help="start no stage after this many seconds, and cut one that would run past it (default 600)")
    p.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    a = p.parse_args(argv)
    dry = a.device == "cpu"
    a.tests = a.tests or (DRY_RUN_TESTS if dry else "")
    a.compile = (not dry) if a.compile is None else a.compile
    a.max_new_tokens = a.max_new_tokens or (8 if dry else 128)
    a.num_iter = a.num_iter or (1 if dry else 3)
    a.copy_gib = a.copy_gib or (0.25 if dry else 1.0)
    a.weights = a.weights or a.out / "weights"
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    device = parse_device(a.device)
    ModelArgs.from_name(a.preset)  # an unknown preset fails here, before any work
    if a.input_tokens < 1 or a.max_new_tokens < 2 or a.num_iter < 1:
        raise BriskError("--input_tokens, --num_iter must be at least 1 and --max_new_tokens at least 2")
    for name in ("gpu_check.json", "gpu_check.md"):
        check_writable(a.out / name, a.force)
    out, weights = a.out.resolve(), a.weights.resolve()
    weights.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, a.budget_s)
    try:
        report = check(a, device, out, weights, stages)
    finally:
        stages.stop()
    md = markdown(report)
    save_atomic(out / "gpu_check.md", lambda tmp: tmp.write_text(md), True)
    print(md)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['environment']['total_s']} s; "
          f"weights kept in {weights}", file=sys.stderr)
    bad = [s["name"] for s in stages.done if s["status"] != "ok"]
    if bad:
        raise BriskError(f"not everything passed: {', '.join(bad)} (see {out / 'logs'})")


def make_weights(a: argparse.Namespace, device: torch.device, weights: Path, hf_dir: Path,
                 stages: Stages) -> None:
    """The stages that make what is missing of: random weights in the preset's shape, their
    quantized copies, and transformers' copy in hf_dir."""
    py, float_ckpt = sys.executable, weights / "model.pth"
    if not float_ckpt.is_file():
        stages.run("random-weights",
                   [py, "scripts/random_checkpoint.py", "--model", a.preset, "--out", weights,
                    "--device", device, "--force"], CAPS["random"])
    for label, name, quant in PRECISIONS[1:]:
        if float_ckpt.is_file() and not (weights / name).is_file():
            cmd = [py, "quantize.py", "--checkpoint_path", float_ckpt, *quant, "--device", device]
            stages.run(f"quantize-{label.replace(' ', '-')}", cmd, CAPS["quantize"])
    if float_ckpt.is_file() and not (hf_dir / "model.safetensors").is_file():
        stages.record("transformers-weights", lambda: write_hf_checkpoint(float_ckpt, hf_dir),
                      CAPS["hf"])


def check(a: argparse.Namespace, device: torch.device, out: Path, weights: Path,
          stages: Stages) -> dict:
    """Run the stages; returns the report, also written to out/gpu_check.json."""
    py, t_start = sys.executable, time.monotonic()

    # 1. tests, beside 2.
    tests = {}
    if a.tests != "none":
        for dtype in ("float32", "bfloat16"):
            junit = out / f"tests-{dtype}.xml"
            junit.unlink(missing_ok=True)
            cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   *(["-k", a.tests] if a.tests else []), "--junitxml", junit, *TEST_FILES]
            tests[dtype] = stages.start(f"tests-{dtype}", cmd, CAPS["tests"],
                                        env=dict(BRISK_TEST_DEVICE=str(device),
                                                 BRISK_TEST_DTYPE=dtype))

    # 2. weights
    hf_dir = weights / "hf"
    make_weights(a, device, weights, hf_dir, stages)
    for dtype, stage in tests.items():  # the benchmarks run alone on the device
        stages.finish(stage)
        tests[dtype] = test_counts(out / f"tests-{dtype}.xml")

    # 3. bench: the peer in the bf16 run; if that run fails, brisk alone, and at the end the peer
    #    beside an eager brisk (so a peer that breaks costs no brisk figure)
    peer_name = "transformers-compile" if a.compile else "transformers"
    results, peer, env = [], None, {}
    # recompilations and skipped CUDA graphs, into the logs
    bench_env = dict(TORCH_LOGS="recompiles,perf_hints")
    runs = [(label, weights / name, label == "bf16", a.compile) for label, name, _ in PRECISIONS]
    while runs:
        label, ckpt, with_peer, compiled = runs.pop(0)
        with_peer = with_peer and (hf_dir / "model.safetensors").is_file()
        if not ckpt.is_file() or (label == "peer" and not with_peer):
            continue
        tag = label.replace(" ", "-") + ("+peer" if with_peer and label != "peer" else "")
        figures = out / f"bench-{tag}.json"
        # a stale file of an earlier run must not stand in for this one
        figures.unlink(missing_ok=True)
        cmd = [py, "bench.py", "--checkpoint_path", ckpt, "--device", device, "--dtype", "bfloat16",
               "--input-tokens", a.input_tokens, "--max-new-tokens", a.max_new_tokens, "--num-iter",
               a.num_iter, "--warmup", 1, "--copy_gib", a.copy_gib, "--force", "--json", figures]
        cmd += (["--compile"] if compiled else []) + (["--peers", peer_name, "--hf_model", hf_dir]
                                                      if with_peer else [])
        stage = stages.run(f"bench-{tag}", cmd, CAPS["peer" if with_peer else "bench"], bench_env)
        stage["notes"] = stage.get("notes", []) + compiler_notes(Path(stage["log"]))
        if stage["status"] != "ok" and with_peer and label != "peer":
            runs[:0] = [(label, ckpt, False, compiled)]
            runs.append(("peer", ckpt, True, False))
        rows, environment = bench_rows(figures)
        env = environment or env
        for r in rows:
            if r["engine"] != "brisk":
                peer = r
            elif label != "peer":
                results.append(dict(r, precision=label))

    # 4. report
    results, targets = summarize(results, peer, peer_name)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = dict(
        environment=dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         device=str(device), device_name=name, torch=torch.__version__,
                         cuda=torch.version.cuda, transformers=version("transformers"),
                         python=platform.python_version(),
                         device_copy_gb_s=env.get("device_copy_gb_s"),
                         total_s=round(time.monotonic() - t_start, 1)),
        settings=dict(device=str(device), preset=a.preset, input_tokens=a.input_tokens,
                      max_new_tokens=a.max_new_tokens, num_iter=a.num_iter, compile=a.compile,
                      tests=a.tests, weights=str(weights)),
        results=results, peer_name=peer_name, peer=peer, targets=targets, tests=tests,
        stages=stages.done)
    save_json(out / "gpu_check.json", report, True)
    return report


if __name__ == "__main__":
    run_cli(main)
