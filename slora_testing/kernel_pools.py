"""Random pools for the kernel tests and benchmarks: adapters packed as rows in scattered pages."""

from __future__ import annotations

import torch

from slora_kernels.lora_common import NUM_MODULES


def make_lora_pool(
    slot_ranks: list[list[int]],
    dims: list[tuple[int, int]],
    *,
    page_elems: int,
    dtype: torch.dtype,
    device: str | torch.device,
    gen: torch.Generator,
    max_rank: int = 128,
    extra_pages: int = 3,
    row_pad: int = 0,
    std: float = 0.05,
):
    """Pack each slot's adapter (ranks per module, 0 = absent) into shuffled pages of a random pool.

    Per DESIGN.md: for each module in order, r rows of A (in_m long) then r rows of B^T
    (out_m long); a row never straddles a page. ``row_pad`` elements are skipped before each row
    (``row_pad=1`` makes rows start at odd offsets). The whole pool is random, so reading past a
    rank or a row reads garbage, never zeros. Values ~ N(0, std). Returns flat, a_ptr, b_ptr,
    ranks, scales.
    """
    num_slots = len(slot_ranks)
    plans = []
    total_pages = 0
    for ranks in slot_ranks:
        rows = []  # (page_index_in_adapter, offset, kind, module, j)
        page, off = 0, 0
        for m, r in enumerate(ranks):
            for kind, length in (("a", dims[m][0]), ("b", dims[m][1])):
                for j in range(r):
                    need = row_pad + length
                    if need > page_elems:
                        raise ValueError("row longer than a page")
                    if off + need > page_elems:
                        page, off = page + 1, 0
                    rows.append((page, off + row_pad, kind, m, j))
                    off += need
        n_pages = page + 1 if rows else 0
        plans.append((n_pages, rows))
        total_pages += n_pages
    num_pages = total_pages + extra_pages
    perm = torch.randperm(num_pages, generator=gen).tolist()  # scattered page ids
    flat = (torch.randn(num_pages * page_elems, generator=gen) * std).to(dtype)
    a_ptr = torch.zeros(num_slots, NUM_MODULES, max_rank, dtype=torch.int64)
    b_ptr = torch.zeros_like(a_ptr)
    ranks_t = torch.zeros(num_slots, NUM_MODULES, dtype=torch.int32)
    nxt = 0
    for s, (n_pages, rows) in enumerate(plans):
        pages = perm[nxt : nxt + n_pages]
        nxt += n_pages
        for page, off, kind, m, j in rows:
            (a_ptr if kind == "a" else b_ptr)[s, m, j] = pages[page] * page_elems + off
        for m, r in enumerate(slot_ranks[s]):
            ranks_t[s, m] = r
    scales = (torch.rand(num_slots, generator=gen) + 0.5).to(torch.float32)
    return (
        flat.to(device),
        a_ptr.to(device),
        b_ptr.to(device),
        ranks_t.to(device),
        scales.to(device),
    )


def measure_copy_rate(device: str | torch.device = "cuda", nbytes: int = 1 << 30) -> float:
    """Device memory rate in bytes/s, counting bytes read plus bytes written, of a large copy."""
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def gpu_time_us(fn, reps: int = 100, warmup: int = 10, sleep_cycles: int = 2_000_000) -> float:
    """Median device time of ``fn`` in us, L2 flushed before each run (cold cache).

    Before each timed region the stream gets a 256 MB memset and a ~1 ms sleep, so the host
    (Python launchers) runs ahead and its launch overhead does not show in the events: this
    measures the kernels. Use :func:`call_time_us` for the cost of back-to-back eager calls.
    """
    cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        cache.zero_()
        torch.cuda._sleep(sleep_cycles)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return 1e3 * times[len(times) // 2]


def call_time_us(fn, iters: int = 200, warmup: int = 10) -> float:
    """Wall time per call of ``fn`` called back to back (host overhead included, L2 warm)."""
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / iters
