"""Soak the real server: mixed load with cancels, errors and adapter churn; record the RSS of
its processes (tritonserver, the Python backend stub, the engine core) and the pool's pages
over time (JSON + PNG). After warm-up all must stay flat (issue 17, item 7).

    python bench/soak_server.py --duration 1800 --out docs/results/soak_cpu

The server is scripts/tritonserver.sh on free ports with its own adapter directory: --adapters
copies of the demo `pirate` adapter (hard links: real PEFT files, distinct ids), so the host
cache and the pool keep loading and evicting (small max_loaded_adapters / host_cache_bytes).
Each user thread loops over a request mix: base, adapter, cancelled after the first token, and
refusals (bad parameter, unknown adapter, bad adapter config, and hostile: huge prompts, deep
JSON, 2^20 input ids).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import requests
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client import ClientError, stream_grpc_values  # noqa: E402
from slora_testing.servers import start_tritonserver, stop_server  # noqa: E402
from slora_testing.synthetic_adapters import link_adapter  # noqa: E402

DEMO_ADAPTER = REPO / "adapters" / "pirate"
STUB_NAME = "triton_python_backend_stub"
PROCESSES = ("tritonserver", "stub", "engine_core")
MIB = 1 << 20
STOP_TIMEOUT_S = 60.0
RESPONSE_TIMEOUT_S = 120.0
# (weight, kind) of the request mix
MIX = ((3, "base"), (4, "adapter"), (2, "cancel"), (1, "bad_param"), (1, "unknown_adapter"),
       (1, "bad_adapter"), (1, "hostile"))
# hostile requests, all refused, each moving a large input through the stub and the core: a
# prompt over the byte bound (refused before tokenizing), one under it but too many tokens
# (tokenized, then refused), deeply nested sampling_parameters, 2^20 input_ids (4 MiB tensor)
HOSTILE = {"huge_prompt": {"text_input": "pirate " * (1 << 18)},
           "long_prompt": {"text_input": "ship " * 100_000},
           "deep_json": {"text_input": "Hi", "sampling_parameters": "[" * 50_000 + "]" * 50_000},
           "many_ids": {"input_ids": [7] * (1 << 20)}}
SERVER_ENV = {"SLORA_MAX_LOADED_ADAPTERS": "4", "SLORA_HOST_CACHE_BYTES": str(64 * MIB),
              "SLORA_MAX_NUM_SEQS": "8"}
PROMPTS = ("Why is the sky blue?", "Tell me about ships.", "Write a haiku about rain.")


def make_adapter_dir(root: Path, count: int) -> list[str]:
    """`count` hard-linked copies of the demo adapter and one with a broken config."""
    names = []
    for i in range(count):
        names.append(link_adapter(DEMO_ADAPTER, root / f"soak-{i:04d}").name)
    broken = root / "broken"
    shutil.copytree(DEMO_ADAPTER, broken)
    (broken / "adapter_config.json").write_text("[" * 50_000)
    return names


def request_values(kind: str, rng: random.Random, adapters: list[str]) -> dict[str, Any]:
    if kind == "hostile":
        return {**HOSTILE[rng.choice(sorted(HOSTILE))], "max_tokens": 4}
    values: dict[str, Any] = {"text_input": rng.choice(PROMPTS), "chat": True,
                              "max_tokens": rng.randint(4, 32), "temperature": 0.0}
    if kind in ("adapter", "cancel"):
        values["adapter_id"] = rng.choice(adapters)
    elif kind == "bad_param":
        values["top_p"] = 7.0
    elif kind == "unknown_adapter":
        values["adapter_id"] = "no-such-adapter"
    elif kind == "bad_adapter":
        values["adapter_id"] = "broken"
    return values


def user(grpc_url: str, adapters: list[str], kinds: list[str], seed: int,
         stop: threading.Event, counts: dict[str, int], lock: threading.Lock) -> None:
    """Requests one after another, each of a kind drawn from `kinds` (repeats = weights)."""
    rng = random.Random(seed)
    while not stop.is_set():
        kind = rng.choice(kinds)
        outcome = "ok"
        try:
            for _ in stream_grpc_values(grpc_url, request_values(kind, rng, adapters),
                                        timeout=RESPONSE_TIMEOUT_S):
                if kind == "cancel":
                    break  # leaving the stream cancels the request (stop_stream)
        except ClientError:
            outcome = "refused"
        with lock:
            counts[f"{kind}:{outcome}"] = counts.get(f"{kind}:{outcome}", 0) + 1


def rss_mib(server_pid: int) -> dict[str, float]:
    """RSS (MiB) of tritonserver, its Python backend stub and the stub's engine core process
    (the engine runs there, slora_backend/serving); a process not found is left out."""
    rss: dict[str, float] = {}
    try:
        server = psutil.Process(server_pid)
        rss["tritonserver"] = server.memory_info().rss / MIB
        for stub in server.children():
            if stub.name().startswith(STUB_NAME[:15]):
                rss["stub"] = stub.memory_info().rss / MIB
                for child in stub.children():  # multiprocessing's spawn: the core
                    if any("spawn_main" in arg for arg in child.cmdline()):
                        rss["engine_core"] = child.memory_info().rss / MIB
    except psutil.Error:
        pass
    return rss


def growth_mib_per_min(samples: list[dict[str, Any]], name: str, warmup_s: float) -> float:
    """Least-squares slope of a process's RSS after warm-up, MiB per minute."""
    points = [(s["t_s"] / 60, s["rss_mib"][name]) for s in samples
              if s["t_s"] >= warmup_s and name in s["rss_mib"]]
    if len(points) < 2:
        return float("nan")
    mean_t = sum(t for t, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / var


def pool_pages(metrics_url: str) -> dict[str, float]:
    pages = {}
    for line in requests.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("slora_pool_pages{"):
            kind = line.split('kind="')[1].split('"')[0]
            pages[kind] = float(line.rsplit(" ", 1)[1])
    return pages


def server_pid(proc: subprocess.Popen) -> int:
    """tritonserver's pid (scripts/tritonserver.sh runs it as its child)."""
    children = psutil.Process(proc.pid).children()
    return children[0].pid if children else proc.pid


def soak(args: argparse.Namespace, adapter_dir: Path) -> dict[str, Any]:
    adapters = make_adapter_dir(adapter_dir, args.adapters)
    proc, urls = start_tritonserver(Path(args.out).with_suffix(".server.log"),
                                    {**SERVER_ENV, "SLORA_ADAPTER_DIR": str(adapter_dir)})
    stop, lock = threading.Event(), threading.Lock()
    counts: dict[str, int] = {}
    kinds = [k for w, k in MIX for _ in range(w) if k in args.kinds]
    users = [threading.Thread(target=user, args=(urls["grpc"], adapters, kinds, i, stop, counts,
                                                 lock), daemon=True) for i in range(args.users)]
    samples = []
    try:
        pid = server_pid(proc)
        for thread in users:
            thread.start()
        start = time.monotonic()
        with tqdm(total=int(args.duration), unit="s", desc="soak") as bar:
            while (elapsed := time.monotonic() - start) < args.duration:
                with lock:
                    done = sum(counts.values())
                samples.append({"t_s": round(elapsed, 1), "rss_mib": rss_mib(pid),
                                "pool_pages": pool_pages(urls["metrics"]), "requests": done})
                time.sleep(args.interval)
                bar.n = min(int(time.monotonic() - start), int(args.duration))
                bar.refresh()
    finally:
        stop.set()
        for thread in users:
            thread.join(RESPONSE_TIMEOUT_S)
        stop_server(proc, STOP_TIMEOUT_S)
    return {"args": vars(args), "server_env": SERVER_ENV, "counts": counts, "samples": samples}


def plot(result: dict[str, Any], png: Path) -> None:
    """One panel per process's RSS (each on its own scale) and one for the pool's pages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(len(PROCESSES) + 1, 1, figsize=(9, 9), sharex=True)
    for ax, name in zip(axes, PROCESSES, strict=False):
        ax.plot(t, [s["rss_mib"].get(name, float("nan")) for s in samples])
        ax.set_ylabel(f"{name}\nRSS (MiB)")
        slope = result.get("growth_mib_per_min", {}).get(name)
        if slope is not None:
            ax.set_title(f"after warm-up {slope:+.2f} MiB/min", fontsize=9, loc="right")
    ax_pool = axes[-1]
    for kind in ("kv", "lora", "free"):
        ax_pool.plot(t, [s["pool_pages"].get(kind, 0) for s in samples], label=kind)
    ax_pool.set_ylabel("pool pages")
    ax_pool.set_xlabel("minutes")
    ax_pool.legend()
    for ax in axes:
        ax.axvline(result["args"]["warmup"] / 60, color="grey", linestyle=":")
    kinds = result["args"].get("kinds", [k for _, k in MIX])
    mix = "the full mix" if set(kinds) == {k for _, k in MIX} else "only " + ", ".join(kinds)
    fig.suptitle(f"soak: {sum(result['counts'].values())} requests, {result['args']['users']} "
                 f"users, {result['args']['adapters']} adapters\nkinds: {mix}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png)


def summarize(result: dict[str, Any]) -> None:
    warmup = result["args"]["warmup"]
    print(f"requests {result['counts']}")
    for name in PROCESSES:
        rss = [s["rss_mib"][name] for s in result["samples"] if name in s["rss_mib"]]
        after = [s["rss_mib"][name] for s in result["samples"]
                 if name in s["rss_mib"] and s["t_s"] >= warmup]
        if rss and after:
            print(f"{name} RSS MiB: first {rss[0]:.0f}, at warm-up end {after[0]:.0f}, "
                  f"max {max(rss):.0f}, last {rss[-1]:.0f}; after warm-up "
                  f"{result['growth_mib_per_min'][name]:+.2f} MiB/min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds (default 30 min)")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--kinds", default=",".join(k for _, k in MIX),
                        help="the request kinds of the mix to use (default: all)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=120.0,
                        help="seconds left out of the growth figures")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "soak_cpu"),
                        help="output prefix: .json, .png, .server.log")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw OUT.png from OUT.json (no run)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.plot_only:
        result = json.loads(out.with_suffix(".json").read_text())
    else:
        args.kinds = args.kinds.split(",")
        unknown = set(args.kinds) - {k for _, k in MIX}
        if unknown:
            parser.error(f"unknown kinds {sorted(unknown)}")
        with tempfile.TemporaryDirectory(prefix="soak-adapters-") as tmp:
            result = soak(args, Path(tmp))
        result["growth_mib_per_min"] = {
            name: round(growth_mib_per_min(result["samples"], name, args.warmup), 3)
            for name in PROCESSES}
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    summarize(result)


if __name__ == "__main__":
    main()
