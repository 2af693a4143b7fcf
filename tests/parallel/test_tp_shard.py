"""What each tensor-parallel rank keeps (slora_backend/parallel/shard.py, adapters.py), without
processes: S-LoRA's partition of the LoRA factors recombines into the whole LoRA delta (rank
padding and head padding included), the base weights' slices (zero heads where tp does not
divide the heads), the packed shares, the sizes refused."""

from __future__ import annotations

import dataclasses

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
    pad_heads,
    padding_note,
)
from slora_backend.parallel.step import interleave

# SmolLM2-135M's shape: 9 heads, 3 KV heads
SMOL = ModelSpec(num_layers=2, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                 intermediate_size=1536, vocab_size=100)
TINY = ModelSpec(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=4, head_dim=8,
                 intermediate_size=128, vocab_size=100)
# SmolLM2's heads on a small scale: 2 and 4 ranks pad them (to 12 / 4), 3 ranks do not
SMALL9 = ModelSpec(num_layers=2, hidden_size=32, num_heads=9, num_kv_heads=3, head_dim=4,
                   intermediate_size=64, vocab_size=100)


@pytest.mark.parametrize("spec, size, rank", [(TINY, 2, 8), (TINY, 4, 6), (TINY, 4, 12),
                                             (SMOL, 3, 4), (SMOL, 2, 8), (SMALL9, 2, 6),
                                             (SMALL9, 4, 12)])
@pytest.mark.parametrize("module", MODULE_ORDER)
def test_shares_recombine_into_the_lora_delta(module: str, spec: ModelSpec, size: int,
                                              rank: int) -> None:
    """The ranks' shares give the LoRA delta of the model; where heads are padded, its delta on
    the padded layout: padded heads' outputs exactly 0, their inputs (any values) ignored."""
    geometry = ShardGeometry(spec, size)
    gen = torch.Generator().manual_seed(0)
    d_in, d_out = spec.module_dims(module)
    pad_in, pad_out = geometry.spec.module_dims(module)  # the padded model's
    a = torch.randn(rank, d_in, generator=gen, dtype=torch.float64)
    b = torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
    x = torch.randn(5, pad_in, generator=gen, dtype=torch.float64)  # junk in padded inputs
    a_parts, bt_parts = geometry.split(module, a, b)
    rp = geometry.padded_rank(rank)
    a_len, b_len = geometry.lengths(module)
    assert (a_len * (size if module not in COLUMN_PARALLEL else 1), b_len * size) == (
        pad_in, pad_out)
    assert a_parts.shape == (size, geometry.a_rows(module, rp), a_len)
    assert bt_parts.shape == (size, rp, b_len)
    if module in COLUMN_PARALLEL:  # shrink on the whole input, gathered, interleaved
        shrink = interleave(torch.stack([x @ part.t() for part in a_parts]))
    else:  # shrink on this rank's input columns, summed
        xs = x.view(5, size, a_len).transpose(0, 1)
        shrink = sum(xs[i] @ a_parts[i].t() for i in range(size))
    delta = torch.cat([shrink @ bt_parts[i] for i in range(size)], dim=1)
    torch.testing.assert_close(delta[:, :d_out], x[:, :d_in] @ a.t() @ b.t())
    assert not delta[:, d_out:].any()  # a padded head's LoRA output is exactly 0


@pytest.mark.parametrize("spec, size, modules", [
    (TINY, 4, ("q_proj", "o_proj", "down_proj")),
    (SMALL9, 2, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))])
def test_packed_shares_are_each_ranks_factors(spec: ModelSpec, size: int,
                                              modules: tuple[str, ...]) -> None:
    geometry = ShardGeometry(spec, size)
    rp = geometry.padded_rank(6)
    plan = plan_adapter_rows(spec, modules, rp, geometry.spec.page_elems(16), geometry)
    gen = torch.Generator().manual_seed(1)
    layers = spec.num_layers
    # stacked as HostAdapter holds them: A [L, r, in], B [L, out, r]
    factors = {m: (torch.randn(layers, 6, spec.module_dims(m)[0], generator=gen),
                   torch.randn(layers, spec.module_dims(m)[1], 6, generator=gen))
               for m in modules}
    packed = pack_shares(factors, plan, geometry, layers, torch.empty(0))
    for i in range(size):
        shares = share_factors(packed[i], plan, layers)
        for m, (a, b) in factors.items():
            for layer in range(layers):  # each layer's share is that layer's own split
                a_parts, bt_parts = geometry.split(m, a[layer], b[layer])
                assert torch.equal(shares[m][0][layer], a_parts[i])
                assert torch.equal(shares[m][1][layer], bt_parts[i].t())


