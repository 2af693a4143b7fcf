"""The model's custom metrics on Triton's metrics port (README "Metrics"), kept out of
model.py. `pb_utils` (triton_python_backend_utils, which exists only inside the stub) is passed
in. Each metric call is an IPC round trip to Triton, so gauges and counters are only touched
when their value changed.

The model's threads (execute, responses, watcher) all update metrics, but a pb_utils Metric is
not thread-safe: its increment / set / observe release the GIL, then replace the object's
shared-memory copy and send its handle to Triton (python_backend src/metric.cc, unchanged
through r26.07). Two threads on one metric let Triton free that memory twice, and tritonserver
died of SIGSEGV in its shared-memory allocator (`Metric::~Metric`) within seconds of refusals
counted by two threads at once (tests/server/test_concurrent_refusals.py). So every metric
call here holds one lock (`_Serialized`).
"""

from __future__ import annotations

import threading
from typing import Any

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
# EngineStats attribute -> gauge label (slora_pool_pages{kind=...})
POOL_STATS = {"pool_pages_total": "total", "pool_pages_free": "free",
              "pool_pages_kv": "kv", "pool_pages_lora": "lora"}
# EngineStats.adapter_cache keys: host-RAM cache events, then pool (device) residency events
CACHE_COUNTERS = ("hits", "misses", "loads", "load_errors", "evictions", "pool_loads",
                  "pool_evictions")
LOAD_SECONDS_TOTAL = "load_latency_total_s"  # EngineStats.adapter_cache: disk -> host time
LOAD_SECONDS_MAX = "load_latency_max_s"  # slowest of the recent loads


class _Serialized:
    """A pb_utils Metric whose calls hold the one lock of all the model's metrics."""

    def __init__(self, metric: Any, lock: threading.Lock) -> None:
        self._metric = metric
        self._lock = lock

    def increment(self, value: float) -> None:
        with self._lock:
            self._metric.increment(value)

    def set(self, value: float) -> None:
        with self._lock:
            self._metric.set(value)

    def observe(self, value: float) -> None:
        with self._lock:
            self._metric.observe(value)


class _Family:
    """A pb_utils MetricFamily whose metrics come out serialized (`_Serialized`)."""

    def __init__(self, family: Any, lock: threading.Lock) -> None:
        self._family = family
        self._lock = lock

    def Metric(self, **kwargs: Any) -> _Serialized:  # noqa: N802 (pb_utils' name)
        return _Serialized(self._family.Metric(**kwargs), self._lock)


class TritonMetrics:
    """Custom metrics on Triton's metrics port (names prefixed `slora_`); README "Metrics"."""

    def __init__(self, pb_utils: Any, labels: dict[str, str]) -> None:
        fam = pb_utils.MetricFamily
        lock = threading.Lock()
        self._families = [
            fam("slora_requests_total", "Finished requests by outcome", fam.COUNTER),
            fam("slora_time_to_first_token_seconds", "Time to first token", fam.HISTOGRAM),
            fam("slora_inter_token_latency_seconds", "Time between tokens", fam.HISTOGRAM),
            fam("slora_generated_tokens_total", "Generated tokens", fam.COUNTER),
            fam("slora_requests", "Requests in the engine by state", fam.GAUGE),
            fam("slora_pool_pages", "Unified pool pages by use", fam.GAUGE),
            fam("slora_adapters_resident", "Adapters resident in the pool", fam.GAUGE),
            fam("slora_adapter_cache_events_total", "Adapter cache events (host RAM, pool)",
                fam.COUNTER),
            fam("slora_preemptions_total", "Requests preempted (KV recomputed)", fam.COUNTER),
            fam("slora_adapter_load_seconds_total", "Time spent loading adapters disk -> host",
                fam.COUNTER),
            fam("slora_adapter_load_seconds_max", "Slowest recent adapter load disk -> host",
                fam.GAUGE),
        ]
        (outcomes, ttft, itl, tokens, reqs, pool, resident, cache, preempt, load_total,
         load_max) = (_Family(f, lock) for f in self._families)
        self.outcome = {o: outcomes.Metric(labels={**labels, "outcome": o})
                        for o in ("success", "error", "cancelled")}
        self.ttft = ttft.Metric(labels=labels, buckets=TTFT_BUCKETS)
        self.itl = itl.Metric(labels=labels, buckets=ITL_BUCKETS)
        self.tokens = tokens.Metric(labels=labels)
        self.gauges = {
            "num_running": reqs.Metric(labels={**labels, "state": "running"}),
            "num_waiting": reqs.Metric(labels={**labels, "state": "waiting"}),
            "adapters_resident": resident.Metric(labels=labels),
        }
        for attr, kind in POOL_STATS.items():
            self.gauges[attr] = pool.Metric(labels={**labels, "kind": kind})
        self.counters = {c: cache.Metric(labels={**labels, "event": c}) for c in CACHE_COUNTERS}
        self.preemptions = preempt.Metric(labels=labels)
        self.load_seconds = load_total.Metric(labels=labels)
        self.load_seconds_max = load_max.Metric(labels=labels)
        self._last: dict[str, float] = {}

    def refresh(self, stats: Any) -> None:
        """Copy engine stats into gauges/counters; only values that changed cost an IPC call."""
        for attr, gauge in self.gauges.items():
            value = getattr(stats, attr, None)
            if value is not None and self._last.get(attr) != value:
                gauge.set(float(value))
                self._last[attr] = value
        cache = getattr(stats, "adapter_cache", None) or {}
        slowest = cache.get(LOAD_SECONDS_MAX)
        if slowest is not None and self._last.get(LOAD_SECONDS_MAX) != slowest:
            self.load_seconds_max.set(float(slowest))
            self._last[LOAD_SECONDS_MAX] = slowest
        totals = {**cache, "num_preemptions": getattr(stats, "num_preemptions", None)}
        metrics = {**self.counters, "num_preemptions": self.preemptions,
                   LOAD_SECONDS_TOTAL: self.load_seconds}
        for name, metric in metrics.items():
            value, key = totals.get(name), "total_" + name
            if value is not None and value > self._last.get(key, 0):
                # the engine keeps running totals; Prometheus counters take increments
                metric.increment(float(value - self._last.get(key, 0)))
                self._last[key] = value
