"""bench/tp_comm_bytes.py: its formula of the collectives' bytes per step is what a 2-rank
engine on the CPU counts in one decode step (base and LoRA, padded rank included), and its
7B / 70B table is the formula's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "tp_comm_bytes.py"


def _bench():  # noqa: ANN202 (the script as a module)
    spec = importlib.util.spec_from_file_location("tp_comm_bytes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_measured_bytes_are_the_formulas() -> None:
    bench = _bench()
    result = bench.check()
    assert result["step"]["rank"] % result["tp"]  # a rank the shares must pad
    for kind in ("base", "lora"):
        assert result["measured"][kind] == result["formula"][kind] > 0, result
    assert result["measured"]["plan"] > 0


def test_table_rows() -> None:
    rows = _bench().compute_table()
    assert {(r["model"], r["tp"]) for r in rows} >= {("Llama-2-7B", 2), ("Llama-2-70B", 8)}
    for r in rows:
        # LoRA's share is the ratio of ranks to the hidden size: small next to the base's
        assert 0 < r["torch_lora_pct"] < r["triton_lora_pct"] < 10, r
