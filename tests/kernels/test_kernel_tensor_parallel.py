"""The triton backend's sharded LoRA (slora_backend/parallel/kernel_lora.py: the shrink kernel
on A shares, the collective on its result, the expand kernel on B shares) at 2 ranks against
the torch backend at 1 rank: same greedy tokens, logits within 1e-5, on the tiny model with
SmolLM2's 9 query / 3 KV heads (padded to 12 / 4 at 2 ranks: the RoPE / KV-write and paged
attention kernels run each rank's 6 / 2 heads, zero heads included). Without CUDA the kernels
run under the Triton interpreter in every rank (conftest.py's TRITON_INTERPRET=1 is inherited
by the workers), on gloo; on a GPU host it needs 2 GPUs (NCCL)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from slora_testing.engine_runs import Req

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from tp_helpers import engine_config, make_tp_model, max_abs_diff, run  # noqa: E402

pytestmark = pytest.mark.slow

LOGITS_TOL = 1e-5
# a prefill step (MBGMM), then decode steps (MBGMV) of base and adapter tokens together
REQUESTS = [Req("base", list(range(3, 15)), None, 2, 0),
            Req("all", list(range(20, 29)), "r4_all", 2, 0),
            Req("mlp", list(range(40, 47)), "r12_gate_down", 2, 0)]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="needs 2 GPUs on a CUDA host")
def test_triton_backend_at_two_ranks_matches_one_rank(tmp_path: Path) -> None:
    # hidden 144: at 2 ranks every share's rows are multiples of 8 elements (the kernels'
    # aligned path, as on real models); fp32 sums over 144 columns: ~5e-6 of 1e-5 used here
    model, adapters = make_tp_model(tmp_path, "padded", hidden_size=144)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    want_tokens, want_logits, _ = run(engine_config(model, adapters, 1), REQUESTS)
    got_tokens, got_logits, traffic = run(
        engine_config(model, adapters, 2, kernel_backend="triton", device=device), REQUESTS)
    assert got_tokens == want_tokens
    diff = max_abs_diff(got_logits, want_logits)
    print(f"triton backend, padded heads, tp=2: max |logit difference| = {diff:.2e}")
    assert diff <= LOGITS_TOL
    assert traffic["lora"] > 0
