"""The pool tier's asynchronous copy on the CPU: the loading -> ready state machine and the
finite check after the copy.

On a GPU the copy runs on a side stream and an adapter stays *loading* until the copy's event
has completed; on the CPU the copy is done at once, so the same transitions run within one
call. `HeldCopier` is the real CPU copier whose copies report themselves in flight until the
test opens their gate (what the event does on a GPU), so that every state is observable."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from pool_helpers import assert_rows_equal, poisoned_copy
from test_scheduler import BLOCK, make_seq, run_all, step

from slora_backend.adapters import AdapterSource, HostCache
from slora_backend.adapters.adapter_manager import AdapterManager, Wait
from slora_backend.adapters.pool_copy import PoolCopier, PoolCopy
from slora_backend.adapters.source import HostAdapter
from slora_backend.adapters.validation import tensor_key
from slora_backend.adapters.values import all_finite, finite_flag
from slora_backend.engine.kv_manager import KVManager
from slora_backend.engine.scheduler import Scheduler, SchedulerOutput
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.memory_pool import PagePool, PoolStorage
from slora_backend.model.spec import ModelSpec

HOST_BYTES = 64 << 20
WAIT_S = 60.0


class Gate:
    """Stands for a CUDA event: `query()` is True once opened."""

    def __init__(self) -> None:
        self.open = False

    def query(self) -> bool:
        return self.open


class HeldCopier(PoolCopier):
    """The CPU copier; each copy reports itself in flight until its gate opens."""

    def __init__(self, storage: torch.Tensor, spec: ModelSpec, max_slots: int) -> None:
        super().__init__(storage, spec, max_slots)
        self.gates: dict[str, Gate] = {}

    def start(self, host, pages, plan, slot) -> PoolCopy:  # noqa: ANN001 (the parent's types)
        copy = super().start(host, pages, plan, slot)
        gate = self.gates.setdefault(host.adapter_id, Gate())
        return PoolCopy(copy.host, copy.pointers, gate, copy.finite())


def build(model_dir: Path, adapter_dir: Path, num_pages: int = 64, slots: int = 4,
          dtype: torch.dtype = torch.float32, host_pool: bool = False) -> AdapterManager:
    spec = ModelSpec.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    storage = PoolStorage(spec.num_layers, num_pages, BLOCK, spec.num_kv_heads, spec.head_dim,
                          dtype, "cpu")
    cache = HostCache(AdapterSource(adapter_dir, spec, 64, dtype, host_pool), HOST_BYTES)
    mgr = AdapterManager(spec, storage, PagePool(num_pages), cache, slots, 64)
    mgr.copier = HeldCopier(storage.tensor, spec, slots)
    return mgr


def test_an_adapter_is_loading_until_its_copy_completes(tiny_model_dir: Path,
                                                        tiny_adapter_dir: Path) -> None:
    mgr = build(tiny_model_dir, tiny_adapter_dir)
    try:
        mgr.host.wait("a_r8_all", timeout=WAIT_S)
        assert mgr.acquire("a_r8_all") is Wait.LOADING  # copy started: pages and a slot taken
        lora_pages = mgr.pool.used_by("lora")
        assert lora_pages > 0 and mgr.stats()["pool_loading"] == 1
        assert not any(mgr.tables.targets)  # its slot tables are written only at the flip
        assert mgr.acquire("a_r8_all") is Wait.LOADING and mgr.stats()["pool_loads"] == 1
        assert mgr.evict_idle(10_000) == 0  # never evicted while its copy writes its pages
        mgr.copier.gates["a_r8_all"].open = True
        mgr.poll()  # the loop flips it: tables written, no reference taken
        assert mgr.stats()["pool_loading"] == 0
        slot = mgr.acquire("a_r8_all")
        assert isinstance(slot, int) and mgr.tables.ranks[slot].tolist() == [8] * 7
        assert mgr.stats()["pool_loads"] == 1 and mgr.pool.used_by("lora") == lora_pages
    finally:
        mgr.host.close()


def test_a_loaded_adapter_nobody_claims_becomes_evictable(tiny_model_dir: Path,
                                                          tiny_adapter_dir: Path) -> None:
    # its request was cancelled while the copy ran: poll() flips it all the same
    mgr = build(tiny_model_dir, tiny_adapter_dir)
    try:
        mgr.host.wait("a_r4_qv", timeout=WAIT_S)
        assert mgr.acquire("a_r4_qv") is Wait.LOADING
        pages = mgr.pool.used_by("lora")
        mgr.copier.gates["a_r4_qv"].open = True
        mgr.poll()
        assert mgr.evict_idle(1) == pages and mgr.resident() == []
    finally:
        mgr.host.close()


def prepared(mgr: AdapterManager, name: str) -> HostAdapter:
    """`name` loaded, and the host pool's loader done with it (prepare_for_host_pool runs in
    the loader thread after the load is visible)."""
    host = mgr.host.wait(name, timeout=WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while host.finite is None:
        assert time.monotonic() < deadline, "the loader never checked the values"
        time.sleep(0.01)
    with host.lock:  # `finite` is set as the pass takes the lock: wait for the pass to end
        return host


def test_copies_racing_the_host_pools_loader_land_exact_rows(tiny_model_dir: Path,
                                                             tiny_adapter_dir: Path) -> None:
    """Each adapter copied the moment its load is visible, before, during or after the
    loader's pass (prepare_for_host_pool): the rows equal the file whatever the order."""
    names = sorted(p.name for p in tiny_adapter_dir.iterdir())
    for _ in range(3):
        mgr = build(tiny_model_dir, tiny_adapter_dir, num_pages=512, slots=len(names),
                    host_pool=True)
        mgr.copier = PoolCopier(mgr.storage.tensor, mgr.spec, mgr.tables.num_slots)
        try:
            for name in names:
                mgr.host.prefetch(name)
            for name in names:
                host = mgr.host.wait(name, timeout=WAIT_S)
                slot = mgr.acquire(name)
                assert isinstance(slot, int), slot
                assert_rows_equal(mgr, slot, tiny_adapter_dir, name, host.modules, host.rank)
        finally:
            mgr.host.close()


