"""What the HTTP guard (client/http_guard) adds per request, through the real server: the same
requests straight to Triton's HTTP port, through the guard, and through a guard that checks
every body on its event loop (`--inline-check-bytes` = max body: the guard before big bodies
went to its process pool), interleaved, one at a time.

    python bench/bench_http_guard.py --requests 100 --out docs/results/http_guard_cpu

Requests: GET /v2/health/ready; a small generate (max_tokens 1); and the largest body the
model takes as input, 2^20 `input_ids` (8.3 MB of JSON: the guard parses and range-checks it,
then the model refuses it as longer than max_model_len). Then health checks through each
guard while another client keeps it checking big bodies (2^20 ids, the last out of range:
the guard refuses each after its whole check). Also timed in-process: the guard's check of
the 2^20-id body alone (checks.check_body), inline and through a one-worker process pool.
Writes OUT.json and OUT.png (median and p90 per request kind and path).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.http_guard.checks import check_body  # noqa: E402
from client.http_guard.proxy import DEFAULT_MAX_BODY_BYTES  # noqa: E402
from slora_testing.servers import start_http_guard, start_tritonserver, stop_server  # noqa: E402

TIMEOUT_S = 120.0
BIG_IDS = 1 << 20  # triton_io's bound on input_ids
OUT_OF_RANGE_ID = 2 ** 32 + 1  # INT32's range is checked after the parse: the guard refuses it
CHECK_REPEATS = 5
BIG_ROUNDS = 20  # big bodies sent one after the other while health checks are timed
PROBE_GAP_S = 0.01  # between two health checks under big checks
MS = 1e3
# every body checked on the event loop: the guard as it was before its check pool
INLINE_GUARD_ARGS = ("--inline-check-bytes", str(DEFAULT_MAX_BODY_BYTES))


def big_body(last_id: int | None = None) -> bytes:
    """2^20 input_ids; `last_id` replaces the last one."""
    ids = list(range(1000, 1000 + BIG_IDS))
    if last_id is not None:
        ids[-1] = last_id
    return json.dumps({"input_ids": ids, "max_tokens": 1, "stream": False}).encode()


def bodies() -> dict[str, bytes | None]:
    small = {"text_input": "Hi", "max_tokens": 1, "temperature": 0.0, "stream": False}
    return {"health": None, "generate": json.dumps(small).encode(),
            "input_ids_2^20": big_body()}


def timed(session: requests.Session, url: str, body: bytes | None) -> tuple[float, int]:
    start = time.perf_counter()
    if body is None:
        resp = session.get(f"http://{url}/v2/health/ready", timeout=TIMEOUT_S)
    else:
        resp = session.post(f"http://{url}/v2/models/slora/generate", data=body,
                            timeout=TIMEOUT_S)
    return time.perf_counter() - start, resp.status_code


def measure(urls: dict[str, str], count: int) -> dict[str, dict[str, Any]]:
    sessions = {path: requests.Session() for path in urls}
    results: dict[str, dict[str, Any]] = {}
    for kind, body in bodies().items():
        runs = count if kind != "input_ids_2^20" else max(3, count // 10)
        times: dict[str, list[float]] = {path: [] for path in urls}
        statuses: dict[str, set[int]] = {path: set() for path in urls}
        for path, url in urls.items():  # warm-up
            timed(sessions[path], url, body)
        for _ in tqdm(range(runs), desc=kind):
            for path, url in urls.items():  # interleaved: drift hits both paths alike
                seconds, status = timed(sessions[path], url, body)
                times[path].append(seconds)
                statuses[path].add(status)
        results[kind] = {path: summary(t, statuses[path]) for path, t in times.items()}
    return results


def summary(seconds: list[float], statuses: set[int]) -> dict[str, Any]:
    ordered = sorted(seconds)
    return {"median_ms": statistics.median(ordered) * MS,
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * MS, "max_ms": ordered[-1] * MS,
            "n": len(ordered), "statuses": sorted(statuses)}


def health_under_checks(url: str) -> dict[str, Any]:
    """Health checks through the guard at `url`, one every PROBE_GAP_S, while another client
    sends it BIG_ROUNDS refused 2^20-id bodies one after the other (a check nearly always
    under way)."""
    refused = big_body(OUT_OF_RANGE_ID)
    done = threading.Event()

    def send_big() -> None:
        with requests.Session() as session:
            for _ in tqdm(range(BIG_ROUNDS), desc=f"big checks via {url}"):
                session.post(f"http://{url}/v2/models/slora/generate", data=refused,
                             timeout=TIMEOUT_S)
        done.set()

    sender = threading.Thread(target=send_big)
    sender.start()
    times, statuses, session = [], set(), requests.Session()
    while not done.is_set():
        seconds, status = timed(session, url, None)
        times.append(seconds)
        statuses.add(status)
        time.sleep(PROBE_GAP_S)
    sender.join()
    return summary(times, statuses)


def check_time_ms(metadata_url: str) -> dict[str, float]:
    """The guard's own work on the 2^20-id body (check_body against the model's inputs):
    inline, and as the guard runs it for a big body, in a (warm) spawned worker process."""
    metadata = requests.get(f"http://{metadata_url}/v2/models/slora", timeout=TIMEOUT_S).json()
    args = (bodies()["input_ids_2^20"], DEFAULT_MAX_BODY_BYTES, "generate",
            {i["name"]: i["datatype"] for i in metadata["inputs"]})
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(check_body, *args).result()  # starts the worker
        return {"inline_ms": median_ms(lambda: check_body(*args)),
                "pool_ms": median_ms(lambda: pool.submit(check_body, *args).result())}


def median_ms(run: Callable[[], None]) -> float:
    runs = []
    for _ in range(CHECK_REPEATS):
        start = time.perf_counter()
        run()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * MS


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result["latency"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.5))
    for ax, kind in zip(axes, kinds, strict=True):
        paths = list(result["latency"][kind])
        for i, stat in enumerate(("median_ms", "p90_ms")):
            values = [result["latency"][kind][p][stat] for p in paths]
            ax.bar([j + 0.4 * i for j in range(len(paths))], values, width=0.4, label=stat)
        ax.set_xticks([j + 0.2 for j in range(len(paths))], paths, fontsize=8)
        ax.set_title(kind)
        ax.set_ylabel("ms")
    axes[0].legend()
    check = result["check_2^20_ids"]
    fig.suptitle(f"HTTP guard: direct, through the guard, through a guard checking inline "
                 f"(check of 2^20 ids alone: {check['inline_ms']:.0f} ms inline, "
                 f"{check['pool_ms']:.0f} ms via a worker)")
    fig.tight_layout()
    fig.savefig(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="per request kind and path")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "http_guard_cpu"))
    args = parser.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="bench-guard-") as tmp:
        server, urls = start_tritonserver(Path(tmp) / "server.log")
        guards = []
        try:
            for name, extra in (("guard", ()), ("guard_inline", INLINE_GUARD_ARGS)):
                proc, urls[name] = start_http_guard(urls["http"], Path(tmp) / f"{name}.log",
                                                    *extra)
                guards.append(proc)
            result = run_all(args, urls)
        finally:
            for proc in guards:
                stop_server(proc)
            stop_server(server)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    for kind, paths in result["latency"].items():
        print(kind, {p: f"{v['median_ms']:.1f} / {v['p90_ms']:.1f} / {v['max_ms']:.1f} ms, "
                        f"{v['statuses']}" for p, v in paths.items()})
    print(f"2^20-id body: {result['big_body_bytes']} bytes; its check: "
          f"{result['check_2^20_ids']}")


def run_all(args: argparse.Namespace, urls: dict[str, str]) -> dict[str, Any]:
    paths = {"direct": urls["http"], "guard": urls["guard"], "guard_inline": urls["guard_inline"]}
    latency = measure(paths, args.requests)
    latency["health_during_big_checks"] = {name: health_under_checks(urls[name])
                                           for name in ("guard", "guard_inline")}
    return {"args": vars(args), "latency": latency, "big_body_bytes": len(big_body()),
            "check_2^20_ids": check_time_ms(urls["http"])}


if __name__ == "__main__":
    main()