def _checkpoint(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """One layer's weights of `spec` (HF names and shapes), distinct values."""
    gen = torch.Generator().manual_seed(2)
    names = {f"model.layers.0.{p}.{m}.weight": m for p, ms in
             (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
              ("mlp", ("gate_proj", "up_proj", "down_proj"))) for m in ms}
    out = {name: torch.randn(*reversed(spec.module_dims(m)), generator=gen)
           for name, m in names.items()}
    out["model.norm.weight"] = torch.randn(spec.hidden_size, generator=gen)
    out[LM_HEAD] = torch.randn(spec.vocab_size, spec.hidden_size, generator=gen)
    return out


def test_base_weight_slices() -> None:
    full = _checkpoint(TINY)
    rank1 = Shard(1, 2)

    def take(name: str) -> torch.Tensor:
        return rank1.take(TINY, name, full.__getitem__)

    q, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(take(q), full[q][32:])  # heads 4-7
    assert torch.equal(take(down), full[down][:, 64:])
    assert take("model.norm.weight") is full["model.norm.weight"]  # replicated
    with pytest.raises(KeyError):  # only rank 0 keeps the lm_head
        take(LM_HEAD)
    assert Shard(0, 2).take(TINY, LM_HEAD, full.__getitem__) is full[LM_HEAD]
    local = rank1.local_spec(TINY)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (4, 2, 64)
    assert local.hidden_size == TINY.hidden_size and local.head_dim == TINY.head_dim


def test_padded_heads_base_slices() -> None:
    """9 query / 3 KV heads at 2 ranks: rank 0 keeps KV heads 0-1 with query heads 0-5, rank 1
    KV head 2 and a zero head with query heads 6-8 and three zero heads; o's input columns
    follow the query heads; the MLP is cut as without padding."""
    full = _checkpoint(SMALL9)
    hd = SMALL9.head_dim
    pre = "model.layers.0."
    ranks = [Shard(i, 2) for i in range(2)]
    got = [{name: s.take(SMALL9, name, full.__getitem__) for name in full if name != LM_HEAD}
           for s in ranks]
    q, k, v, o = (full[pre + f"self_attn.{m}_proj.weight"] for m in "qkvo")
    zeros = torch.zeros(3 * hd, SMALL9.hidden_size)
    assert torch.equal(got[0][pre + "self_attn.q_proj.weight"], q[: 6 * hd])
    assert torch.equal(got[1][pre + "self_attn.q_proj.weight"], torch.cat([q[6 * hd :], zeros]))
    for name, w in (("k_proj", k), ("v_proj", v)):
        assert torch.equal(got[0][pre + f"self_attn.{name}.weight"], w[: 2 * hd])
        assert torch.equal(got[1][pre + f"self_attn.{name}.weight"],
                           torch.cat([w[2 * hd :], zeros[:hd]]))
    assert torch.equal(got[0][pre + "self_attn.o_proj.weight"], o[:, : 6 * hd])
    assert torch.equal(got[1][pre + "self_attn.o_proj.weight"],
                       torch.cat([o[:, 6 * hd :], zeros.t()], dim=1))
    down = full[pre + "mlp.down_proj.weight"]
    assert torch.equal(got[1][pre + "mlp.down_proj.weight"], down[:, 32:])
    for s in ranks:  # equal shapes on every rank: the pools' pages agree
        local = s.local_spec(SMALL9)
        assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (6, 2, 32)
        assert local.page_elems(16) == 2 * 16 * 2 * hd


def test_heads_are_padded_only_where_tp_does_not_divide_them() -> None:
    assert pad_heads(SMOL, 3) is SMOL and pad_heads(TINY, 4) is TINY
    assert padding_note(SMOL, 3) is None
    for size, (heads, kv_heads) in ((2, (12, 4)), (4, (12, 4)), (6, (18, 6))):
        padded = pad_heads(SMOL, size)
        assert (padded.num_heads, padded.num_kv_heads) == (heads, kv_heads)
        assert padded.gqa_ratio == SMOL.gqa_ratio  # groups intact
    assert padding_note(SMOL, 2) == (
        "9 query / 3 KV heads padded to 12 / 4 for tensor_parallel_size 2 (zero heads, exact): "
        "attention does 33% more work, and the KV cache and the q,k,v,o weights take 33% more "
        "memory")


def test_sizes_that_do_not_split_the_model_are_refused() -> None:
    check_divides(SMOL, 2)  # its heads are padded
    check_divides(SMOL, 3)
    with pytest.raises(EngineError) as err:
        check_divides(SMOL, 5)
    assert err.value.field == "tensor_parallel_size"
    assert "5 does not divide the model's 1536 MLP columns" in err.value.message
    with pytest.raises(EngineError, match="576 hidden columns"):
        check_divides(dataclasses.replace(SMOL, intermediate_size=1536 * 5), 5)
    with pytest.raises(EngineError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    assert EngineConfig.from_parameters({"tensor_parallel_size": "3"}, env={}
                                        ).tensor_parallel_size == 3
