"""Download the files brisk needs from a Hugging Face model repo into checkpoints/ORG/NAME.

    python scripts/download.py --repo_id meta-llama/Llama-3.2-1B-Instruct [--hf_token hf_...]
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from huggingface_hub import list_repo_files, snapshot_download  # noqa: E402
from huggingface_hub.errors import (GatedRepoError, HFValidationError, HTTPError,  # noqa: E402
                                    RepositoryNotFoundError)

from cli import ArgumentParser, BriskError, run_cli  # noqa: E402

# config, tokenizer and generation settings (GPT-2-style repos such as OPT's have vocab.json +
# merges.txt and no tokenizer.json); Llama-3 repos keep tiktoken's file under original/ beside
# Meta's consolidated .pth weights, which we never want
META_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "vocab.json", "merges.txt", "original/tokenizer.model"]
SAFETENSORS = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]
PYTORCH_BIN = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]


def allow_patterns(repo_files: list[str]) -> list[str]:
    """The metadata plus one copy of the weights: safetensors when the repo has them, else .bin."""
    has_safetensors = any(f.startswith("model") and f.endswith(".safetensors") for f in repo_files)
    return META_FILES + (SAFETENSORS if has_safetensors else PYTORCH_BIN)


def download(repo_id: str, checkpoint_dir: Path, token: str | None) -> Path:
    local_dir = Path(checkpoint_dir) / repo_id
    hint = "pass --hf_token or set HF_TOKEN"
    try:
        patterns = allow_patterns(list_repo_files(repo_id, token=token))
        snapshot_download(repo_id, local_dir=local_dir, allow_patterns=patterns, token=token)
    except GatedRepoError:
        raise BriskError(f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id}, "
                         f"then {hint} with a token that has access") from None
    except RepositoryNotFoundError:
        raise BriskError(f"repository {repo_id} not found on the Hugging Face Hub "
                         f"(check the name; for a private repo {hint})") from None
    except HFValidationError as e:
        raise BriskError(f"{repo_id!r} is not a valid repo id ({str(e).splitlines()[0]})") from None
    except (HTTPError, OSError) as e:  # no network, proxy, disk full, server error...
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise BriskError(f"could not download {repo_id}: {msg} (check your network and retry)") from None
    return local_dir


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo_id", required=True,
                   help="Hugging Face model repo, e.g. meta-llama/Llama-3.2-1B")
    p.add_argument("--hf_token", default=None,
                   help="access token for gated or private repos (default: $HF_TOKEN)")
    p.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints"),
                   help="files go to DIR/ORG/NAME")
    args = p.parse_args(argv)
    local_dir = download(args.repo_id, args.checkpoint_dir,
                         args.hf_token or os.environ.get("HF_TOKEN"))
    print(f"downloaded {args.repo_id} to {local_dir}")


if __name__ == "__main__":
    run_cli(main)
