"""Write many random, valid PEFT LoRA adapters (mixed ranks and target modules) for a model.

    python scripts/gen_synthetic_adapters.py --model .cache/models/tiny --out .cache/adapters/syn \
        --count 2000 --ranks 4,8,16,32,64 --seed 0
    python scripts/gen_synthetic_adapters.py --make-tiny-model .cache/models/tiny

Files are written directly (safetensors + JSON, no PEFT model per adapter): 2,000 adapters for
a tiny model take seconds. With --make-tiny-model and no --model, adapters are for the tiny model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slora_testing.synthetic_adapters import (  # noqa: E402 (after the path fix above)
    adapter_config,
    adapter_name,
    adapter_tensors,
    load_spec,
    make_tiny_model,
    random_recipe,
    write_adapter,
)

DEFAULT_TOKENIZER_FROM = Path(__file__).resolve().parents[1] / ".cache/models/SmolLM2-135M-Instruct"


def parse_ranks(text: str) -> list[int]:
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks must be comma-separated integers: {text!r}") \
            from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"--ranks must list integers >= 1: {text!r}")
    return ranks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="HF model dir the adapters are for")
    parser.add_argument("--out", type=Path, help="adapter directory to write into")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--ranks", type=parse_ranks, default=[4, 8, 16, 32, 64])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--make-tiny-model", type=Path, metavar="DIR",
                        help="also write a tiny random Llama (HF dir) to DIR")
    parser.add_argument("--tokenizer-from", type=Path, default=DEFAULT_TOKENIZER_FROM,
                        help="copy tokenizer files from this model dir into the tiny model")
    args = parser.parse_args(argv)
    if args.count < 0:
        parser.error("--count must be >= 0")
    if args.model is None:
        args.model = args.make_tiny_model
    if args.out is not None and args.model is None:
        parser.error("--out needs --model (or --make-tiny-model)")
    if args.out is None and args.make_tiny_model is None:
        parser.error("nothing to do: give --out (with --model) and/or --make-tiny-model")
    return args


def generate(model: Path, out: Path, count: int, ranks: list[int], seed: int) -> list[str]:
    """Write `count` adapters into `out`; returns their ids."""
    spec = load_spec(model)
    rng = np.random.default_rng(seed)
    names = []
    for index in tqdm(range(count), desc="adapters", unit="adapter"):
        recipe = random_recipe(rng, ranks, seed=seed * 1_000_003 + index)
        name = adapter_name(index, recipe)
        write_adapter(out / name, adapter_config(recipe, str(model)), adapter_tensors(recipe, spec))
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.make_tiny_model is not None:
        tokenizer_from = args.tokenizer_from if args.tokenizer_from.is_dir() else None
        make_tiny_model(args.make_tiny_model, tokenizer_from=tokenizer_from, seed=args.seed)
        print(f"tiny model written to {args.make_tiny_model}")
    if args.out is not None:
        start = time.perf_counter()
        names = generate(args.model, args.out, args.count, args.ranks, args.seed)
        print(f"{len(names)} adapters written to {args.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
