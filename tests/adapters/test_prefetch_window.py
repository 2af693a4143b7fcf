"""PrefetchWindow: S-LoRA's lookahead bookkeeping (no threads, no files)."""

from __future__ import annotations

from slora_backend.adapters.prefetch import PrefetchWindow

SIZE = 100


def test_prefetches_beyond_the_capacity_wait_in_order_for_claims() -> None:
    window = PrefetchWindow(2 * SIZE)
    assert [window.offer(a, SIZE) for a in "abcd"] == [True, True, False, False]
    window.loaded("a", SIZE)
    assert window.is_unclaimed("a") and list(window.startable()) == []  # still full
    assert window.release("a")  # claimed: room for the next one, in order
    assert list(window.startable()) == ["c"]


def test_a_demanded_load_is_kept_unclaimed_and_counts_against_the_room() -> None:
    window = PrefetchWindow(2 * SIZE)
    window.offer("a", SIZE)
    window.offer("b", SIZE)
    window.offer("c", SIZE)  # deferred
    window.demand("c")  # the head of the queue wants it now: it waits for no room
    assert not window.is_deferred("c")
    window.loaded("c", SIZE)
    assert window.is_unclaimed("c")  # kept while the head waits for room in the pool
    window.offer("d", SIZE)
    assert window.is_deferred("d")
    window.demand("x")  # a load someone else started, committed as claimed
    window.release("x")
    window.loaded("x", SIZE)
    assert not window.is_unclaimed("x")


def test_an_awaited_adapter_evicted_for_room_waits_again_first_in_line() -> None:
    window = PrefetchWindow(2 * SIZE)
    for adapter in "abc":
        window.offer(adapter, SIZE)
    window.loaded("a", SIZE)
    window.requeue("a")  # evicted for the head's demand: no new room for "c"
    assert not window.release("a") and window.is_deferred("a")
    window.loaded("b", SIZE)
    assert window.release("b")  # b's claim makes room: "a" first, then "c"
    assert list(window.startable()) == ["a", "c"]
