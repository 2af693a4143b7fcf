"""The pool tier's side-stream copy on a real GPU (the GPU machine; skipped elsewhere).

The copy of an adapter into pool pages runs on its own CUDA stream, after everything launched
on the model's stream so far (a step in flight may still read pages freed since its launch);
the adapter turns ready only once the copy's event has completed; its values are checked on
the device, and a NaN refuses it with its pages zeroed. Through the engine: a request whose
adapter is cold gets exactly the tokens it gets with the adapter resident."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from pool_helpers import assert_rows_equal, poisoned_copy
from test_engine import GREEDY, make_engine, tokens_of

from slora_backend import SamplingParams
from slora_backend.adapters import AdapterSource, HostCache
from slora_backend.adapters.adapter_manager import AdapterManager, Wait
from slora_backend.adapters.validation import tensor_key
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.memory_pool import PagePool, PoolStorage
from slora_backend.model.spec import ModelSpec
from slora_testing.step_timing import host_ms_while_busy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BLOCK = 16
NUM_PAGES = 256
HOST_BYTES = 64 << 20
WAIT_S = 60.0
SLEEP_CYCLES = 200_000_000  # ~0.1 s of one SM spinning: the model stream is busy meanwhile


def build(model_dir: Path, adapter_dir: Path) -> AdapterManager:
    spec = ModelSpec.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    storage = PoolStorage(spec.num_layers, NUM_PAGES, BLOCK, spec.num_kv_heads, spec.head_dim,
                          torch.float16, "cuda")
    cache = HostCache(AdapterSource(adapter_dir, spec, 64, torch.float16), HOST_BYTES,
                      device="cuda")
    return AdapterManager(spec, storage, PagePool(NUM_PAGES), cache, 4, 64)


def blocking_ops(buffer: torch.Tensor) -> dict[str, float]:
    """Host ms of each op a copy's start could block on, each timed on a side stream while the
    model stream sleeps ~0.1 s (a failure message: which one waits for the device)."""
    return host_ms_while_busy({
        "pinned alloc (new size)": lambda: torch.empty(3 << 20, dtype=torch.uint8,
                                                       pin_memory=True),
        "arena range -> device, non_blocking": lambda: buffer.to("cuda", non_blocking=True),
        "pageable 8 B -> device, non_blocking": lambda: torch.zeros(2).to("cuda",
                                                                        non_blocking=True),
        "event record": lambda: torch.cuda.Event().record(),
    }, SLEEP_CYCLES, side_stream=True)


def until_ready(mgr: AdapterManager, name: str) -> int:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = mgr.acquire(name)
        if not isinstance(got, Wait):
            return got
        time.sleep(0.001)
    raise AssertionError(f"{name} never turned ready")


def test_copy_waits_for_the_model_stream_and_lands(tiny_model_dir: Path,
                                                   tiny_adapter_dir: Path) -> None:
    mgr = build(tiny_model_dir, tiny_adapter_dir)
    name = "a_r32_attn"
    try:
        # the process's first copy: a kernel's first launch loads it, which may wait for the
        # device (on an H200 this copy blocked the host for the whole 167-ms busy stream);
        # PoolCopier launches each of its kernels once at start, so this one must not block
        mgr.host.wait(name, timeout=WAIT_S)
        free = torch.tensor([p for p in range(NUM_PAGES) if mgr.pool.kind_of(p) is None],
                            device="cuda")  # before the sleep: a pageable copy waits for it
        # "the step in flight": busy, then it writes every free page, among them those the
        # adapter will get; the copy must land after it, not under it (index_fill_ takes the
        # value as a scalar argument; with `tensor[:, free] = 7.0` an H100 found the copy
        # already done at acquire, 2 ms later: the stream had been waited for)
        torch.cuda._sleep(SLEEP_CYCLES)
        mgr.storage.tensor.index_fill_(1, free, 7.0)
        t0 = time.perf_counter()
        got = mgr.acquire(name)
        host_s = time.perf_counter() - t0
        # the copy waits behind the busy stream, and the host does not
        assert got is Wait.LOADING, (
            f"acquire blocked the host {host_s * 1e3:.1f} ms; with the model stream busy, "
            f"ms per op: {blocking_ops(mgr.host.get(name).buffer)}")
        slot = until_ready(mgr, name)
        torch.cuda.synchronize()
        assert_rows_equal(mgr, slot, tiny_adapter_dir, name,
                          ("q_proj", "k_proj", "v_proj", "o_proj"), 32)
    finally:
        mgr.host.close()


def test_copies_reuse_one_staging_buffer(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    # a copy allocates nothing as large as the adapter once the staging buffer has grown to it:
    # per-copy device tensors sent the caching allocator looking for new segments
    mgr = build(tiny_model_dir, tiny_adapter_dir)
    # the largest first; each >= 28 KB: a copy's own 0-d tensors (min, max, the flag: 512-B
    # blocks, ~3.5 KB in all) are as large as a 3.5-KB adapter (a_r4_qv), so it is left out
    names = ["a_r64_ko_down", "a_r32_attn", "a_r8_all", "a_r16_rslora"]
    try:
        for name in names:
            mgr.host.wait(name, timeout=WAIT_S)
        until_ready(mgr, names[0])
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        slots = [until_ready(mgr, name) for name in names[1:]]
        torch.cuda.synchronize()
        smallest = min(mgr.host.get(n).buffer.nbytes for n in names[1:])
        assert torch.cuda.max_memory_allocated() - before < smallest
        for name, slot in zip(names[1:], slots):
            host = mgr.host.get(name)
            assert_rows_equal(mgr, slot, tiny_adapter_dir, name, host.modules, host.rank)
    finally:
        mgr.host.close()


def test_loads_flips_and_evictions_never_wait_for_the_device(tiny_model_dir: Path,
                                                             tiny_adapter_dir: Path) -> None:
    # the engine loop runs these between two launches: a host wait for the device there idles
    # the GPU for the rest of the loop's work. clear_slot's `scales[slot] = 0.0` was one (a CPU
    # scalar copied to the GPU synchronously) at every eviction: the likely cause of ~5.7 ms of
    # idle per loading step at 1,000 adapters on an H100. torch raises on any synchronizing
    # call here.
    mgr = build(tiny_model_dir, tiny_adapter_dir)  # 4 slots: the fifth adapter evicts one
    names = ["a_r4_qv", "a_r8_all", "a_r16_mlp", "a_r32_attn", "a_r64_ko_down"]
    try:
        for name in names:
            mgr.host.wait(name, timeout=WAIT_S)
        slots = {}
        torch.cuda.set_sync_debug_mode("error")
        try:
            for name in names:
                slots[name] = until_ready(mgr, name)
                mgr.release(name)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert mgr.num_evictions == 1 and mgr.resident() == names[1:]
        torch.cuda.synchronize()
        for name in names[1:]:
            host = mgr.host.get(name)
            assert_rows_equal(mgr, slots[name], tiny_adapter_dir, name, host.modules, host.rank)
    finally:
        mgr.host.close()


def test_non_finite_adapter_refused_on_the_gpu(tiny_model_dir: Path, tiny_adapter_dir: Path,
                                               tmp_path: Path) -> None:
    key = tensor_key(1, "v_proj", "B")
    adapters = poisoned_copy(tiny_adapter_dir, tmp_path, "a_r4_qv", key, math.nan)
    mgr = build(tiny_model_dir, adapters)
    try:
        mgr.host.wait("bad", timeout=WAIT_S)
        with pytest.raises(EngineError) as info:
            until_ready(mgr, "bad")
        assert info.value.code is ErrorCode.INVALID_ARG and f"'{key}'" in info.value.message
        torch.cuda.synchronize()
        assert torch.isfinite(mgr.storage.tensor).all()  # its pages were zeroed
        assert mgr.pool.used_by("lora") == 0 and mgr.stats()["pool_loading"] == 0
    finally:
        mgr.host.close()


def one_by_one(engine, requests: list[tuple]) -> dict[str, list[int]]:  # noqa: ANN001
    """Each request alone (a batch of one: the same kernels whatever the adapter's tier)."""
    tokens = {}
    for rid, prompt, adapter in requests:
        engine.add_request(rid, prompt_token_ids=prompt, adapter_id=adapter,
                           params=SamplingParams(max_tokens=12, **GREEDY))
        outs = []
        deadline = time.monotonic() + WAIT_S
        while engine.has_unfinished() and time.monotonic() < deadline:
            outs += [o for o in engine.step() if o.request_id == rid]
        assert outs and outs[-1].finished and outs[-1].error is None
        tokens[rid] = tokens_of(outs)
    return tokens


def test_cold_adapter_gives_the_resident_tokens(tiny_model_dir: Path,
                                                tiny_adapter_dir: Path) -> None:
    engine = make_engine(tiny_model_dir, tiny_adapter_dir, device="cuda", dtype="float16",
                         pool_bytes=None, pool_fraction=0.05, cuda_graph_max_batch=16)
    names = ["a_r4_qv", "a_r8_all", "a_r16_mlp", "a_r32_attn", "a_r64_ko_down"]
    try:
        cold = one_by_one(engine, [(f"c{i}", [100 + 7 * i + j for j in range(9)], name)
                                   for i, name in enumerate(names)])
        assert engine.stats().adapter_cache["pool_loads"] == len(names)
        warm = one_by_one(engine, [(f"w{i}", [100 + 7 * i + j for j in range(9)], name)
                                   for i, name in enumerate(names)])
        assert engine.stats().adapter_cache["pool_loads"] == len(names)  # all resident now
        assert [cold[f"c{i}"] for i in range(len(names))] == \
            [warm[f"w{i}"] for i in range(len(names))]
        assert engine.stats().pool_pages_kv == 0
    finally:
        engine.close()
