"""Iteration-level scheduler (continuous batching with chunked prefill).

Each step: running sequences first (FCFS by arrival: decodes and unfinished prefill chunks),
then waiting ones are admitted while the token budget, the running cap and the pool allow.
Admission needs pool pages for the request's KV (its whole current token list) AND for its
adapter, and keeps headroom: every running sequence (and the request) must still find pages
for its next `kv_headroom_tokens` tokens (fewer if its max_tokens ends it sooner). Without it,
admission fills the pool to the last page and the running batch's next page preempts the
request just admitted, whose prefill is then wasted (issue 19: 90 preemptions, 15% of the
prompt tokens recomputed on an H100; bench/sim_preemption.py). Idle adapters are evicted (LRU)
when KV needs room. When the pool runs dry for a running sequence, the latest-arrived running
sequence is preempted (recompute: its KV pages are freed, it goes back to the front of the
queue and is prefilled again later).
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slora_backend.adapters.adapter_manager import Wait
from slora_backend.config import DEFAULT_KV_HEADROOM_TOKENS
from slora_backend.engine.kv_manager import KVManager
from slora_backend.engine.sequence import SeqStatus, Sequence
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.memory_pool import PagePool

if TYPE_CHECKING:
    from slora_backend.adapters.adapter_manager import AdapterManager
    from slora_backend.config import EngineConfig

CANCELLED = "cancelled"


@dataclass
class ScheduledSeq:
    """`num_new_tokens` tokens of `request_id` starting at position `start` run this step;
    `sample` = the chunk reaches the end of its tokens, so a new token is sampled."""

    request_id: str
    start: int
    num_new_tokens: int
    sample: bool


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # finished with an error while scheduling

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, pool: PagePool, kv: KVManager, adapters: AdapterManager | None,
                 max_num_seqs: int, max_num_batched_tokens: int, max_waiting: int,
                 kv_headroom_tokens: int = DEFAULT_KV_HEADROOM_TOKENS) -> None:
        self.pool = pool
        self.kv = kv
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.kv_headroom_tokens = kv_headroom_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self.seqs: dict[str, Sequence] = {}
        self.num_preemptions = 0
        # add() runs on any thread, the rest on the step's: the lock keeps the queues whole
        # (re-entrant: scheduling finishes requests whose adapter failed)
        self._lock = threading.RLock()
        if adapters is not None:  # the pool tier evicts these last
            adapters.awaited = self._next_adapters

    @classmethod
    def from_config(cls, pool: PagePool, kv: KVManager, adapters: AdapterManager | None,
                    config: EngineConfig) -> Scheduler:
        return cls(pool, kv, adapters, config.max_num_seqs, config.max_num_batched_tokens,
                   config.max_waiting, config.kv_headroom_tokens)

    # ---- queue ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new request (thread-safe; the only way into the queue): INVALID_ARG at once
        when its id is in use, UNAVAILABLE when the waiting queue is full."""
        with self._lock:
            if seq.request_id in self.seqs:
                raise EngineError.invalid("request_id", f"{seq.request_id!r} is already in use")
            if len(self.waiting) >= self.max_waiting:
                raise EngineError(ErrorCode.UNAVAILABLE,
                                  f"queue full: {len(self.waiting)} requests waiting "
                                  f"(max_waiting={self.max_waiting}); retry later")
            self.seqs[seq.request_id] = seq
            self.waiting.append(seq)

    def live_ids(self) -> list[str]:
        """Ids of the requests added and not finished (thread-safe)."""
        with self._lock:
            return list(self.seqs)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request as cancelled and free its pages; None if unknown / already done."""
        with self._lock:
            seq = self.seqs.get(request_id)
            if seq is None:
                return None
            self.finish(seq, CANCELLED)
            return seq

    def finish(self, seq: Sequence, reason: str | None, error: EngineError | None = None) -> None:
        """Take `seq` out of the queues and free its KV pages and adapter reference."""
        with self._lock:
            if seq.status is SeqStatus.RUNNING:
                self.running.remove(seq)
            elif seq.status is SeqStatus.WAITING:
                self.waiting.remove(seq)
            self._free_resources(seq)
            seq.status = SeqStatus.FINISHED
            seq.finish_reason = reason
            seq.error = error
            self.seqs.pop(seq.request_id, None)

    def _free_resources(self, seq: Sequence) -> None:
        self.kv.free(seq.request_id)
        if seq.holds_adapter and self.adapters is not None and seq.adapter_id is not None:
            self.adapters.release(seq.adapter_id)
        seq.holds_adapter = False
        seq.lora_slot = -1

    # ---- scheduling ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        with self._lock:
            if self.adapters is not None:
                self.adapters.poll()  # adapters whose pool copy completed turn ready
            budget = self._schedule_running(out, self.max_num_batched_tokens)
            self._admit_waiting(out, budget)
        return out

    def _next_adapters(self) -> set[str]:
        """The adapters of the next max_num_seqs queued requests (the next admissions')."""
        return {s.adapter_id for s in itertools.islice(self.waiting, self.max_num_seqs)
                if s.adapter_id is not None}

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.finishing:  # its last token is still on the device and ends it
                i += 1
                continue
            n = min(seq.num_uncomputed, budget)
            if not self._ensure_kv(seq, seq.num_computed_tokens + n, out):
                continue  # seq itself was preempted: running[i] is now the next one
            out.scheduled.append(self._chunk(seq, n))
            budget -= n
            i += 1
        return budget

    def _ensure_kv(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Make room for `num_tokens` KV slots of a running seq: evict idle adapters, then
        preempt the latest-arrived running sequences. False if `seq` itself was preempted."""
        need = self.kv.pages_needed(seq.request_id, num_tokens)
        while need > self.pool.num_free:
            if self.adapters is not None and self.adapters.evict_idle(need - self.pool.num_free):
                continue
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        self.kv.grow(seq.request_id, num_tokens)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._free_resources(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq.request_id)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        if not self.waiting or budget <= 0 or len(self.running) >= self.max_num_seqs:
            return  # nothing to admit: spare the headroom's pass over the running batch
        not_ready: list[Sequence] = []  # adapter still loading (host or pool): only these wait
        headroom = sum(self._pages_short(s) for s in self.running)  # kept free for the running
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            status = self._try_admit(seq, out, headroom, head=not not_ready)
            if status == "no_room":
                break
            if status == "failed":
                continue  # finish() already took it out of the queue
            self.waiting.popleft()
            if status == "not_ready":
                not_ready.append(seq)
            elif status == "admitted":
                n = min(seq.num_uncomputed, budget)
                self.kv.grow(seq.request_id, seq.num_computed_tokens + n)
                out.scheduled.append(self._chunk(seq, n))
                budget -= n
                headroom += self._pages_short(seq)
        self.waiting.extendleft(reversed(not_ready))

    def _pages_short(self, seq: Sequence) -> int:
        """Pages `seq` lacks for its tokens and its next `kv_headroom_tokens` (at most up to
        its max_tokens): what admission keeps free for it."""
        left = max(0, seq.params.max_tokens - len(seq.output_token_ids))
        tokens = seq.num_tokens + min(self.kv_headroom_tokens, left)
        return self.kv.pages_needed(seq.request_id, tokens)

    def _try_admit(self, seq: Sequence, out: SchedulerOutput, headroom: int,
                   head: bool) -> str:
        """'admitted' (now RUNNING), 'not_ready', 'no_room' or 'failed' (finished with error).
        It needs free pages for its own KV and headroom plus the running batch's `headroom`:
        at worst it waits until the running ones finish (Admission checked that it fits alone).
        Only the `head` (no request before it waits) starts its adapter's host load; the others
        take what the host cache's prefetch has loaded, so a long queue cannot thrash it."""
        if seq.finishing:  # preempted while its last token is in flight: it ends when read
            return "not_ready"
        pages = self._pages_short(seq) + headroom
        if seq.adapter_id is not None:
            assert self.adapters is not None, "adapter request without an adapter manager"
            try:
                slot = self.adapters.acquire(seq.adapter_id, reserve_pages=pages, load=head)
            except EngineError as err:  # the adapter failed to load / validate
                self.finish(seq, None, err)
                out.failed.append(seq)
                return "failed"
            if isinstance(slot, Wait):  # loading: the others go first; no room: all wait
                return "not_ready" if slot is Wait.LOADING else "no_room"
            seq.lora_slot = slot
            seq.holds_adapter = True
        elif not self._make_room(pages):
            return "no_room"
        seq.status = SeqStatus.RUNNING
        arrivals = [s.arrival for s in self.running]
        self.running.insert(bisect.bisect(arrivals, seq.arrival), seq)
        return "admitted"

    def _make_room(self, pages: int) -> bool:
        if pages > self.pool.num_free and self.adapters is not None:
            self.adapters.evict_idle(pages - self.pool.num_free)
        return pages <= self.pool.num_free

    @staticmethod
    def _chunk(seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq.request_id, start, n, start + n == seq.num_tokens)

    def commit(self, out: SchedulerOutput) -> None:
        """After the model ran `out`: the scheduled tokens now have K/V in the pool."""
        for s in out.scheduled:
            seq = self.seqs.get(s.request_id)
            if seq is not None:
                seq.num_computed_tokens = s.start + s.num_new_tokens
