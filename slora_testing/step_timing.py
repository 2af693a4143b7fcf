"""Per-step timing of an engine by step kind, and the mixed-step bound (benchmarks).

`StepTimer` wraps `engine.runner.launch`: for every launched step it records its kind
("decode": every row a decode token; "mixed": prompt tokens too, with or without decode rows),
its decode rows and prompt tokens, the path it took (`ModelRunner.last_path`: decode graph,
mixed graph, eager) and its device time between two CUDA events recorded on the stream around
the launch. With async scheduling the first event fires when the previous step's work is done,
so the span is the step's own: its kernels and any gap the host leaves while launching them.

It also records, per step, the pool loads started since the previous launch (adapters copied
host -> pool while scheduling it) and, on CUDA, the device's idle time before the step: between
the previous step's end event and this one's start event, the time the GPU waited for the host
(`idle_by_pool_loads` splits it by steps that did or did not load an adapter; `idle_detail`
lists the longest idles with the flips and the host gap before them). `sync_sites` counts the
host's waits for the device by source line (torch's sync debug mode).

`mixed_bound` checks issue 19's bound: a mixed step should cost at most the decode-only step of
its batch (same run, median by batch size class) plus 1.5x the FLOP floor of its prompt tokens
(their weight matmuls at a measured matmul peak).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

DECODE = "decode"
MIXED = "mixed"
BOUND_FLOP_FACTOR = 1.5  # the issue's slack on the prompt tokens' FLOP floor
BATCH_CLASS = 16  # decode-only steps are grouped by batch size in classes this wide
CPU_MATMUL_N = 512  # the matmul rate's product size on a CPU (8192 would take minutes)


@dataclass
class StepRecord:
    kind: str
    path: str
    decode_rows: int
    prompt_tokens: int
    host_ms: float  # the launch call on the host
    gpu_ms: float = float("nan")  # between the events (the host time on a CPU engine)
    pool_loads: int = 0  # adapters whose host -> pool copy started since the previous launch
    flips: int = 0  # adapters turned ready (slot tables written) since the previous launch
    gap_ms: float = float("nan")  # host time since the previous launch returned
    idle_ms: float = float("nan")  # the device idle before the step (CUDA; not the first)


class StepTimer:
    """Records every launch of `engine.runner` until `close()`; `records()` waits for the
    device and returns them."""

    def __init__(self, engine) -> None:
        self.runner = engine.runner
        self.adapters = engine.adapters
        self.cuda = engine.device.type == "cuda"
        self._launch = self.runner.launch
        self._pending: list[tuple[StepRecord, object, object]] = []
        self._loads = self.adapters.num_loads
        self._flips = 0
        self._set_slot = self.adapters.tables.set_slot
        self.adapters.tables.set_slot = self._counted_set_slot
        self._returned: float | None = None  # when the previous launch returned
        self.runner.launch = self._timed

    def _counted_set_slot(self, *args, **kwargs):
        self._flips += 1
        return self._set_slot(*args, **kwargs)

    def _timed(self, sched, seqs, previous=None):
        decode = sum(1 for s in sched.scheduled
                     if s.num_new_tokens == 1 and s.start >= seqs[s.request_id].num_prompt_tokens)
        prompt = sched.num_batched_tokens - decode
        start = end = None
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        gap_ms = float("nan") if self._returned is None else 1e3 * (t0 - self._returned)
        result = self._launch(sched, seqs, previous)
        self._returned = time.perf_counter()
        host_ms = 1e3 * (self._returned - t0)
        if self.cuda:
            end.record()
        loads, self._loads = self.adapters.num_loads - self._loads, self.adapters.num_loads
        record = StepRecord(MIXED if prompt else DECODE, getattr(self.runner, "last_path", "?"),
                            decode, prompt, host_ms, pool_loads=loads, flips=self._flips,
                            gap_ms=gap_ms)
        self._flips = 0
        self._pending.append((record, start, end))
        return result

    def close(self) -> None:
        self.runner.launch = self._launch
        self.adapters.tables.set_slot = self._set_slot

    def records(self) -> list[StepRecord]:
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        previous_end = None
        for record, start, end in self._pending:
            record.gpu_ms = start.elapsed_time(end) if self.cuda else record.host_ms
            if previous_end is not None:
                record.idle_ms = previous_end.elapsed_time(start)
            previous_end = end
            out.append(record)
        return out


def idle_by_pool_loads(records: list[StepRecord]) -> dict:
    """The device's idle seconds before steps, split by whether the step's scheduling
    started a pool load ({} without idle times: a CPU engine)."""
    timed = [r for r in records if r.idle_ms == r.idle_ms]  # NaN: not measured
    if not timed:
        return {}
    out = {}
    for name, rs in (("with_pool_loads", [r for r in timed if r.pool_loads]),
                     ("without_pool_loads", [r for r in timed if not r.pool_loads])):
        out[name] = {"steps": len(rs), "pool_loads": sum(r.pool_loads for r in rs),
                     "idle_s": round(sum(r.idle_ms for r in rs) / 1e3, 3),
                     "idle_ms_per_step": round(statistics.fmean(r.idle_ms for r in rs), 3)
                     if rs else 0.0}
    return out


IDLE_WORST = 12  # steps listed by idle_detail


def idle_detail(records: list[StepRecord]) -> dict:
    """Where the device idled: in the first 5% of steps (the whole batch's adapters loading at
    once) or later, and the steps that idled longest with what their host did before them
    (gap: host ms since the previous launch returned; the previous step's device ms: a gap
    longer than it leaves the device waiting for the host, a shorter one waits for the device
    itself: a copy the step's inputs queue behind)."""
    timed = [(i, r) for i, r in enumerate(records) if r.idle_ms == r.idle_ms]
    if not timed:
        return {}
    head = max(1, len(records) // 20)
    worst = sorted(timed, key=lambda ir: -ir[1].idle_ms)[:IDLE_WORST]
    return {"idle_s_first_5pct": round(sum(r.idle_ms for i, r in timed if i < head) / 1e3, 3),
            "idle_s_rest": round(sum(r.idle_ms for i, r in timed if i >= head) / 1e3, 3),
            "flips": sum(r.flips for r in records),
            "worst": [{"step": i, "idle_ms": round(r.idle_ms, 2), "pool_loads": r.pool_loads,
                       "flips": r.flips, "gap_ms": round(r.gap_ms, 2),
                       "previous_gpu_ms": round(records[i - 1].gpu_ms, 2)}
                      for i, r in sorted(worst)]}


SYNC_SITES_LISTED = 12


@contextmanager
def sync_sites(enabled: bool = True) -> Iterator[Counter]:
    """Count the synchronizing CUDA calls made inside, by the Python line that made them
    (torch.cuda.set_sync_debug_mode warns at a host wait for the device, such as `.item()` or
    a synchronous copy); the counter is filled on exit. Not `enabled`: stays empty."""
    counts: Counter = Counter()
    if not enabled:
        yield counts
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield counts
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    counts.update(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                  if "synchroniz" in str(w.message))


def host_ms_while_busy(ops: dict[str, Callable[[], object]], busy_cycles: int,
                       side_stream: bool = False) -> dict[str, float]:
    """Host ms of each op, each run while the current stream spins `busy_cycles` ("the step
    in flight"): an op that waits for the device takes about that long. `side_stream`: the op
    runs on a side stream that waits for the busy one (as a pool copy does)."""
    side = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    times = {}
    for name, op in ops.items():
        torch.cuda.synchronize()
        torch.cuda._sleep(busy_cycles)
        side.wait_stream(torch.cuda.current_stream())
        t0 = time.perf_counter()
        with torch.cuda.stream(side):
            op()
        times[name] = round((time.perf_counter() - t0) * 1e3, 2)
    torch.cuda.synchronize()
    return times


def by_kind(records: list[StepRecord]) -> dict[str, dict]:
    """Steps, device and host ms per step, and the paths taken, per step kind."""
    out = {}
    for kind in (DECODE, MIXED):
        rs = [r for r in records if r.kind == kind]
        if not rs:
            continue
        mean = statistics.fmean
        out[kind] = {"steps": len(rs),
                     "gpu_ms_per_step": round(mean(r.gpu_ms for r in rs), 3),
                     "host_ms_per_step": round(mean(r.host_ms for r in rs), 3),
                     "gpu_s": round(sum(r.gpu_ms for r in rs) / 1e3, 3),
                     "decode_rows_per_step": round(mean(r.decode_rows for r in rs), 1),
                     "prompt_tokens": sum(r.prompt_tokens for r in rs),
                     "paths": dict(Counter(r.path for r in rs))}
    return out


def decode_ms_by_class(records: list[StepRecord]) -> dict[int, float]:
    """Median device ms of the decode-only steps per batch size class (1 = up to 16 rows...)."""
    groups: dict[int, list[float]] = {}
    for r in records:
        if r.kind == DECODE:
            groups.setdefault(-(-r.decode_rows // BATCH_CLASS), []).append(r.gpu_ms)
    return {k: statistics.median(v) for k, v in sorted(groups.items())}


def mixed_bound(records: list[StepRecord], flops_per_token: float, peak_flops: float) -> dict:
    """Each mixed step against decode_ms(its decode rows, at least 1) + 1.5 x its prompt
    tokens' FLOP floor; decode_ms from the nearest batch class that has decode-only steps."""
    classes = decode_ms_by_class(records)
    mixed = [r for r in records if r.kind == MIXED]
    if not classes or not mixed:
        return {}

    def decode_ms(rows: int) -> float:
        want = -(-max(rows, 1) // BATCH_CLASS)
        return classes[min(classes, key=lambda k: (abs(k - want), k))]

    floor_ms = [1e3 * r.prompt_tokens * flops_per_token / peak_flops for r in mixed]
    bounds = [decode_ms(r.decode_rows) + BOUND_FLOP_FACTOR * f for r, f in zip(mixed, floor_ms)]
    actual = [r.gpu_ms for r in mixed]
    return {"mixed_steps": len(mixed),
            "mixed_ms_per_step": round(statistics.fmean(actual), 3),
            "bound_ms_per_step": round(statistics.fmean(bounds), 3),
            "prompt_flop_floor_ms_per_step": round(statistics.fmean(floor_ms), 3),
            "actual_over_bound_total": round(sum(actual) / sum(bounds), 3),
            "actual_over_bound_median": round(statistics.median(
                a / b for a, b in zip(actual, bounds)), 3),
            "within_bound_pct": round(100 * sum(a <= b for a, b in zip(actual, bounds))
                                      / len(mixed), 1),
            "decode_ms_by_batch_class": {str(k * BATCH_CLASS): round(v, 3)
                                         for k, v in classes.items()}}


def matmul_flops_per_token(model) -> float:
    """2 x the weight matmul parameters of the layers (a prompt token's FLOP floor; attention
    and the lm_head, which only sampled rows run, left out)."""
    n = sum(t.numel() for layer in model.layers
            for t in (layer.w_qkv, layer.w_o, layer.w_gate_up, layer.w_down))
    return 2.0 * n


def measure_matmul_flops(device: str | torch.device, n: int = 8192, reps: int = 20) -> float:
    """The device's matmul rate (FLOP/s) on an n x n x n product, best of `reps`: fp16 on
    CUDA (timed by events), fp32 of at most CPU_MATMUL_N on a CPU."""
    cuda = torch.device(device).type == "cuda"
    if not cuda:
        n = min(n, CPU_MATMUL_N)
    dtype = torch.float16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    return 2.0 * n**3 / best
