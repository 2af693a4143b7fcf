#!/usr/bin/env python3
"""Client-side throughput of a running S-LoRA Triton server (gRPC streaming).

N concurrent clients, each with its own gRPC stream and one request in flight at a time
(closed loop), work through a FIXED list of requests: prompts of a set length, a fixed
number of output tokens (`ignore_eos`, so every request produces exactly --max-tokens
tokens), adapters assigned round-robin. The timed window starts when every client is
connected and warmed up, and ends when the last request finishes.

Reports requests/s and output tokens/s (plus TTFT / end-to-end percentiles per adapter) and,
for the record, the server's instance groups as the server reports them.

Used for the multi-GPU check: the same command against a server with one engine instance
(one visible GPU) and with two (two GPUs). Examples:

    python bench/bench_server_throughput.py --url localhost:8001 --concurrency 64 \
        --num-requests 512 --max-tokens 128 --input-tokens 128 --procs 4 --out result.json
    python bench/bench_server_throughput.py --concurrency 2 --num-requests 4 --max-tokens 4

Clients run in --procs processes (threads inside each) so the Python client is not the
bottleneck when the server streams many thousands of tokens per second; the summary shows
the client's CPU time so a saturated client is visible.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import random
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Words used to synthesize prompts; any text works, the length is what matters.
_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly box "
    "jackdaws near old rivers under bright summer stars and tell long stories"
).split()


@dataclass
class Request:
    index: int
    adapter: str  # "" = base model
    prompt: str


@dataclass
class Record:
    index: int
    adapter: str
    ok: bool
    start: float = 0.0  # time.monotonic() (system-wide clock on Linux: comparable across procs)
    first: float | None = None
    end: float = 0.0
    output_tokens: int = 0
    finish_reason: str = ""
    error: str = ""


@dataclass
class Summary:
    url: str
    model: str
    concurrency: int
    procs: int
    num_requests: int
    max_tokens: int
    input_tokens: int
    adapters: list[str]
    completed: int = 0
    failed: int = 0
    wrong_length: int = 0
    elapsed_s: float = 0.0
    requests_per_s: float = 0.0
    output_tokens: int = 0
    output_tokens_per_s: float = 0.0
    stream: bool = True
    ttft_s: dict = field(default_factory=dict)
    e2e_s: dict = field(default_factory=dict)
    tpot_s: dict = field(default_factory=dict)  # per request: (end - first) / (tokens - 1)
    per_adapter: dict = field(default_factory=dict)
    client_cpu_s: float = 0.0
    server_instance_groups: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def discover_adapters(adapter_dir: Path) -> list[str]:
    """Folder names under adapter_dir that hold a PEFT adapter (adapter_config.json)."""
    if not adapter_dir.is_dir():
        return []
    return sorted(p.parent.name for p in adapter_dir.glob("*/adapter_config.json"))


def make_requests(n: int, adapters: list[str], input_tokens: int, seed: int) -> list[Request]:
    """The fixed request list: adapters round-robin, synthetic prompts of ~input_tokens
    tokens (one short word is about one token for the SmolLM2 tokenizer)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(max(1, input_tokens - 8))]
        prompt = f"Request {i}. Continue this text: " + " ".join(words)
        out.append(Request(i, adapters[i % len(adapters)], prompt))
    return out


def build_inputs(grpcclient, req: Request, max_tokens: int, stream: bool = True):
    import numpy as np

    def tensor(name, dtype, value, np_dtype):
        arr = np.array(value, dtype=np_dtype)
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    inputs = [
        tensor("text_input", "BYTES", [req.prompt.encode()], np.object_),
        tensor("max_tokens", "INT32", [max_tokens], np.int32),
        tensor("ignore_eos", "BOOL", [True], np.bool_),
        tensor("stream", "BOOL", [stream], np.bool_),
        tensor("temperature", "FP32", [0.0], np.float32),
    ]
    if req.adapter:
        inputs.append(tensor("adapter_id", "BYTES", [req.adapter.encode()], np.object_))
    return inputs


