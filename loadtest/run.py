"""Headless load test against a running server, with reports.

    python -m loadtest.run --scenario chat --duration 30s --users 8 --host localhost
    python -m loadtest.run --scenario s2 --profile paper --protocol http --set rate=4 --set cv=2

Runs `locust --headless -f loadtest/locustfile.py` as a subprocess for --duration (new arrivals
stop then; requests in flight get --drain seconds to finish), then writes into
loadtest/results/<scenario>-<YYYYmmdd-HHMMSS>/ (or --out):
  locust_stats.csv, locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv,
  report.html      Locust's CSV and HTML report (request types TTFT / ITL / E2E per adapter)
  requests.jsonl   one record per request (adapter, ttft, itl list, e2e, tokens, ok, error, ...)
  summary.json, summary.png   summary and plots (loadtest/report.py)
  scenario.json    the scenario as run (profile and --set applied; loadable with --scenario)
  run.json         the arguments, the adapters and the Locust command line; locust.log
and prints the one-line SUMMARY. Exit status: 0 when requests completed and none failed, 1 when
some failed or none completed, 2 for a bad scenario or arguments, 3 when the server is not ready,
124 when Locust had to be killed (still running long after duration + drain).
Arguments after `--` go to Locust unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from loadtest import report
from loadtest.scenarios import (
    PROFILES,
    PROTOCOLS,
    REPO_ROOT,
    ScenarioError,
    available_scenarios,
    load_scenario,
    parse_override,
    resolve_adapters,
)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")


def parse_duration(text: str) -> int:
    """Seconds from `30`, `30s`, `2m`, `1h30m`, `1m30s`."""
    m = DURATION_RE.match(text.strip())
    if not m or not any(m.groups()):
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 30s, 2m, 1h30m)")
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    seconds = h * 3600 + mi * 60 + s
    if seconds <= 0:
        raise argparse.ArgumentTypeError("duration must be > 0")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.run", description=__doc__.splitlines()[0],
        epilog=f"shipped scenarios: {', '.join(available_scenarios())}")
    p.add_argument("--scenario", default="chat", help="name (loadtest/scenarios/) or path")
    p.add_argument("--duration", type=parse_duration, default=30,
                   help="how long arrivals go on: 30s, 2m, ... (default 30s)")
    p.add_argument("--users", type=int, default=8,
                   help="Locust users = request slots: most requests in flight at once")
    p.add_argument("--host", default="localhost", help="server host (or host:httpport)")
    p.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8000)))
    p.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8001)))
    p.add_argument("--openai-port", type=int, default=int(os.environ.get("OPENAI_PORT", 9000)),
                   help="the OpenAI API's port (protocol openai)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="grpc | http | both | openai (default: the scenario's)")
    p.add_argument("--profile", choices=PROFILES, default="cpu",
                   help="cpu (default) or paper: the scenario's [paper] values")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set rate=2 --set input_len=[8,64]")
    p.add_argument("--slo-ttft", type=float, default=None,
                   help="TTFT SLO in seconds (default: the scenario's, 6 s as in S-LoRA)")
    p.add_argument("--drain", type=float, default=60.0,
                   help="seconds requests in flight may take to finish after --duration")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--wait-ready", type=float, default=30.0,
                   help="seconds to wait for the server's model to be ready")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default loadtest/results/<scenario>-<time>)")
    p.add_argument("locust_args", nargs=argparse.REMAINDER,
                   help="after `--`: extra Locust arguments")
    return p


def wait_ready(hostname: str, http_port: int, grpc_port: int, protocol: str, model: str,
               timeout: float, openai_port: int = 9000) -> str | None:
    """None when the model answers ready on the protocols in use, else what is wrong."""
    import requests
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + timeout
    problem = "not checked"
    while True:
        try:
            if protocol in ("http", "both"):
                url = f"http://{hostname}:{http_port}/v2/models/{model}/ready"
                code = requests.get(url, timeout=5).status_code
                if code != 200:
                    raise RuntimeError(f"GET {url} -> HTTP {code}")
            if protocol in ("grpc", "both"):
                with grpcclient.InferenceServerClient(f"{hostname}:{grpc_port}") as client:
                    if not client.is_model_ready(model, client_timeout=5):
                        raise RuntimeError(f"gRPC {hostname}:{grpc_port}: model not ready")
            if protocol == "openai":  # its /health asks Triton whether the model is ready
                url = f"http://{hostname}:{openai_port}/health"
                code = requests.get(url, timeout=5).status_code
                if code != 200:
                    raise RuntimeError(f"GET {url} -> HTTP {code}")
            return None
        except Exception as exc:  # connection refused, not ready, ...
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        if time.monotonic() >= deadline:
            return problem
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.users < 1:
        print("--users must be >= 1", file=sys.stderr)
        return 2
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        if args.protocol:
            overrides["protocol"] = args.protocol
        if args.slo_ttft:
            overrides["slo_ttft"] = args.slo_ttft
        scenario = load_scenario(args.scenario, args.profile, overrides)
        adapters = resolve_adapters(scenario)
    except ScenarioError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    if scenario.protocol == "both" and args.users < 2:
        print("loadtest: protocol 'both' needs --users >= 2", file=sys.stderr)
        return 2

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or RESULTS_DIR / f"{scenario.name}-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw = out / report.RAW_FILE
    raw.unlink(missing_ok=True)

    hostname = args.host.split("://")[-1].split("/")[0]
    if ":" in hostname:
        hostname, port = hostname.rsplit(":", 1)
        args.http_port = int(port)
    resolved = out / "scenario.json"
    resolved.write_text(json.dumps(scenario.to_dict(), indent=2) + "\n")
    locust_args = [a for a in args.locust_args if a != "--"]
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--users", str(args.users), "--spawn-rate", str(args.users),
        "--run-time", f"{args.duration}s", "--stop-timeout", f"{args.drain:g}",
        "--host", hostname, "--http-port", str(args.http_port),
        "--grpc-port", str(args.grpc_port), "--openai-port", str(args.openai_port),
        "--scenario", str(resolved),  # profile and overrides applied already
        "--request-timeout", f"{args.request_timeout:g}", "--raw-out", str(raw),
        "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "report.html"),
        "--only-summary", "--logfile", str(out / "locust.log"), *locust_args,
    ]
    (out / "run.json").write_text(json.dumps({
        "scenario": args.scenario, "profile": args.profile, "overrides": overrides,
        "adapters": adapters,
        "users": args.users, "duration_s": args.duration, "host": hostname,
        "http_port": args.http_port, "grpc_port": args.grpc_port, "command": cmd,
    }, indent=2) + "\n")

    print(f"loadtest: scenario {scenario.name} ({args.profile}): {scenario.rate:g} req/s, "
          f"cv {scenario.cv:g}, {len(adapters)} adapters, {scenario.protocol}, "
          f"{args.users} users, {args.duration} s -> {out}", flush=True)
    problem = wait_ready(hostname, args.http_port, args.grpc_port, scenario.protocol,
                         scenario.model, args.wait_ready, args.openai_port)
    if problem is not None:
        print(f"loadtest: server not ready ({problem}); start it with `make serve` "
              f"(or pass --host/--http-port/--grpc-port)", file=sys.stderr)
        return 3

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    # Locust ends by itself after duration + drain; a wedged one is killed past a margin.
    limit = args.duration + args.drain + 60
    with subprocess.Popen(cmd, cwd=REPO_ROOT, env=env) as proc:
        try:
            locust_rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            locust_rc = 124
            print(f"loadtest: locust did not finish within {limit:g} s and was killed",
                  file=sys.stderr)

    summary = report.write_report(out, scenario.slo_ttft, scenario.name)
    print(f"loadtest: results in {out}")
    print(report.summary_line(summary), flush=True)
    if locust_rc not in (0, 1):
        print(f"loadtest: locust exited with status {locust_rc} (see {out / 'locust.log'})",
              file=sys.stderr)
        return locust_rc
    if summary["failures"] or not summary["ok"]:
        for error, count in sorted(summary["errors"].items(), key=lambda kv: -kv[1])[:5]:
            print(f"loadtest: {count} x {error}", file=sys.stderr)
        if not summary["ok"]:
            print(f"loadtest: no request completed ({summary['unfinished']} still running at "
                  "the end: a longer --duration or --drain may help)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
