"""What the HTTP guard (client/http_guard) adds per request, through the real server: the same
requests straight to Triton's HTTP port and through the guard, interleaved, one at a time.

    python bench/bench_http_guard.py --requests 100 --out docs/results/http_guard_cpu

Requests: GET /v2/health/ready; a small generate (max_tokens 1); and the largest body the
model takes as input, 2^20 `input_ids` (9.4 MB of JSON: the guard parses and range-checks it,
then the model refuses it as longer than max_model_len). Also timed in-process: the guard's
check of that body alone (parse + datatype check), the time its event loop serves nothing
else. Writes OUT.json and OUT.png (median and p90 per request kind and path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.http_guard.checks import check_generate, parse_body  # noqa: E402
from client.http_guard.proxy import DEFAULT_MAX_BODY_BYTES  # noqa: E402
from slora_testing.servers import free_ports, start_tritonserver, stop_server  # noqa: E402

GUARD_START_S = 30.0
TIMEOUT_S = 120.0
BIG_IDS = 1 << 20  # triton_io's bound on input_ids
CHECK_REPEATS = 5
MS = 1e3


def bodies() -> dict[str, bytes | None]:
    big = {"input_ids": list(range(1000, 1000 + BIG_IDS)), "max_tokens": 1, "stream": False}
    small = {"text_input": "Hi", "max_tokens": 1, "temperature": 0.0, "stream": False}
    return {"health": None, "generate": json.dumps(small).encode(),
            "input_ids_2^20": json.dumps(big).encode()}


def start_guard(upstream: str, log: Path) -> tuple[subprocess.Popen, str]:
    (port,) = free_ports(1)
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "client.http_guard", "--host",
                                 "127.0.0.1", "--port", str(port), "--upstream",
                                 f"http://{upstream}"], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + GUARD_START_S
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://{url}/v2/health/live", timeout=2)
            return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the guard did not start; see {log}")


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
        results[kind] = {path: {"median_ms": statistics.median(t) * MS,
                                "p90_ms": sorted(t)[int(0.9 * (len(t) - 1))] * MS,
                                "n": len(t), "statuses": sorted(statuses[path])}
                         for path, t in times.items()}
    return results


def check_time_ms(metadata_url: str) -> float:
    """The guard's own work on the 2^20-id body: parse + check against the model's inputs."""
    metadata = requests.get(f"http://{metadata_url}/v2/models/slora", timeout=TIMEOUT_S).json()
    datatypes = {i["name"]: i["datatype"] for i in metadata["inputs"]}
    raw = bodies()["input_ids_2^20"]
    runs = []
    for _ in range(CHECK_REPEATS):
        start = time.perf_counter()
        check_generate(parse_body(raw, DEFAULT_MAX_BODY_BYTES), datatypes)
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
        ax.set_xticks([j + 0.2 for j in range(len(paths))], paths)
        ax.set_title(kind)
        ax.set_ylabel("ms")
    axes[0].legend()
    fig.suptitle(f"HTTP guard: direct vs through the guard (check of 2^20 ids alone: "
                 f"{result['check_2^20_ids_ms']:.0f} ms)")
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
        guard = None
        try:
            guard, guard_url = start_guard(urls["http"], Path(tmp) / "guard.log")
            result = {"args": vars(args),
                      "latency": measure({"direct": urls["http"], "guard": guard_url},
                                         args.requests),
                      "check_2^20_ids_ms": check_time_ms(urls["http"])}
        finally:
            if guard is not None:
                guard.terminate()
                guard.wait(timeout=GUARD_START_S)
            stop_server(server)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    for kind, paths in result["latency"].items():
        print(kind, {p: f"{v['median_ms']:.1f} / {v['p90_ms']:.1f} ms, {v['statuses']}"
                     for p, v in paths.items()})
    print(f"guard's check of 2^20 ids: {result['check_2^20_ids_ms']:.0f} ms")


if __name__ == "__main__":
    main()