class StreamClient:
    """One gRPC stream with at most one request in flight."""

    def __init__(self, url: str, model: str, max_tokens: int, timeout_s: float,
                 stream: bool = True):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.model = model
        self.max_tokens = max_tokens
        self.stream = stream
        self.timeout_s = timeout_s
        self.client = grpcclient.InferenceServerClient(url=url)
        self._events: queue.Queue = queue.Queue()
        self._pending = False  # a request in flight (not yet its final response)
        self.client.start_stream(callback=self._on_response)

    def _on_response(self, result, error):
        self._events.put((time.monotonic(), result, error))

    def run(self, req: Request, max_tokens: int | None = None) -> Record:
        rec = Record(req.index, req.adapter, ok=False)
        inputs = build_inputs(self._grpc, req, max_tokens or self.max_tokens, self.stream)
        rec.start = time.monotonic()
        self._pending = True
        self.client.async_stream_infer(
            self.model, inputs, request_id=str(req.index), enable_empty_final_response=True
        )
        deadline = rec.start + self.timeout_s
        while True:
            try:
                t, result, error = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                rec.end, rec.error = time.monotonic(), f"timeout after {self.timeout_s}s"
                return rec
            if error is not None:
                self._pending = False  # the model's errors are final responses
                rec.end, rec.error = t, str(error)
                return rec
            ids = result.as_numpy("output_ids")
            if ids is not None and ids.size:
                if rec.first is None:
                    rec.first = t
                rec.output_tokens += int(ids.size)
            reason = result.as_numpy("finish_reason")
            if reason is not None and reason.size:
                rec.finish_reason = _text(reason.reshape(-1)[0])
            n_out = result.as_numpy("num_output_tokens")
            if n_out is not None and n_out.size:
                # the server's count is authoritative (a response may carry no output_ids)
                rec.output_tokens = max(rec.output_tokens, int(n_out.reshape(-1)[0]))
            params = result.get_response().parameters
            if "triton_final_response" in params and params["triton_final_response"].bool_param:
                self._pending = False
                rec.end, rec.ok = t, True
                return rec

    def close(self):
        # cancel only a request still running (client.close_stream says why)
        self.client.stop_stream(cancel_requests=self._pending)
        self.client.close()


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _worker(args, reqs: list[Request], threads: int, counter, ready, start, results):
    """One process: `threads` clients pulling request indices from the shared counter.
    Puts exactly one message on `results`: ("done", records, cpu_s) or ("error", message)."""
    clients: list[StreamClient] = []
    try:
        clients = [StreamClient(args.url, args.model, args.max_tokens, args.request_timeout,
                                args.stream) for _ in range(threads)]
        # warm-up (untimed): one request per adapter, so that first-use costs (adapter load,
        # kernel compilation) are not in the timed window
        for adapter in (args.adapters if args.warmup else []):
            rec = clients[0].run(Request(-1, adapter, "Warm up: say hello."),
                                 args.warmup_tokens)
            if not rec.ok:
                raise RuntimeError(f"warm-up with adapter {adapter!r} failed: {rec.error}")
    except Exception as e:
        results.put(("error", f"{type(e).__name__}: {e}"))
        ready.release()
        for c in clients:
            c.close()
        return
    ready.release()
    start.wait()
    records: list[Record] = []
    lock = threading.Lock()

    def loop(client: StreamClient):
        while True:
            with counter.get_lock():
                i = counter.value
                if i >= len(reqs):
                    return
                counter.value = i + 1
            try:
                rec = client.run(reqs[i])
            except Exception as e:  # e.g. the stream broke: record it, keep going
                rec = Record(i, reqs[i].adapter, ok=False, start=time.monotonic(),
                             end=time.monotonic(), error=f"{type(e).__name__}: {e}")
            with lock:
                records.append(rec)

    pool = [threading.Thread(target=loop, args=(c,)) for c in clients]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for c in clients:
        c.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.put(("done", [asdict(r) for r in records], usage.ru_utime + usage.ru_stime))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)

    def p(q):
        return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]

    return {"mean": sum(v) / len(v), "p50": p(50), "p90": p(90), "p99": p(99), "max": v[-1]}


def summarize(args, records: list[Record], t0: float, cpu_s: float, errors: list[str]) -> Summary:
    s = Summary(args.url, args.model, args.concurrency, args.procs, args.num_requests,
                args.max_tokens, args.input_tokens, args.adapters)
    ok = [r for r in records if r.ok]
    s.completed = len(ok)
    s.failed = args.num_requests - s.completed  # failed or never sent
    s.wrong_length = sum(1 for r in ok if r.output_tokens != args.max_tokens)
    end = max((r.end for r in records), default=t0)
    s.elapsed_s = max(end - t0, 1e-9)
    s.output_tokens = sum(r.output_tokens for r in ok)
    s.requests_per_s = s.completed / s.elapsed_s
    s.output_tokens_per_s = s.output_tokens / s.elapsed_s
    s.ttft_s = percentiles([r.first - r.start for r in ok if r.first is not None])
    s.e2e_s = percentiles([r.end - r.start for r in ok])
    s.stream = args.stream
    s.tpot_s = percentiles([(r.end - r.first) / (r.output_tokens - 1) for r in ok
                            if r.first is not None and r.end > r.first and r.output_tokens > 1])
    for name in args.adapters:
        mine = [r for r in ok if r.adapter == name]
        s.per_adapter[name or "<base>"] = {
            "completed": len(mine),
            "output_tokens": sum(r.output_tokens for r in mine),
            "ttft_p50_s": percentiles([r.first - r.start for r in mine
                                       if r.first is not None]).get("p50"),
            "e2e_p50_s": percentiles([r.end - r.start for r in mine]).get("p50"),
        }
    s.client_cpu_s = cpu_s
    s.errors = errors + [f"request {r.index} ({r.adapter or '<base>'}): {r.error}"
                         for r in records if not r.ok][:20]
    return s


