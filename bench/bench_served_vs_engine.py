#!/usr/bin/env python3
"""Served throughput against the engine's: the same request list, in-process and through Triton.

One command builds a model folder and synthetic adapters, runs `LLMEngine` in-process on the
request list (a closed loop of C requests in flight, C = each concurrency measured; in a child
process, so that its GPU memory is free again for the server), then starts the real
tritonserver (scripts/tritonserver.sh) with the SAME engine settings (SLORA_* variables) and
runs bench_server_throughput.py's clients for each mode: gRPC streaming at C streams, and
`stream: false`. Prints requests/s, output tokens/s, the time per output token (TPOT: per
request, (end - first token) / (tokens - 1)) and the ratio served / in-process.

    # CPU: a tiny random Llama (2 layers, hidden 64), 4 adapters + base
    .venv/bin/python bench/bench_served_vs_engine.py --preset cpu
    # GPU host: Llama-7B shape, random fp16 weights, 100 adapters + base (docs/BENCHMARKS.md)
    python bench/bench_served_vs_engine.py --preset gpu --tokenizer TOKENIZER_DIR --out OUT_DIR

Modes are `C` (streaming) or `Cns` (non-streaming), e.g. `--modes 256,256ns,32`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_server_throughput as client_bench  # noqa: E402
from bench_engine_gpu import make_adapters, make_model_dir  # noqa: E402

from slora_backend.model.spec import ModelSpec  # noqa: E402
from slora_testing.servers import free_ports, stop_server  # noqa: E402
from slora_testing.synthetic_adapters import LLAMA7B_CONFIG, make_tiny_model  # noqa: E402

DEFAULT_TOKENIZER = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
READY_TIMEOUT_S = 600.0
POLL_S = 0.5
WARMUP_TOKENS = 2
# the shapes: engine settings (EngineConfig fields) and the client load per preset
PRESETS = {
    "gpu": {"engine": {"load_format": "dummy", "max_num_seqs": 256,
                       "max_num_batched_tokens": 4096, "pool_fraction": 0.8,
                       "max_loaded_adapters": 128},
            "adapters": 100, "requests": 600, "input_tokens": 128, "max_tokens": 128,
            "modes": "256,256ns,32", "procs": 8, "engine_after": False},
    "cpu": {"engine": {"max_num_seqs": 64, "max_num_batched_tokens": 1024,
                       "max_loaded_adapters": 8},
            "adapters": 4, "requests": 256, "input_tokens": 32, "max_tokens": 32,
            # a shared 2-core host: the engine runs before and after the server, and the
            # ratio is taken against the mean of the two
            "modes": "64,64ns,16", "procs": 1, "engine_after": True},
}


@dataclass
class Figures:
    """One run of the request list: in-process or served."""

    how: str
    concurrency: int
    stream: bool
    elapsed_s: float
    requests_per_s: float
    output_tokens_per_s: float
    tpot_p50_s: float | None
    ttft_p50_s: float | None
    completed: int


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                   help="folder with SmolLM2's tokenizer.json (its vocabulary is used)")
    p.add_argument("--modes", help="comma-separated C (streaming) / Cns (non-streaming)")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--out", type=Path, help="folder for the JSON summary and the server log")
    p.add_argument("--skip-engine", action="store_true", help="only the served runs")
    p.add_argument("--repositories", default=str(REPO / "model_repository"),
                   help="comma-separated model repositories, served one after the other "
                        "(A/B: e.g. one holding an older model.py)")
    p.add_argument("--server-only-env", default="",
                   help="extra SLORA_*=V settings for the server alone (A/B runs), comma-separated")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    args.modes = args.modes or preset["modes"]
    args.num_requests = args.num_requests or preset["requests"]
    return args


def parse_modes(text: str) -> list[tuple[int, bool]]:
    """'256,256ns,32' -> [(256, True), (256, False), (32, True)]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        stream = not item.endswith("ns")
        out.append((int(item.removesuffix("ns")), stream))
    return out


