"""Torch paths of the model's hot ops: RMSNorm, RoPE, KV write, paged attention, LoRA.

These run on CPU (and, more slowly, on CUDA). Each op has one entry point that the CUDA Triton
kernels in kernels/ can be dispatched behind later (same arguments, same pool layout):
  write_kv(kv_cache, k, v, slot_mapping)
  paged_attention(q, k, v, kv_cache, meta, scale)
  lora_shrink_expand(x, ys, layer_flat, info, module_ids)
Per-forward metadata (AttentionMeta, LoraBatchInfo) is built once per step and shared by all layers.

Where the kernels/ launchers fit (CUDA, fp16/bf16), all taking BatchInput fields as they are:
  write_kv          -> slora_kernels.kv_write(k, v, kv_cache, batch.slot_mapping)
  paged_attention   -> slora_kernels.paged_attention_decode(q, kv_cache, context_lens, block_tables)
                       when batch.is_decode_only, else slora_kernels.paged_attention_prefill(q,
                       kv_cache, query_start_loc, context_lens, block_tables)
                       (decode rows are 1-token queries there)
  lora_shrink_expand-> slora_kernels.add_lora(y_fused, x, layer_flat, tables.a_ptr, tables.b_ptr,
                       tables.ranks, tables.scales, module_ids, out_dims, y_offsets,
                       lora_slots=... (decode) | segments=make_lora_segments(...) (once per step))

Pool pages may hold anything (stale KV, adapter rows, even non-finite garbage if the engine
allocated the pool with torch.empty): attention only reads the context positions it owns, and
padding in the batched decode path is zeroed before it is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .lora import LoraTables
from .spec import MODULE_ORDER, ModelSpec

# ---------------------------------------------------------------------------------------------
# norms and rotary embeddings


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalize in fp32, cast back, multiply by the weight."""
    if x.dtype == torch.float32:
        var = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(var + eps))
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def rope_inv_freq(spec: ModelSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (fp32), with llama3 / linear scaling as in transformers."""
    dim = spec.head_dim
    base = spec.rope_theta
    inv_freq = 1.0 / (
        base
        ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim)
    )
    sc = spec.rope_scaling
    if not sc:
        return inv_freq
    rope_type = sc.get("rope_type", "default")
    factor = float(sc["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low = float(sc["low_freq_factor"])
        high = float(sc["high_freq_factor"])
        old_len = float(sc["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        inv_l = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, inv_l)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim/2] for the given positions (computed in fp32, cast like HF)."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF convention). x [T, heads, head_dim]; cos/sin [T, head_dim/2]."""
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    c = cos[:, None, :]
    s = sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


# ---------------------------------------------------------------------------------------------
# KV cache


def kv_cache_view(
    layer_storage: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """storage[l] [P, page_elems] -> [P, 2, block_size, num_kv_heads, head_dim]."""
    return layer_storage.view(layer_storage.shape[0], 2, block_size, num_kv_heads, head_dim)


def write_kv(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write K, V of new tokens ([T, kvh, hd]) to their slots (page * block_size + offset)."""
    bs = kv_cache.shape[2]
    pages = torch.div(slot_mapping, bs, rounding_mode="floor")
    offs = slot_mapping - pages * bs
    kv_cache[pages, 0, offs] = k.to(kv_cache.dtype)
    kv_cache[pages, 1, offs] = v.to(kv_cache.dtype)


# ---------------------------------------------------------------------------------------------
# attention


@dataclass
class _PrefillSeq:
    q_start: int
    q_len: int
    ctx_len: int
    pages: (
        torch.Tensor | None
    )  # page ids covering the context (None when there is no earlier context)
    mask: torch.Tensor | None  # bool [q_len, ctx_len] (None: plain causal over the new tokens)


@dataclass
class _DecodeGroup:
    """Decode sequences of similar context length, attended in one batched call."""

    n: int
    rows: torch.Tensor | None  # token rows (None when `span` is set)
    span: tuple[int, int] | None  # contiguous token rows [a, b)
    pages: torch.Tensor  # int64 [n, nb]
    mask: (
        torch.Tensor | None
    )  # additive mask [n, 1, 1, nb*bs] (0 / -inf), None when nothing is padded
    pad_idx: torch.Tensor | None  # flat positions of padding in the gathered [n * nb*bs] tokens


@dataclass
class AttentionMeta:
    """Per-step attention plan (shared by all layers)."""

    num_tokens: int
    block_size: int
    prefill: list[_PrefillSeq] = field(default_factory=list)
    decode: list[_DecodeGroup] = field(default_factory=list)


# decode sequences are bucketed so that a bucket's longest context has at most this many times
# the pages of its shortest (limits the padding the batched gather copies and attends over)
DECODE_BUCKET_RATIO = 1.5


def prepare_attention(
    batch, block_size: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> AttentionMeta:
    qsl, ctx = batch.host_meta()
    S = len(ctx)
    meta = AttentionMeta(num_tokens=int(batch.input_ids.shape[0]), block_size=block_size)
    dec: list[tuple[int, int, int]] = []  # (ctx_len, seq, row)
    for i in range(S):
        q0, q1 = qsl[i], qsl[i + 1]
        n = q1 - q0
        c = ctx[i]
        if n == 0:
            continue
        if n == 1 and c > 1:
            dec.append((c, i, q0))
            continue
        prior = c - n
        if prior < 0:
            raise ValueError(f"sequence {i}: context_lens {c} < new tokens {n}")
        if prior == 0:
            meta.prefill.append(_PrefillSeq(q0, n, c, None, None))
        else:
            nb = -(-c // block_size)
            pages = batch.block_tables[i, :nb].to(device=device, dtype=torch.int64)
            kpos = torch.arange(c, device=device)
            qpos = torch.arange(prior, c, device=device)
            mask = kpos[None, :] <= qpos[:, None]
            meta.prefill.append(_PrefillSeq(q0, n, c, pages, mask))
    if not dec:
        return meta
    # keep batch order when one bucket suffices (the common all-decode case: rows 0..S-1)
    nbs = [-(-c // block_size) for c, _, _ in dec]
    if max(nbs) <= DECODE_BUCKET_RATIO * min(nbs):
        buckets = [dec]
    else:
        buckets = []
        cur: list[tuple[int, int, int]] = []
        for item in sorted(dec):
            if cur and -(-item[0] // block_size) > DECODE_BUCKET_RATIO * -(
                -cur[0][0] // block_size
            ):
                buckets.append(cur)
                cur = []
            cur.append(item)
        buckets.append(cur)
    bt = batch.block_tables
    for bucket in buckets:
        n = len(bucket)
        lens = [c for c, _, _ in bucket]
        seqs = [i for _, i, _ in bucket]
        rows = [r for _, _, r in bucket]
        nb = -(-max(lens) // block_size)
        L = nb * block_size
        span = (rows[0], rows[0] + n) if rows == list(range(rows[0], rows[0] + n)) else None
        if span is not None and seqs == list(range(seqs[0], seqs[0] + n)):
            pages = bt[seqs[0] : seqs[0] + n, :nb]
        else:
            pages = bt[torch.tensor(seqs, dtype=torch.int64, device=bt.device), :nb]
        mask = pad_idx = None
        if min(lens) < L:
            lens_t = torch.tensor(lens, dtype=torch.int64, device=device)
            invalid = torch.arange(L, device=device)[None, :] >= lens_t[:, None]
            mask = torch.zeros(n, 1, 1, L, dtype=dtype, device=device).masked_fill_(
                invalid[:, None, None, :], float("-inf")
            )
            pad_idx = invalid.view(-1).nonzero().view(-1)
        meta.decode.append(
            _DecodeGroup(
                n=n,
                rows=None
                if span is not None
                else torch.tensor(rows, dtype=torch.int64, device=device),
                span=span,
                pages=pages.to(device=device, dtype=torch.int64).contiguous(),
                mask=mask,
                pad_idx=pad_idx,
            )
        )
    return meta


def gather_pages(kv_cache: torch.Tensor, which: int, pages: torch.Tensor) -> torch.Tensor:
    """K (which=0) or V (1) of the given pages, contiguous: [len(pages), bs * kvh * hd].
    index_select over a 2-D strided view of the pool (about 3x faster than advanced indexing)."""
    P = kv_cache.shape[0]
    return kv_cache.view(P, 2, -1)[:, which].index_select(0, pages)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA attention of the new tokens over their sequence's context in the pool.

    q [T, H, hd]; k, v [T, kvh, hd] (the new tokens' K/V, already written to the pool);
    kv_cache [P, 2, bs, kvh, hd]. Returns [T, H*hd].
    """
    T, H, hd = q.shape
    kvh = kv_cache.shape[3]
    gqa = H != kvh
    if out is None:
        out = q.new_empty(T, H * hd)
    for p in meta.prefill:
        qs = q[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
        if p.pages is None:
            ks = k[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
            vs = v[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa
            )
        else:
            kc = gather_pages(kv_cache, 0, p.pages).view(-1, kvh, hd)[: p.ctx_len]
            vc = gather_pages(kv_cache, 1, p.pages).view(-1, kvh, hd)[: p.ctx_len]
            ks = kc.transpose(0, 1).unsqueeze(0)
            vs = vc.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=p.mask, scale=scale, enable_gqa=gqa
            )
        out[p.q_start : p.q_start + p.q_len] = o[0].transpose(0, 1).reshape(p.q_len, H * hd)
    bs = kv_cache.shape[2]
    g = H // kvh
    for d in meta.decode:
        n, nb = d.pages.shape
        L = nb * bs
        kc = gather_pages(kv_cache, 0, d.pages.view(-1)).view(n, L, kvh, hd)
        vc = gather_pages(kv_cache, 1, d.pages.view(-1)).view(n, L, kvh, hd)
        if d.pad_idx is not None:
            # padding may hold anything (even NaN): NaN + (-inf) mask and 0-weight * NaN would
            # both poison the result, so padded K and V rows are zeroed (cost ~ padding only)
            kc.view(n * L, kvh * hd).index_fill_(0, d.pad_idx, 0.0)
            vc.view(n * L, kvh * hd).index_fill_(0, d.pad_idx, 0.0)
        qd = q[d.span[0] : d.span[1]] if d.span is not None else q.index_select(0, d.rows)
        # one query per sequence: the g query heads sharing a KV head act as g query positions
        o = F.scaled_dot_product_attention(
            qd.view(n, kvh, g, hd),
            kc.permute(0, 2, 1, 3),
            vc.permute(0, 2, 1, 3),
            attn_mask=d.mask,
            scale=scale,
        )
        o = o.reshape(n, H * hd)
        if d.span is not None:
            out[d.span[0] : d.span[1]] = o
        else:
            out.index_copy_(0, d.rows, o)
    return out


# ---------------------------------------------------------------------------------------------
# LoRA (torch path): y[t] += scale[s] * (x[t] @ A^T) @ B^T for the token's slot s, true ranks
#
# Per step (prepare_lora): tokens are sorted by slot into groups (one per adapter in the batch)
# and, per module, the rows of every adapter that has it are planned: in place (a view of the
# pool, no copy) when all its rows are back to back -- which happens when the row length
# divides the page size and the adapter's pages are consecutive -- else gathered, all groups'
# rows of a module in ONE index_select (a copy that stays in cache). Measured on CPU: matmuls
# over several short runs of rows cost more (calls, and passes over y) than that copy.
# Per call (lora_shrink_expand): one gather of x in group order (shared by the modules of the
# call site), per module one gather of A rows and one of B^T rows, two matmuls per group with
# the group's true rank, one index_add into y. A batch whose LoRA tokens are one contiguous
# span of one adapter (a prefill chunk) adds straight into y[span].

USE_POOL_VIEWS = True


@dataclass
class _GroupModule:
    """One group's use of one module: rank and where its A / B^T rows come from."""

    rank: int
    a_view: int | None  # start offset of r back-to-back A rows in the pool slice (None: gathered)
    b_view: int | None
    a_off: int  # first row in the module's gathered A rows (when a_view is None)
    b_off: int


@dataclass
class _ModuleBatch:
    d_in: int
    d_out: int
    a_rows: torch.Tensor | None  # row offsets gathered in one go (None: nothing to gather)
    b_rows: torch.Tensor | None
    uses: dict[int, _GroupModule]  # group index -> use


@dataclass
class _LoraGroup:
    slot: int
    scale: float
    start: int  # rows [start, end) of the group in the sorted token order
    end: int


@dataclass
class LoraBatchInfo:
    """Tokens grouped by adapter slot, each adapter's rows planned once per step."""

    groups: list[_LoraGroup]
    order: torch.Tensor | None  # token rows in group order (None when `span` is set)
    span: tuple[int, int] | None  # all LoRA tokens are rows [a, b) of one adapter
    modules: dict[int, _ModuleBatch]
    tables: LoraTables
    num_tokens: int = 0  # LoRA tokens (rows of `order`)

    @property
    def touched(self) -> frozenset[int]:
        return frozenset(self.modules)


def prepare_lora(
    lora_slots: torch.Tensor,
    tables: LoraTables | None,
    spec: ModelSpec,
    device: torch.device | None = None,
) -> LoraBatchInfo | None:
    """Group tokens by slot and plan each used adapter's rows. None = no LoRA in this batch.
    `device`: where the activations live (default: the tables' device)."""
    if tables is None or lora_slots.numel() == 0:
        return None
    slots_cpu = lora_slots.to("cpu", torch.int64)
    if int(slots_cpu.max()) < 0:
        return None
    sorted_slots, order = torch.sort(slots_cpu, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    uniq_l = uniq.tolist()
    counts_l = counts.tolist()
    skip = counts_l[0] if uniq_l[0] < 0 else 0  # tokens without adapter sort first
    used = [s for s in uniq_l if s >= 0]
    if used[-1] >= tables.num_slots:
        raise ValueError(
            f"lora slot {used[-1]} out of range (tables have {tables.num_slots} slots)"
        )
    dev = torch.device(device) if device is not None else tables.a_ptr.device
    idx_used = torch.tensor(used, dtype=torch.int64, device=tables.ranks.device)
    ranks = tables.ranks[idx_used].to("cpu").tolist()
    scales = tables.scales[idx_used].to("cpu").tolist()
    a_ptr = tables.a_ptr[idx_used].to("cpu")
    b_ptr = tables.b_ptr[idx_used].to("cpu")
    dims = [spec.module_dims(m) for m in MODULE_ORDER]
    # all rows of a module back to back <=> ptr[j] == ptr[0] + j * row_length for j < rank
    R = a_ptr.shape[2]
    steps = torch.arange(R, dtype=torch.int64)
    d_in = torch.tensor([d[0] for d in dims], dtype=torch.int64)
    d_out = torch.tensor([d[1] for d in dims], dtype=torch.int64)
    rank_t = torch.tensor(ranks, dtype=torch.int64).view(len(used), -1, 1)
    beyond = steps[None, None, :] >= rank_t

    def contiguous(ptr: torch.Tensor, length: torch.Tensor) -> list[list[bool]]:
        expect = ptr[:, :, :1] + steps[None, None, :] * length[None, :, None]
        return ((ptr == expect) | beyond).all(-1).tolist()

    a_contig = contiguous(a_ptr, d_in)
    b_contig = contiguous(b_ptr, d_out)

    groups: list[_LoraGroup] = []
    pos = 0
    for s, c in zip(uniq_l, counts_l):
        if s >= 0:
            groups.append(_LoraGroup(s, float(scales[len(groups)]), pos - skip, pos - skip + c))
        pos += c
    n_lora = pos - skip
    rows = order[skip:]
    span = None
    if len(groups) == 1:
        r0, r1 = int(rows[0]), int(rows[-1])
        if r1 - r0 + 1 == n_lora:
            span = (r0, r1 + 1)

    modules: dict[int, _ModuleBatch] = {}
    for mi in range(len(MODULE_ORDER)):
        din, dout = dims[mi]
        uses: dict[int, _GroupModule] = {}
        a_gather: list[torch.Tensor] = []
        b_gather: list[torch.Tensor] = []
        na = nb = 0
        for gi in range(len(groups)):
            r = ranks[gi][mi]
            if r <= 0:
                continue
            use = _GroupModule(r, None, None, na, nb)
            if USE_POOL_VIEWS and a_contig[gi][mi]:
                use.a_view = int(a_ptr[gi, mi, 0])
            else:
                a_gather.append(a_ptr[gi, mi, :r])
                na += r
            if USE_POOL_VIEWS and b_contig[gi][mi]:
                use.b_view = int(b_ptr[gi, mi, 0])
            else:
                b_gather.append(b_ptr[gi, mi, :r])
                nb += r
            uses[gi] = use
        if uses:
            modules[mi] = _ModuleBatch(
                din,
                dout,
                torch.cat(a_gather).to(dev) if a_gather else None,
                torch.cat(b_gather).to(dev) if b_gather else None,
                uses,
            )
    if not modules:
        return None
    return LoraBatchInfo(
        groups=groups,
        order=None if span is not None else rows.to(dev),
        span=span,
        modules=modules,
        tables=tables,
        num_tokens=n_lora,
    )


def _gather_rows(flat: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
    """Rows [r, length] starting at element offsets `rows` of `flat` (one copy, no index tensor)."""
    return flat.unfold(0, length, 1).index_select(0, rows)


def lora_shrink_expand(
    x: torch.Tensor,
    ys: tuple[torch.Tensor, ...],
    layer_flat: torch.Tensor,
    info: LoraBatchInfo,
    module_ids: tuple[int, ...],
) -> None:
    """For each module in module_ids (sharing the input x [T, in]) add the LoRA delta into the
    matching y [T, out_m] (views into the fused projection output are fine).

    layer_flat = storage[l].view(-1); rows are read where they live in the pool (views when a
    module's rows are back to back, else one gather per module), with each adapter's true rank.
    """
    mods = [(info.modules[mi], y) for mi, y in zip(module_ids, ys) if mi in info.modules]
    if not mods:
        return
    if info.span is not None:
        xs = x[info.span[0] : info.span[1]]
    else:
        xs = x.index_select(0, info.order)
    groups = info.groups
    for mb, y in mods:
        d_in, d_out = mb.d_in, mb.d_out
        a_all = None if mb.a_rows is None else _gather_rows(layer_flat, mb.a_rows, d_in)
        b_all = None if mb.b_rows is None else _gather_rows(layer_flat, mb.b_rows, d_out)
        if info.span is not None:
            target = y[info.span[0] : info.span[1]]
            delta = None
        else:
            target = None
            delta = xs.new_empty(info.num_tokens, d_out)
        for gi, g in enumerate(groups):
            use = mb.uses.get(gi)
            if use is None:
                if delta is not None:
                    delta[g.start : g.end].zero_()
                continue
            r = use.rank
            if use.a_view is not None:
                a = layer_flat[use.a_view : use.a_view + r * d_in].view(r, d_in)
            else:
                a = a_all[use.a_off : use.a_off + r]
            if use.b_view is not None:
                bt = layer_flat[use.b_view : use.b_view + r * d_out].view(r, d_out)
            else:
                bt = b_all[use.b_off : use.b_off + r]
            xg = xs[g.start : g.end]
            xa = torch.mm(xg, a.t())  # shrink [n, r]
            if target is not None:
                target.addmm_(xa, bt, alpha=g.scale)  # expand, added in place
            else:
                delta[g.start : g.end].addmm_(xa, bt, beta=0, alpha=g.scale)
        if delta is not None:
            y.index_add_(0, info.order, delta)


# ---------------------------------------------------------------------------------------------
# one step's plan


@dataclass
class TorchStep:
    """One step's plan for the torch path, shared by all layers (the roles of
    kernel_ops.KernelStep: write_kv, attention, lora)."""

    meta: AttentionMeta
    lora_info: LoraBatchInfo | None
    slot_mapping: torch.Tensor

    @classmethod
    def prepare(cls, batch, tables: LoraTables | None, spec: ModelSpec, block_size: int,
                device: torch.device, dtype: torch.dtype) -> TorchStep:
        info = prepare_lora(batch.lora_slots, tables, spec, device) if tables is not None else None
        return cls(prepare_attention(batch, block_size, device, dtype), info,
                   batch.slot_mapping.to(device))

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        write_kv(kv_cache, k, v, self.slot_mapping)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  kv_cache: torch.Tensor, scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, kv_cache, self.meta, scale)

    def lora(self, x: torch.Tensor, y: torch.Tensor, flat: torch.Tensor,
             modules: tuple[int, ...], columns: tuple[tuple[int, int], ...]) -> None:
        """y[:, off:off+dim] += LoRA delta of module m, for each m, (off, dim) in columns."""
        if self.lora_info is not None:
            ys = tuple(y[:, off : off + dim] for off, dim in columns)
            lora_shrink_expand(x, ys, flat, self.lora_info, modules)
