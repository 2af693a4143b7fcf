"""A Llama-7B-shaped model folder and synthetic adapters for serving benchmarks on a GPU.

The folder holds a config.json and a tokenizer but no weights: serve it with
`load_format=dummy` (SLORA_LOAD_FORMAT=dummy), which builds random fp16 weights on the GPU.
The vocabulary is the tokenizer's, so text prompts map to valid ids. Adapters: q,k,v,o, ranks
round robin, one weights file per rank hard-linked under every id (bench_engine_gpu.py).

    python bench/make_served_model.py OUT_DIR --tokenizer TOKENIZER_DIR [--num-adapters 32]
    -> OUT_DIR/model, OUT_DIR/adapters
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_engine_gpu import make_adapters, make_model_dir  # noqa: E402

from slora_backend.model.spec import ModelSpec  # noqa: E402
from slora_testing.synthetic_adapters import LLAMA7B_CONFIG  # noqa: E402


def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    """Ids the tokenizer can produce (its vocabulary and added tokens)."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json")
    p.add_argument("--num-adapters", type=int, default=32)
    p.add_argument("--ranks", default="8,16,32,64")
    args = p.parse_args()
    config = dict(LLAMA7B_CONFIG, vocab_size=tokenizer_vocab_size(args.tokenizer))
    model_dir = make_model_dir(args.out, args.tokenizer, config)
    ranks = [int(r) for r in args.ranks.split(",")]
    names = make_adapters(args.out / "adapters", ModelSpec.from_hf_config(config),
                          args.num_adapters, ranks)
    print(f"{model_dir} (vocab {config['vocab_size']}), {len(names)} adapters in "
          f"{args.out / 'adapters'}")


if __name__ == "__main__":
    main()