def build_model(preset: str, tokenizer: Path, root: Path, num_adapters: int) -> tuple[Path, Path]:
    """The model folder and the adapter folder of the preset."""
    if preset == "gpu":
        vocab = _vocab_size(tokenizer)
        config = dict(LLAMA7B_CONFIG, vocab_size=vocab)
        model_dir = make_model_dir(root, tokenizer, config)
    else:
        model_dir = make_tiny_model(root / "model", tokenizer)
        config = json.loads((model_dir / "config.json").read_text())
    adapter_dir = root / "adapters"
    adapter_dir.mkdir()
    make_adapters(adapter_dir, ModelSpec.from_hf_config(config), num_adapters, [8, 16, 32, 64])
    return model_dir, adapter_dir


def _vocab_size(tokenizer: Path) -> int:
    data = json.loads((tokenizer / "tokenizer.json").read_text())
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


# ---------------------------------------------------------------------------- in-process
def engine_worker(settings: dict, reqs: list, max_tokens: int, concurrencies: list[int],
                  results: mp.Queue) -> None:
    """In a child process: build the engine, warm every adapter up, then one closed-loop run
    of the request list per concurrency."""
    from slora_backend import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(**settings))
    warm = [client_bench.Request(-1 - i, a, "Warm up: say hello.")
            for i, a in enumerate(sorted({r.adapter for r in reqs}))]
    closed_loop(engine, warm, WARMUP_TOKENS, len(warm), SamplingParams, "warm-up")
    for c in concurrencies:
        results.put(asdict(closed_loop(engine, reqs, max_tokens, c, SamplingParams,
                                       f"in-process c={c}")))
    engine.close()


def closed_loop(engine, reqs: list, max_tokens: int, concurrency: int, params_cls,
                desc: str) -> Figures:
    """C requests in flight; a finished one is replaced at once (as the clients do)."""
    pending = deque(reqs)
    start, first, done = {}, {}, {}

    def submit() -> None:
        r = pending.popleft()
        start[str(r.index)] = time.monotonic()
        engine.add_request(str(r.index), prompt=r.prompt, adapter_id=r.adapter or None,
                           params=params_cls(max_tokens=max_tokens, temperature=0.0,
                                             ignore_eos=True))

    t0 = time.monotonic()
    for _ in range(min(concurrency, len(pending))):
        submit()
    with tqdm(total=len(reqs), desc=desc, unit="req") as bar:
        while engine.has_unfinished():
            for out in engine.step():
                now = time.monotonic()
                if out.new_token_ids and out.request_id not in first:
                    first[out.request_id] = now
                if out.finished:
                    if out.error is not None:
                        raise RuntimeError(f"request {out.request_id}: {out.error}")
                    done[out.request_id] = (now, out.num_output_tokens)
                    bar.update(1)
                    if pending:
                        submit()
    elapsed = max(end for end, _ in done.values()) - t0
    tokens = sum(n for _, n in done.values())
    tpot = [(end - first[i]) / (n - 1) for i, (end, n) in done.items() if n > 1]
    ttft = [first[i] - start[i] for i in done]
    return Figures("in-process", concurrency, True, elapsed, len(done) / elapsed,
                   tokens / elapsed, _p50(tpot), _p50(ttft), len(done))


def _p50(values: list[float]) -> float | None:
    return client_bench.percentiles(values).get("p50") if values else None


def run_in_process(settings: dict, reqs: list, max_tokens: int,
                   concurrencies: list[int]) -> dict[int, Figures]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=engine_worker,
                       args=(settings, reqs, max_tokens, concurrencies, results))
    proc.start()
    out = {}
    while len(out) < len(concurrencies):
        if not proc.is_alive() and results.empty():
            raise RuntimeError(f"the in-process engine died (exit {proc.exitcode})")
        try:
            fig = Figures(**results.get(timeout=POLL_S))
        except Exception:  # queue.Empty: keep waiting while the child lives
            continue
        out[fig.concurrency] = fig
    proc.join()
    return out


# ---------------------------------------------------------------------------- served
def server_env(settings: dict, extra: str) -> dict[str, str]:
    env = {f"SLORA_{k.upper()}": str(v) for k, v in settings.items()}
    for item in filter(None, (s.strip() for s in extra.split(","))):
        key, _, value = item.partition("=")
        env[key] = value
    return {**os.environ, **env}