@pytest.mark.parametrize(("key", "value"), [
    (tensor_key(1, "q_proj", "A"), math.nan),
    (tensor_key(0, "v_proj", "B"), -math.inf),
])
def test_a_host_pools_loader_finds_non_finite_values(tiny_model_dir: Path,
                                                     tiny_adapter_dir: Path, tmp_path: Path,
                                                     key: str, value: float) -> None:
    """Where the pool is in host memory, the loader thread checks the values (off the loop)
    and leaves B as read; the pool copy then refuses the adapter with the same INVALID_ARG."""
    adapters = poisoned_copy(tiny_adapter_dir, tmp_path, "a_r4_qv", key, value)
    mgr = build(tiny_model_dir, adapters, host_pool=True)
    mgr.copier = PoolCopier(mgr.storage.tensor, mgr.spec, mgr.tables.num_slots)
    try:
        host = prepared(mgr, "bad")
        assert host.finite is False
        assert all(b.is_contiguous() for _, b in host.factors.values())  # not laid out
        with pytest.raises(EngineError) as info:
            mgr.acquire("bad")
        assert info.value.code is ErrorCode.INVALID_ARG
        assert f"'{key}' has non-finite values (NaN/Inf) in torch.float32" in info.value.message
        assert mgr.pool.used_by("lora") == 0 and "bad" not in mgr.host.resident()
        assert prepared(mgr, "a_r4_qv").finite is True
    finally:
        mgr.host.close()


@pytest.mark.parametrize(("key", "value"), [
    (tensor_key(0, "q_proj", "A"), math.nan),
    (tensor_key(0, "v_proj", "B"), math.inf),
    (tensor_key(1, "v_proj", "B"), -math.inf),
])
@pytest.mark.parametrize("held", [False, True], ids=["at-once", "after-the-flip"])
def test_non_finite_values_are_refused_after_the_copy(tiny_model_dir: Path,
                                                      tiny_adapter_dir: Path, tmp_path: Path,
                                                      key: str, value: float,
                                                      held: bool) -> None:
    adapters = poisoned_copy(tiny_adapter_dir, tmp_path, "a_r4_qv", key, value)
    mgr = build(tiny_model_dir, adapters)
    if not held:
        mgr.copier = PoolCopier(mgr.storage.tensor, mgr.spec, mgr.tables.num_slots)
    try:
        mgr.host.wait("bad", timeout=WAIT_S)  # the host tier reads it: values are not its job
        if held:
            assert mgr.acquire("bad") is Wait.LOADING
            mgr.copier.gates["bad"].open = True
            mgr.poll()  # refused at the flip: remembered for the requests that wait for it
        for _ in range(2):  # refused, then remembered: no reload for the second request
            with pytest.raises(EngineError) as info:
                mgr.acquire("bad")
            assert info.value.code is ErrorCode.INVALID_ARG
            assert "'bad'" in info.value.message and f"'{key}'" in info.value.message
        stats = mgr.stats()
        assert stats["loads"] == 1 and "bad" not in mgr.host.resident()
        assert mgr.pool.used_by("lora") == 0 and mgr.resident() == []
        assert torch.isfinite(mgr.storage.tensor).all()  # its pages were zeroed or never written
        assert isinstance(mgr.acquire("a_r4_qv"), Wait)  # the pool still serves the others
    finally:
        mgr.host.close()


