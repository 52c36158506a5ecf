"""Checkpoints: `model.pth` (a state dict, float or quantized) with `model_config.json` (ModelArgs)
beside it.

Everything that reads or writes one is here; the weights load with weights_only=True, memory-mapped.
"""
import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

import quant
from cli import BriskError, save_atomic
from model import ModelArgs, Transformer

CONFIG_NAME = "model_config.json"
# the embedded default model, as ./scripts/prepare.sh writes it: every script's default
# --checkpoint_path
DEFAULT_CHECKPOINT = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth")


def load_config(checkpoint_path: Path) -> ModelArgs:
    """The config written by the converter beside the weights, else the preset matching the
    directory name."""
    cfg = Path(checkpoint_path).parent / CONFIG_NAME
    if cfg.is_file():
        try:
            return ModelArgs.from_dict(json.loads(cfg.read_text()))
        except (TypeError, ValueError) as e:
            raise BriskError(f"{cfg}: not a model config ({e})") from None
    return ModelArgs.from_name(Path(checkpoint_path).parent.name)


def check_checkpoint(path: Path) -> None:
    """Scripts call this before any slow work, so a wrong path fails at once."""
    if not Path(path).is_file():
        raise BriskError(f"checkpoint not found: {path} (run ./scripts/prepare.sh first?)")


def load_state_dict(checkpoint_path: Path) -> dict:
    path = Path(checkpoint_path)
    check_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, pickle of arbitrary objects, ...
        raise BriskError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


Transform = Callable[[nn.Module, dict], dict]


def load_model(checkpoint_path, device="cpu", dtype=torch.bfloat16,
               transform: Optional[Transform] = None) -> Transformer:
    """Build the model on the meta device and assign the checkpoint's tensors, cast once to
    dtype/device.

    Quantized checkpoints (written by quantize.py) carry a `__quant__` entry; their linears are
    swapped for quantized modules before loading, and packed for the device afterwards.
    `transform(model, state_dict)`, if given, may reshape the unloaded model and returns the state
    dict to load (tp.apply_tp keeps one rank's slices of the memory-mapped checkpoint, before
    anything is copied).
    """
    sd = load_state_dict(checkpoint_path)
    config = load_config(checkpoint_path)
    quantization = sd.pop("__quant__", None)
    with torch.device("meta"):
        model = Transformer(config)
    if quantization is not None:
        quant.swap_in_quantized(model, quantization)
    if transform is not None:
        sd = transform(model, sd)
    sd = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
          for k, v in sd.items()}
    if config.tie_embeddings:  # the file holds the shared matrix once
        sd["output.weight"] = sd["tok_embeddings.weight"]
    try:
        model.load_state_dict(sd, assign=True, strict=True)
    except RuntimeError as e:
        raise BriskError(f"{checkpoint_path} does not match its config: {' '.join(str(e).split())[:300]}") from None
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    if quantization is not None:
        quant.pack_for_device(model, device)
    return model.eval()


def save_checkpoint(state_dict: dict, path: Path, force: bool = False) -> None:
    save_atomic(path, lambda tmp: torch.save(state_dict, tmp), force)