def start_server(env: dict[str, str], log: Path,
                 repository: Path) -> tuple[subprocess.Popen, str, str]:
    """scripts/tritonserver.sh on free ports; (process, gRPC url, HTTP url) once ready."""
    http, grpc, metrics = free_ports(3)
    cmd = [str(REPO / "scripts" / "tritonserver.sh"), "--model-repository",
           str(repository), "--http-port", str(http), "--grpc-port", str(grpc),
           "--metrics-port", str(metrics), "--exit-timeout-secs", "10"]
    if env.get("TRITON_BACKENDS"):  # the GPU host (../shared/device/gpu-setup.sh)
        cmd += ["--backend-directory", env["TRITON_BACKENDS"]]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://localhost:{http}/v2/health/ready", timeout=2):
                return proc, f"localhost:{grpc}", f"localhost:{http}"
        except OSError:  # refused, or 400 while models load
            time.sleep(POLL_S)
    stop_server(proc)
    raise RuntimeError(f"tritonserver did not become ready:\n{log.read_text()[-4000:]}")


def run_served(url: str, args: argparse.Namespace, adapters: list[str], adapter_dir: Path,
               concurrency: int, stream: bool, warmup: bool, label: str) -> Figures:
    preset = PRESETS[args.preset]
    argv = ["--url", url, "--concurrency", str(concurrency), "--num-requests",
            str(args.num_requests), "--max-tokens", str(preset["max_tokens"]),
            "--input-tokens", str(preset["input_tokens"]), "--adapters", ",".join(adapters),
            "--adapter-dir", str(adapter_dir), "--procs", str(preset["procs"]),
            "--warmup-tokens", str(WARMUP_TOKENS)]
    argv += [] if stream else ["--no-stream"]
    argv += [] if warmup else ["--no-warmup"]
    s = client_bench.run(client_bench.parse_args(argv))
    if s.failed or s.errors or s.wrong_length:
        raise RuntimeError(f"served run c={concurrency} stream={stream} failed: {s.errors}")
    return Figures(f"served {label}", concurrency, stream, s.elapsed_s, s.requests_per_s,
                   s.output_tokens_per_s, s.tpot_s.get("p50"), s.ttft_s.get("p50"), s.completed)


def served_runs(args: argparse.Namespace, settings: dict, adapters: list[str],
                adapter_dir: Path, modes: list[tuple[int, bool]], out: Path) -> list[Figures]:
    """Each model repository in turn: start the server, run every mode, stop it."""
    served = []
    for n, repository in enumerate(Path(r) for r in args.repositories.split(",")):
        proc, grpc_url, _ = start_server(server_env(settings, args.server_only_env),
                                         out / f"server{n}.log", repository)
        try:
            served += [run_served(grpc_url, args, adapters, adapter_dir, c, stream, i == 0,
                                  f"{n}:{repository.parent.name}")
                       for i, (c, stream) in enumerate(modes)]
        finally:
            stop_server(proc)
    return served


def mean_figures(runs: list[Figures]) -> Figures:
    """The mean of in-process runs of one concurrency (rates and TPOT averaged)."""
    if len(runs) == 1:
        return runs[0]
    mean = lambda name: sum(getattr(r, name) for r in runs) / len(runs)  # noqa: E731
    return dataclasses.replace(
        runs[0], elapsed_s=mean("elapsed_s"), requests_per_s=mean("requests_per_s"),
        output_tokens_per_s=mean("output_tokens_per_s"), tpot_p50_s=mean("tpot_p50_s"),
        ttft_p50_s=mean("ttft_p50_s"))