def test_fp16_overflow_is_refused(tiny_model_dir: Path, tiny_adapter_dir: Path,
                                  tmp_path: Path) -> None:
    # finite in the fp32 file, +inf once converted to the fp16 model dtype
    key = tensor_key(0, "q_proj", "A")
    adapters = poisoned_copy(tiny_adapter_dir, tmp_path, "a_r4_qv", key, 1e6, "overflow")
    mgr = build(tiny_model_dir, adapters, dtype=torch.float16)
    mgr.copier = PoolCopier(mgr.storage.tensor, mgr.spec, mgr.tables.num_slots)
    try:
        mgr.host.wait("overflow", timeout=WAIT_S)
        with pytest.raises(EngineError, match=f"'{key}' has non-finite values .* torch.float16"):
            mgr.acquire("overflow")
    finally:
        mgr.host.close()


def test_huge_finite_values_are_accepted() -> None:
    # the fast check (a sum) overflows; min and max then find every value finite
    buffer = torch.zeros(1000)
    buffer[:4] = 3e38
    assert all_finite(buffer)
    buffer[7] = math.nan
    assert not all_finite(buffer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
def test_finite_flag_finds_any_non_finite_value(dtype: torch.dtype,
                                                     bad: float | None) -> None:
    # the GPU copy's check (run here on the CPU): min and max, which NaN and +-Inf reach
    buffer = torch.full((4099,), torch.finfo(dtype).max, dtype=dtype)
    buffer[::3] = torch.finfo(dtype).min  # a sum of these overflows: they are still finite
    if bad is not None:
        buffer[2051] = bad
    assert bool(finite_flag(buffer)) is (bad is None)


def _seq(rid: str, adapter: str | None):  # noqa: ANN202 (a Sequence)
    seq = make_seq(rid, prompt_len=6, max_tokens=3)
    seq.adapter_id = adapter
    return seq


def _admitted(out: SchedulerOutput) -> list[str]:
    return [s.request_id for s in out.scheduled if s.start == 0]


def test_admission_fills_the_batch_while_a_pool_copy_runs(tiny_model_dir: Path,
                                                         tiny_adapter_dir: Path) -> None:
    mgr = build(tiny_model_dir, tiny_adapter_dir, num_pages=256)
    sched = Scheduler(mgr.pool, KVManager(mgr.pool, BLOCK), mgr, max_num_seqs=8,
                      max_num_batched_tokens=64, max_waiting=100)
    try:
        for name in ("a_r8_all", "a_r4_qv"):
            mgr.host.wait(name, timeout=WAIT_S)
        mgr.copier.gates["a_r4_qv"] = Gate()
        mgr.copier.gates["a_r4_qv"].open = True  # this one copies at once
        for rid, adapter in (("c0", "a_r8_all"), ("b1", None), ("w2", "a_r4_qv")):
            sched.add(_seq(rid, adapter))
        out, _ = step(sched)
        assert _admitted(out) == ["b1", "w2"] and [s.request_id for s in sched.waiting] == ["c0"]
        sched.add(_seq("b3", None))  # arrives after c0
        mgr.copier.gates["a_r8_all"].open = True
        out, _ = step(sched)
        assert _admitted(out) == ["c0", "b3"]  # flipped at the step's start, admitted first
        assert {s.request_id for s in run_all(sched)} == {"c0", "b1", "w2", "b3"}
        assert mgr.pool.used_by("kv") == 0 and mgr.stats()["pool_loading"] == 0
    finally:
        mgr.host.close()


@pytest.mark.parametrize("host_pool", [False, True], ids=["as-read", "host-pool-layout"])
def test_copied_rows_equal_the_adapter(tiny_model_dir: Path, tiny_adapter_dir: Path,
                                       host_pool: bool) -> None:
    """Also when a host pool's loader laid B out as the pool's B^T rows (a CPU engine)."""
    mgr = build(tiny_model_dir, tiny_adapter_dir, num_pages=256, host_pool=host_pool)
    mgr.copier = PoolCopier(mgr.storage.tensor, mgr.spec, mgr.tables.num_slots)
    try:
        name = "a_r64_ko_down"
        host = prepared(mgr, name) if host_pool else mgr.host.wait(name, timeout=WAIT_S)
        assert host.finite is (True if host_pool else None)
        assert all(b.transpose(1, 2).is_contiguous() is host_pool and
                   b.is_contiguous() is not host_pool for _, b in host.factors.values())
        slot = mgr.acquire(name)
        assert isinstance(slot, int)
        assert_rows_equal(mgr, slot, tiny_adapter_dir, name, ("k_proj", "o_proj", "down_proj"),
                          64)
    finally:
        mgr.host.close()
