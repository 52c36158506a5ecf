"""Rewrite a GGUF file with its weight matrices in another type, keeping every metadata entry.

    python scripts/gguf_retype.py IN.gguf OUT.gguf --type Q8_0
    python scripts/gguf_retype.py IN.gguf OUT.gguf --type Q4_0 --head_type Q8_0   # as quantize.py --mode int4

Used to run llama.cpp on the same weights at the precision brisk runs (F32, BF16, F16, Q8_0, Q4_0,
Q4_1) for side-by-side benchmarks (bench.py --peers). Norms and other 1-D tensors stay F32, as
llama.cpp keeps them. `--head_type` gives the output head (`token_embd.weight` when the head is tied
to it) its own type, as llama.cpp's `llama-quantize --output-tensor-type` does: brisk's int4
checkpoints keep an int8 head.
"""
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import ArgumentParser, BriskError, run_cli, save_atomic  # noqa: E402

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]
FILE_TYPES = {name: LlamaFileType["ALL_F32" if name == "F32" else "MOSTLY_" + name]
              for name in TYPES}


def retype(src: Path, dst: Path, qtype: GGMLQuantizationType, force: bool = False,
           head_type: Optional[GGMLQuantizationType] = None) -> None:
    try:
        reader = GGUFReader(src)
    except Exception as e:  # a truncated or foreign file
        raise BriskError(f"cannot read GGUF {src}: {str(e).splitlines()[0]}") from None
    arch = reader.fields["general.architecture"].contents()
    names = {t.name for t in reader.tensors}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"

    def write(tmp: Path) -> None:
        writer = GGUFWriter(str(tmp), arch)
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
                continue  # written by the writer itself, or below
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
        writer.add_file_type(FILE_TYPES[qtype.name])
        for t in tqdm(reader.tensors, desc=f"to {qtype.name}", unit="tensor"):
            w = dequantize(t.data, t.tensor_type).astype(np.float32)  # numpy shape: [.., out, in]
            target = (head_type or qtype) if t.name == head else qtype if w.ndim == 2 else GGMLQuantizationType.F32
            if target == GGMLQuantizationType.F32:
                writer.add_tensor(t.name, w)
            elif target == GGMLQuantizationType.F16:
                writer.add_tensor(t.name, w.astype(np.float16))
            else:
                writer.add_tensor(t.name, quantize(w, target), raw_dtype=target)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    save_atomic(dst, write, force)


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="input .gguf")
    p.add_argument("dst", type=Path, help="output .gguf")
    p.add_argument("--type", choices=TYPES, required=True, help="type of the weight matrices")
    p.add_argument("--head_type", choices=TYPES, help="type of the output head (default: --type)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = p.parse_args()
    if not args.src.is_file():
        raise BriskError(f"{args.src} not found")
    head_type = GGMLQuantizationType[args.head_type] if args.head_type else None
    retype(args.src, args.dst, GGMLQuantizationType[args.type], args.force, head_type)


if __name__ == "__main__":
    run_cli(main)
