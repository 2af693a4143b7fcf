"""Llama forward over a BatchInput: paged KV in the unified pool, LoRA per token.

The weight matmuls are single batched matmuls over all T tokens of the step (q/k/v fused into
one, gate/up fused into one). Everything else goes through a per-step plan of one of two
backends, whose roles every layer calls: the residual add with the RMSNorm (`add_norm`), RoPE
with the KV write and attention (`rope_attention`), LoRA (`lora`) and SwiGLU's activation
(`act`). "torch" (TorchStep: torch ops, the CPU path) or "triton" (kernel_ops.KernelStep: the
Triton-lang kernels of kernels/, the CUDA path for fp16/bf16, one launch per role).

A layer is two blocks, `attention_block` and `mlp_block`, between two `add_norm`s: the residual
stream is carried beside the blocks' outputs (x + residual is added by the next norm), so the
triton backend fuses each add into its norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .batch import BatchInput
from .layers import kv_cache_view, rope_cos_sin, rope_inv_freq
from .lora import LoraTables
from .spec import MODULE_INDEX, ModelSpec
from .torch_step import TorchStep

if TYPE_CHECKING:  # kernel_ops imports triton: only loaded for the triton backend
    from .kernel_ops import KernelStep

TORCH_BACKEND = "torch"
TRITON_BACKEND = "triton"
BACKENDS = (TORCH_BACKEND, TRITON_BACKEND)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# LoRA call sites: modules sharing one input (fused into one kernel launch)
QKV_MODULES = (MODULE_INDEX["q_proj"], MODULE_INDEX["k_proj"], MODULE_INDEX["v_proj"])
O_MODULES = (MODULE_INDEX["o_proj"],)
GATE_UP_MODULES = (MODULE_INDEX["gate_proj"], MODULE_INDEX["up_proj"])
DOWN_MODULES = (MODULE_INDEX["down_proj"],)
RANDOM_INIT_STD = 0.02  # HF's initializer_range for Llama


def default_backend(device: torch.device, dtype: torch.dtype) -> str:
    """triton for fp16/bf16 on CUDA; torch elsewhere (CPU, and fp32 where exactness rules)."""
    return TRITON_BACKEND if device.type == "cuda" and dtype in KERNEL_DTYPES else TORCH_BACKEND


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    w_qkv: torch.Tensor  # [q + 2 kv, H]
    w_o: torch.Tensor  # [H, q]
    mlp_norm: torch.Tensor  # [H]
    w_gate_up: torch.Tensor  # [2 I, H]
    w_down: torch.Tensor  # [H, I]


class LlamaModel:
    """Inference-only Llama. Build with `from_state_dict` (HF parameter names) or `load_model`."""

    def __init__(
        self,
        spec: ModelSpec,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
    ) -> None:
        self.spec = spec
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.dtype = embed.dtype
        self.device = embed.device
        self.inv_freq = rope_inv_freq(spec, self.device)
        self.scale = spec.head_dim**-0.5
        self.backend = default_backend(self.device, self.dtype)
        # tensor parallelism (slora_backend/parallel): sums the row-parallel partial outputs
        # (o, down: LoRA included) across ranks in place; None on one device
        self.all_reduce: Callable[[torch.Tensor], None] | None = None

    def set_backend(self, backend: str) -> None:
        """'torch', 'triton' or 'auto' (default_backend)."""
        if backend == "auto":
            backend = default_backend(self.device, self.dtype)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be auto or one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    @property
    def graphable(self) -> bool:
        """Whether decode steps can be captured in CUDA graphs (model/cuda_graphs.py): the
        triton backend's decode step neither syncs with the host nor allocates."""
        return self.device.type == "cuda" and self.backend == TRITON_BACKEND

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls,
        spec: ModelSpec,
        get: callable,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> LlamaModel:
        """`get(name)` returns the HF tensor `name` (e.g. 'model.layers.0.self_attn.q_proj.weight')
        or raises KeyError. Tensors are converted to dtype/device one layer at a time."""

        def t(name: str) -> torch.Tensor:
            return get(name).to(device=device, dtype=dtype)

        def need(name: str) -> torch.Tensor:
            try:
                return t(name)
            except KeyError:
                raise KeyError(f"checkpoint has no tensor {name!r}") from None

        embed = need("model.embed_tokens.weight").contiguous()
        if tuple(embed.shape) != (spec.vocab_size, spec.hidden_size):
            raise ValueError(
                f"embed_tokens shape {tuple(embed.shape)} != "
                f"({spec.vocab_size}, {spec.hidden_size})"
            )
        layers = []
        for i in range(spec.num_layers):
            pre = f"model.layers.{i}."
            q = need(pre + "self_attn.q_proj.weight")
            k = need(pre + "self_attn.k_proj.weight")
            v = need(pre + "self_attn.v_proj.weight")
            if q.shape != (spec.q_size, spec.hidden_size) or k.shape != (
                spec.kv_size,
                spec.hidden_size,
            ):
                raise ValueError(
                    f"layer {i}: q/k shapes {tuple(q.shape)}/{tuple(k.shape)} "
                    "do not match the config"
                )
            w_qkv = torch.cat([q, k, v], 0).contiguous()
            del q, k, v
            gate = need(pre + "mlp.gate_proj.weight")
            up = need(pre + "mlp.up_proj.weight")
            w_gu = torch.cat([gate, up], 0).contiguous()
            del gate, up
            layers.append(
                LayerWeights(
                    attn_norm=need(pre + "input_layernorm.weight").contiguous(),
                    w_qkv=w_qkv,
                    w_o=need(pre + "self_attn.o_proj.weight").contiguous(),
                    mlp_norm=need(pre + "post_attention_layernorm.weight").contiguous(),
                    w_gate_up=w_gu,
                    w_down=need(pre + "mlp.down_proj.weight").contiguous(),
                )
            )
        norm = need("model.norm.weight").contiguous()
        if spec.tie_word_embeddings:
            lm_head = embed
        else:
            try:
                lm_head = t("lm_head.weight").contiguous()
            except KeyError:
                lm_head = embed  # some checkpoints tie without saying so
        return cls(spec, embed, layers, norm, lm_head)

    @classmethod
    def random(cls, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str,
               seed: int = 0) -> LlamaModel:
        """Random weights (N(0, RANDOM_INIT_STD), norms 1) made directly on `device`: a
        Llama-7B shape in about a second on a GPU, for benchmarks at real scale."""
        gen = torch.Generator(device=device).manual_seed(seed)

        def w(*shape: int) -> torch.Tensor:
            t = torch.empty(shape, dtype=dtype, device=device)
            return t.normal_(0.0, RANDOM_INIT_STD, generator=gen)

        def ones() -> torch.Tensor:
            return torch.ones(spec.hidden_size, dtype=dtype, device=device)

        h, inter = spec.hidden_size, spec.intermediate_size
        layers = [LayerWeights(attn_norm=ones(), w_qkv=w(spec.q_size + 2 * spec.kv_size, h),
                               w_o=w(h, spec.q_size), mlp_norm=ones(),
                               w_gate_up=w(2 * inter, h), w_down=w(h, inter))
                  for _ in range(spec.num_layers)]
        embed = w(spec.vocab_size, h)
        lm_head = embed if spec.tie_word_embeddings else w(spec.vocab_size, h)
        return cls(spec, embed, layers, ones(), lm_head)

    # ---- pool helpers ----------------------------------------------------------------------
    def allocate_pool(self, num_pages: int, block_size: int) -> torch.Tensor:
        """A zeroed pool tensor [L, P, page_elems] in the model's dtype and device."""
        return torch.zeros(
            self.spec.num_layers,
            num_pages,
            self.spec.page_elems(block_size),
            dtype=self.dtype,
            device=self.device,
        )

    # ---- forward -------------------------------------------------------------------------
    def check_storage(self, storage: torch.Tensor) -> int:
        """Validate the pool tensor against the model; returns its block size (tokens/page)."""
        spec = self.spec
        L, _, pe = storage.shape
        if L != spec.num_layers:
            raise ValueError(f"storage has {L} layers, model has {spec.num_layers}")
        kv_elems = spec.page_elems(1)  # K and V of one token
        if pe % kv_elems:
            raise ValueError(
                f"page_elems {pe} is not a multiple of 2*num_kv_heads*head_dim = {kv_elems}"
            )
        if storage.dtype != self.dtype:
            raise ValueError(f"storage dtype {storage.dtype} != model dtype {self.dtype}")
        return pe // kv_elems

    def prepare_step(
        self, batch: BatchInput, storage: torch.Tensor, block_size: int,
        lora: LoraTables | None = None,
    ) -> TorchStep | KernelStep:
        """The per-step plan that every layer shares, for this model's backend."""
        if self.backend == TORCH_BACKEND:
            return TorchStep.prepare(batch, lora, self.spec, block_size, self.device,
                                         self.dtype)
        from .kernel_ops import KernelStep, rows_always_aligned

        aligned = rows_always_aligned(self.spec, storage.shape[2])
        return KernelStep.prepare(batch, lora, aligned, self.device)

    @torch.inference_mode()
    def forward(
        self,
        batch: BatchInput,
        storage: torch.Tensor,
        lora: LoraTables | None = None,
        step: TorchStep | KernelStep | None = None,
    ) -> torch.Tensor:
        """Logits (fp32) [len(logits_indices), vocab]; writes the new tokens' K/V into the pool.

        `step` (default: prepare_step(...)) is the per-step plan; a CUDA graph passes one built
        over its static buffers."""
        block_size = self.check_storage(storage)
        if step is None:
            step = self.prepare_step(batch, storage, block_size, lora)
        eps = self.spec.rms_norm_eps
        cos, sin = rope_cos_sin(batch.positions.to(self.device), self.inv_freq, self.dtype)
        x = F.embedding(batch.input_ids.to(self.device), self.embed)
        residual = None
        for li, w in enumerate(self.layers):
            h, residual = step.add_norm(x, residual, w.attn_norm, eps)
            o = self.attention_block(li, w, h, storage, block_size, step, cos, sin)
            h, residual = step.add_norm(o, residual, w.mlp_norm, eps)
            x = self.mlp_block(li, w, h, storage, step)
        idx = batch.logits_indices.to(self.device)
        hs, _ = step.add_norm(x.index_select(0, idx), residual.index_select(0, idx), self.norm,
                              eps)
        return F.linear(hs, self.lm_head).float()

    def attention_block(self, li: int, w: LayerWeights, h: torch.Tensor, storage: torch.Tensor,
                        block_size: int, step: TorchStep | KernelStep, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
        """Layer `li`'s attention on its normed input `h`: q,k,v (+ LoRA), RoPE, KV write,
        paged attention, o (+ LoRA). Returns o [T, hidden] (the residual is added later)."""
        spec = self.spec
        qs, kvs = spec.q_size, spec.kv_size
        flat = storage[li].view(-1)
        qkv = F.linear(h, w.w_qkv)
        step.lora(h, qkv, flat, QKV_MODULES, ((0, qs), (qs, kvs), (qs + kvs, kvs)))
        kv_cache = kv_cache_view(storage[li], block_size, spec.num_kv_heads, spec.head_dim)
        attn = step.rope_attention(qkv, spec.num_heads, spec.num_kv_heads, cos, sin, kv_cache,
                                   self.scale)
        o = F.linear(attn, w.w_o)
        step.lora(attn, o, flat, O_MODULES, ((0, spec.hidden_size),))
        if self.all_reduce is not None:  # row-parallel: sum the ranks' partial outputs
            self.all_reduce(o)
        return o

    def mlp_block(self, li: int, w: LayerWeights, h: torch.Tensor, storage: torch.Tensor,
                  step: TorchStep | KernelStep) -> torch.Tensor:
        """Layer `li`'s SwiGLU MLP on its normed input `h` (+ LoRA at gate,up and down):
        [T, hidden]."""
        inter = self.spec.intermediate_size
        flat = storage[li].view(-1)
        gu = F.linear(h, w.w_gate_up)
        step.lora(h, gu, flat, GATE_UP_MODULES, ((0, inter), (inter, inter)))
        a = step.act(gu)
        d = F.linear(a, w.w_down)
        step.lora(a, d, flat, DOWN_MODULES, ((0, self.spec.hidden_size),))
        if self.all_reduce is not None:  # row-parallel: sum the ranks' partial outputs
            self.all_reduce(d)
        return d

    __call__ = forward