def server_instance_groups(url: str, model: str) -> list:
    """The model's instance groups as the server resolved them (kind, count, gpus)."""
    try:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(url=url) as c:
            cfg = c.get_model_config(model, as_json=True)["config"]
        return [{k: g.get(k) for k in ("kind", "count", "gpus")}
                for g in cfg.get("instance_group", [])]
    except Exception as e:  # informational only
        return [f"unavailable: {e}"]


def run(args) -> Summary:
    reqs = make_requests(args.num_requests, args.adapters, args.input_tokens, args.seed)
    procs = max(1, min(args.procs, args.concurrency))
    per_proc = [args.concurrency // procs + (1 if i < args.concurrency % procs else 0)
                for i in range(procs)]
    ctx = mp.get_context("spawn")  # no gRPC state is shared across a fork
    counter, ready, start, results = ctx.Value("l", 0), ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(args, reqs, n, counter, ready, start, results))
               for n in per_proc]
    for w in workers:
        w.start()
    errors: list[str] = []
    records: list[Record] = []
    cpu_s = 0.0
    reports = 0

    def take(msg):
        nonlocal reports, cpu_s, records
        reports += 1
        if msg[0] == "error":
            errors.append(msg[1])
        else:
            records += [Record(**r) for r in msg[1]]
            cpu_s += msg[2]

    n_ready = 0  # every process connected and warmed up (a failed one releases too)
    while n_ready < len(workers):
        if ready.acquire(timeout=0.5):
            n_ready += 1
        elif not any(w.is_alive() for w in workers):
            break
    while not results.empty():
        take(results.get())
    if errors:  # no timed run: let the others exit at once
        with counter.get_lock():
            counter.value = len(reqs)
    t0 = time.monotonic()
    start.set()
    while reports < len(workers):
        try:
            take(results.get(timeout=1.0))
        except queue.Empty:
            if not any(w.is_alive() for w in workers) and results.empty():
                errors.append("a client process died without reporting")
                break
    for w in workers:
        w.join(timeout=30)
        if w.is_alive():
            w.terminate()
    s = summarize(args, records, t0, cpu_s, errors)
    s.server_instance_groups = server_instance_groups(args.url, args.model)
    s.procs = procs
    return s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=f"localhost:{os.environ.get('GRPC_PORT', '8001')}",
                   help="gRPC host:port of the server (default localhost:$GRPC_PORT or 8001)")
    p.add_argument("--model", default="slora")
    p.add_argument("--concurrency", "-c", type=int, default=8, help="concurrent clients")
    p.add_argument("--num-requests", "-n", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--input-tokens", type=int, default=32, help="approximate prompt length")
    p.add_argument("--adapters", default=None,
                   help="comma-separated adapter ids; an empty item ('') is the base model "
                        "(default: every adapter under --adapter-dir, plus the base model)")
    p.add_argument("--adapter-dir", default=str(REPO / "adapters"))
    p.add_argument("--procs", type=int, default=1, help="client processes (threads inside)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--warmup-tokens", type=int, default=None,
                   help="output tokens of each warm-up request (default --max-tokens)")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="stream: false (one response per request) instead of one per token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON summary here")
    p.add_argument("--json", action="store_true", help="print the JSON summary to stdout")
    args = p.parse_args(argv)
    if args.adapters is None:
        args.adapters = discover_adapters(Path(args.adapter_dir)) + [""]
    else:
        args.adapters = list(dict.fromkeys(a.strip() for a in args.adapters.split(",")))
    if args.concurrency < 1 or args.num_requests < 1 or args.max_tokens < 1:
        p.error("--concurrency, --num-requests and --max-tokens must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    s = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(asdict(s), indent=2) + "\n")
    if args.json:
        print(json.dumps(asdict(s), indent=2))
    ttft, e2e = s.ttft_s.get("p50", float("nan")), s.e2e_s.get("p50", float("nan"))
    print(f"{s.completed}/{s.num_requests} requests in {s.elapsed_s:.2f}s: "
          f"{s.requests_per_s:.2f} req/s, {s.output_tokens_per_s:.1f} output tok/s "
          f"(concurrency {s.concurrency}, {s.procs} procs, max_tokens {s.max_tokens}, "
          f"adapters {len(s.adapters)}); TTFT p50 {ttft:.3f}s, E2E p50 {e2e:.3f}s; "
          f"client CPU {s.client_cpu_s:.1f}s; instances {s.server_instance_groups}",
          file=sys.stderr if args.json else sys.stdout)
    for e in s.errors:
        print("error:", e, file=sys.stderr)
    if s.wrong_length:
        print(f"warning: {s.wrong_length} requests did not produce exactly "
              f"{s.max_tokens} tokens", file=sys.stderr)
    return 0 if s.failed == 0 and not s.errors else 1


if __name__ == "__main__":
    sys.exit(main())
