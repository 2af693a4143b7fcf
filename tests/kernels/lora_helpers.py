"""Shared pieces of the LoRA kernel tests: random pools of mixed-rank adapters, slots, checks.

CPU: Triton interpreter, fp32, SmolLM2 dims (hidden 576), few tokens. CUDA: fp16/bf16, SmolLM2
and Llama-7B dims, real batch sizes. Pools are random everywhere (never zeros) with the adapters'
pages shuffled; ranks 4..128 are mixed in every batch, with tokens that have no adapter.
"""

import torch

from slora_testing.kernel_pools import make_lora_pool

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if ON_CUDA else [torch.float32]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# (hidden, kv_out, intermediate, page_elems)
SMOL = (576, 192, 1536, 2 * 16 * 3 * 64)
LLAMA7B = (4096, 4096, 11008, 2 * 16 * 32 * 128)
MODELS = [SMOL, LLAMA7B] if ON_CUDA else [SMOL]
SLOT_RANKS = [4, 128, 16, 8, 64, 32, 12, 128, 4, 24]
# the fused module sets of one launch (q; q,k,v; gate,up; down) and the decode batch sizes
MODULE_SETS = [(0,), (0, 1, 2), (4, 5), (6,)]
MODULE_SET_IDS = ["q", "qkv", "gate_up", "down"]
DECODE_BATCHES = [1, 256] if ON_CUDA else [1, 9]


def module_dims(model):
    hidden, kv, inter, _ = model
    return [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]


def slot_table(rank_list):
    """Per slot: its rank on a varying subset of the 7 modules (some slots skip some modules)."""
    out = []
    for i, r in enumerate(rank_list):
        out.append([0 if (i + m) % 4 == 3 else r for m in range(7)])
    return out


def build(model, dtype, seed, row_pad=0):
    gen = torch.Generator().manual_seed(seed)
    dims = module_dims(model)
    pool = make_lora_pool(
        slot_table(SLOT_RANKS),
        dims,
        page_elems=model[3],
        dtype=dtype,
        device=DEVICE,
        gen=gen,
        row_pad=row_pad,
    )
    return gen, dims, pool


def random_slots(gen, n, module, with_base=True):
    """Random adapter slots; a fifth of the tokens without adapter; token 0 uses ``module``."""
    num_slots = len(SLOT_RANKS)
    slots = torch.randint(0, num_slots, (n,), generator=gen, dtype=torch.int32)
    if with_base and n > 1:
        slots[1 + torch.randperm(n - 1, generator=gen)[: max(1, n // 5)]] = -1
    table = slot_table(SLOT_RANKS)
    slots[0] = next(s for s in range(num_slots) if table[s][module] > 0)
    return slots


def check_delta(y_out, y_in, ref, slots, dtype):
    delta = (ref - y_in.double()).norm()
    assert delta > 0, "the test drew no LoRA work"
    assert torch.isfinite(y_out).all()
    err = ((y_out.double() - ref).norm() / delta).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    base = slots.to(y_in.device) < 0
    assert torch.equal(y_out[base], y_in[base]), "tokens without adapter were modified"