def report(engine: dict[int, Figures], served: list[Figures]) -> list[str]:
    fmt = "{:>24} {:>5} {:>6} | {:>7} {:>9} {:>8} | {:>7} {:>9} {:>8} | {:>5} {:>6}"
    lines = [fmt.format("served by", "conc", "mode", "eng r/s", "eng tok/s", "eng TPOT", "srv r/s",
                        "srv tok/s", "srv TPOT", "ratio", "TPOT x")]
    for s in served:
        e = engine.get(s.concurrency)
        ratio = f"{s.output_tokens_per_s / e.output_tokens_per_s:.0%}" if e else "-"
        tpot_x = (f"{s.tpot_p50_s / e.tpot_p50_s:.2f}" if e and s.tpot_p50_s and e.tpot_p50_s
                  else "-")
        ms = lambda v: f"{1e3 * v:.1f}ms" if v else "-"  # noqa: E731
        lines.append(fmt.format(
            s.how.removeprefix("served ")[-24:], s.concurrency, "stream" if s.stream else "no-str",
            f"{e.requests_per_s:.1f}" if e else "-", f"{e.output_tokens_per_s:.0f}" if e else "-",
            ms(e.tpot_p50_s) if e else "-", f"{s.requests_per_s:.1f}",
            f"{s.output_tokens_per_s:.0f}", ms(s.tpot_p50_s), ratio, tpot_x))
    return lines


def plot(engine: dict[int, Figures], served: list[Figures], title: str, path: Path) -> None:
    """Output tokens/s per mode: in-process, then each served repository (% of in-process)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys((s.concurrency, s.stream) for s in served))
    hows = list(dict.fromkeys(s.how for s in served))
    series = [("in-process", [engine[c].output_tokens_per_s if c in engine else 0
                              for c, _ in modes])]
    series += [(how, [next((s.output_tokens_per_s for s in served if s.how == how
                            and (s.concurrency, s.stream) == m), 0) for m in modes])
               for how in hows]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(modes), 4.2))
    for i, (label, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(modes))]
        bars = ax.bar(xs, values, width, label=label)
        for (c, _), bar in zip(modes, bars):
            if i and c in engine and bar.get_height():
                ratio = bar.get_height() / engine[c].output_tokens_per_s
                ax.annotate(f"{ratio:.0%}", (bar.get_x() + bar.get_width() / 2,
                                             bar.get_height()), ha="center", va="bottom",
                            fontsize=8)
    ax.set_xticks(range(len(modes)), [f"{c} {'streams' if st else 'non-streaming'}"
                                      for c, st in modes])
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    args = parse_args()
    preset = PRESETS[args.preset]
    modes = parse_modes(args.modes)
    out = args.out or Path(tempfile.mkdtemp(prefix="served-vs-engine-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="served-vs-engine-") as tmp:
        model_dir, adapter_dir = build_model(args.preset, args.tokenizer, Path(tmp),
                                             preset["adapters"])
        adapters = client_bench.discover_adapters(adapter_dir) + [""]
        reqs = client_bench.make_requests(args.num_requests, adapters, preset["input_tokens"], 0)
        settings = {**preset["engine"], "model": str(model_dir), "adapter_dir": str(adapter_dir)}
        concurrencies = sorted({c for c, _ in modes})
        runs = [] if args.skip_engine else [
            run_in_process(settings, reqs, preset["max_tokens"], concurrencies)]
        served = served_runs(args, settings, adapters, adapter_dir, modes, out)
        if runs and preset["engine_after"]:
            runs.append(run_in_process(settings, reqs, preset["max_tokens"], concurrencies))
    engine = {c: mean_figures([run[c] for run in runs]) for c in concurrencies} if runs else {}
    lines = report(engine, served)
    lines += [f"in-process c={c}: "
              + " / ".join(f"{run[c].output_tokens_per_s:.0f}" for run in runs)
              + " output tok/s (before / after the server)" for c in concurrencies if len(runs) > 1]
    print("\n".join(lines))
    try:
        plot(engine, served, f"served vs in-process, preset {args.preset}, "
             f"{args.num_requests} requests", out / "served_vs_engine.png")
    except ImportError as exc:  # no matplotlib (a bare GPU image): the table is enough
        print(f"no plot: {exc}")
    (out / "served_vs_engine.json").write_text(json.dumps(
        {"preset": args.preset, "requests": args.num_requests, "settings": preset,
         "in_process_runs": [[asdict(f) for f in run.values()] for run in runs],
         "served": [asdict(f) for f in served], "table": lines}, indent=2) + "\n")
    print(f"results: {out / 'served_vs_engine.json'}, server logs {out}/server*.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
