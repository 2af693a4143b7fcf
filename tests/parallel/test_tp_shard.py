"""What each tensor-parallel rank keeps (slora_backend/parallel/shard.py, adapters.py), without
processes: S-LoRA's partition of the LoRA factors recombines into the whole LoRA delta (rank
padding included), the base weights' slices, the packed shares, the sizes refused."""

from __future__ import annotations

import pytest
import torch

from slora_backend import EngineConfig, EngineError
from slora_backend.model.lora import plan_adapter_rows
from slora_backend.model.spec import MODULE_ORDER, ModelSpec
from slora_backend.parallel.adapters import pack_shares, share_factors
from slora_backend.parallel.shard import (
    COLUMN_PARALLEL,
    LM_HEAD,
    Shard,
    ShardGeometry,
    check_divides,
)
from slora_backend.parallel.step import interleave

# SmolLM2-135M's shape: 9 heads, 3 KV heads
SMOL = ModelSpec(num_layers=2, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                 intermediate_size=1536, vocab_size=100)
TINY = ModelSpec(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=4, head_dim=8,
                 intermediate_size=128, vocab_size=100)


@pytest.mark.parametrize("size, rank", [(2, 8), (4, 6), (4, 12), (3, 4)])
@pytest.mark.parametrize("module", MODULE_ORDER)
def test_shares_recombine_into_the_lora_delta(module: str, size: int, rank: int) -> None:
    spec = TINY if size != 3 else SMOL
    geometry = ShardGeometry(spec, size)
    gen = torch.Generator().manual_seed(0)
    d_in, d_out = spec.module_dims(module)
    a = torch.randn(rank, d_in, generator=gen, dtype=torch.float64)
    b = torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
    x = torch.randn(5, d_in, generator=gen, dtype=torch.float64)
    a_parts, bt_parts = geometry.split(module, a, b)
    rp = geometry.padded_rank(rank)
    a_len, b_len = geometry.lengths(module)
    assert a_parts.shape == (size, geometry.a_rows(module, rp), a_len)
    assert bt_parts.shape == (size, rp, b_len)
    if module in COLUMN_PARALLEL:  # shrink on the whole input, gathered, interleaved
        shrink = interleave(torch.stack([x @ part.t() for part in a_parts]))
    else:  # shrink on this rank's input columns, summed
        xs = x.view(5, size, a_len).transpose(0, 1)
        shrink = sum(xs[i] @ a_parts[i].t() for i in range(size))
    delta = torch.cat([shrink @ bt_parts[i] for i in range(size)], dim=1)
    torch.testing.assert_close(delta, x @ a.t() @ b.t())


def test_packed_shares_are_each_ranks_factors() -> None:
    geometry = ShardGeometry(TINY, 4)
    modules = ("q_proj", "o_proj", "down_proj")
    rp = geometry.padded_rank(6)
    plan = plan_adapter_rows(TINY, modules, rp, TINY.page_elems(16), geometry)
    gen = torch.Generator().manual_seed(1)
    layers = TINY.num_layers
    # stacked as HostAdapter holds them: A [L, r, in], B [L, out, r]
    factors = {m: (torch.randn(layers, 6, TINY.module_dims(m)[0], generator=gen),
                   torch.randn(layers, TINY.module_dims(m)[1], 6, generator=gen))
               for m in modules}
    packed = pack_shares(factors, plan, geometry, layers, torch.empty(0))
    for i in range(4):
        shares = share_factors(packed[i], plan, layers)
        for m, (a, b) in factors.items():
            for layer in range(layers):  # each layer's share is that layer's own split
                a_parts, bt_parts = geometry.split(m, a[layer], b[layer])
                assert torch.equal(shares[m][0][layer], a_parts[i])
                assert torch.equal(shares[m][1][layer], bt_parts[i].t())


def test_base_weight_slices() -> None:
    full = torch.arange(8 * 6, dtype=torch.float32).view(8, 6)
    rank1 = Shard(1, 2)

    def get(name: str) -> torch.Tensor:
        return full

    assert torch.equal(rank1.take("model.layers.0.self_attn.q_proj.weight", get), full[4:])
    assert torch.equal(rank1.take("model.layers.0.mlp.down_proj.weight", get), full[:, 3:])
    assert rank1.take("model.norm.weight", get) is full  # replicated
    with pytest.raises(KeyError):  # only rank 0 keeps the lm_head
        rank1.take(LM_HEAD, get)
    assert Shard(0, 2).take(LM_HEAD, get) is full
    local = rank1.local_spec(TINY)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (4, 2, 64)
    assert local.hidden_size == TINY.hidden_size and local.head_dim == TINY.head_dim


def test_sizes_that_do_not_split_the_model_are_refused() -> None:
    check_divides(SMOL, 3)
    with pytest.raises(EngineError) as err:
        check_divides(SMOL, 2)
    assert err.value.field == "tensor_parallel_size"
    assert "2 does not divide the model's 9 attention heads" in err.value.message
    with pytest.raises(EngineError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    assert EngineConfig.from_parameters({"tensor_parallel_size": "3"}, env={}
                                        ).tensor_parallel_size == 3
