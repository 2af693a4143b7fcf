"""Summary and plots from the per-request records (requests.jsonl, records.RequestRecord).

    python -m loadtest.report loadtest/results/<run>/ [--slo-ttft 6]   # (re)write the report

Writes summary.json and summary.png next to requests.jsonl and prints the one-line summary:

    SUMMARY scenario=chat requests=14 ok=14 failures=0 unfinished=0 req_per_s=0.412
      tok_per_s=9.87 ttft_p50_s=0.38 ttft_p99_s=1.9 slo_ttft_s=6 slo_attainment=1.000 ...

(one line; `parse_summary_line` reads it back). Definitions:
  requests      finished requests (ok + failures); `unfinished` ones were cut by the test's end
  req_per_s     ok requests / span, span = test start -> last completion
  tok_per_s     output tokens of the ok requests / span
  ttft_*        arrival -> first token (requests that got one); itl_* over all tokens
  slo_attainment share of finished requests whose first token came within slo_ttft_s of their
                arrival (a failure counts as a miss), as in the S-LoRA paper
  queue_wait_p99_s  time arrivals waited for a free user slot (> 0: raise --users)
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

RAW_FILE = "requests.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_PNG = "summary.png"
PERCENTILES = (50, 90, 99)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / RAW_FILE
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def pct(values, q: float) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.percentile(values, q)) if values else None


def _stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r["ok"]]
    return {
        "requests": len(records),
        "ok": len(ok),
        "failures": len(records) - len(ok),
        "output_tokens": sum(r["output_tokens"] for r in ok),
        "ttft_p50_s": pct([r["ttft"] for r in records], 50),
        "ttft_p99_s": pct([r["ttft"] for r in records], 99),
        "e2e_p50_s": pct([r["e2e"] for r in ok], 50),
        "e2e_p99_s": pct([r["e2e"] for r in ok], 99),
    }


def summarize(records: list[dict[str, Any]], slo_ttft: float,
              scenario: str = "") -> dict[str, Any]:
    finished = [r for r in records if not r.get("unfinished")]
    ok = [r for r in finished if r["ok"]]
    ends = [r["t_end"] for r in records] + [r["t_arrival"] for r in records]
    span = max(ends) if ends else 0.0
    itl = [g for r in finished for g in r["itl"]]
    met = sum(1 for r in finished if r["ok"] and r["ttft"] is not None and r["ttft"] <= slo_ttft)
    errors: dict[str, int] = defaultdict(int)
    for r in finished:
        if not r["ok"]:
            errors[r["error"]] += 1
    by_label: dict[str, list] = defaultdict(list)
    by_protocol: dict[str, list] = defaultdict(list)
    for r in finished:
        by_label[r["adapter"] or "base"].append(r)
        by_protocol[r["protocol"]].append(r)
    summary = {
        "scenario": scenario,
        "requests": len(finished),
        "ok": len(ok),
        "failures": len(finished) - len(ok),
        "unfinished": len(records) - len(finished),
        "span_s": span,
        "req_per_s": len(ok) / span if span > 0 else 0.0,
        "tok_per_s": sum(r["output_tokens"] for r in ok) / span if span > 0 else 0.0,
        "output_tokens": sum(r["output_tokens"] for r in ok),
        "slo_ttft_s": slo_ttft,
        "slo_attainment": met / len(finished) if finished else 0.0,
        "queue_wait_p99_s": pct([r["queue_wait"] for r in finished], 99),
        "adapters": len(by_label),
        "errors": dict(errors),
        "per_adapter": {k: _stats(v) for k, v in sorted(by_label.items())},
        "per_protocol": {k: _stats(v) for k, v in sorted(by_protocol.items())},
    }
    for q in PERCENTILES:
        summary[f"ttft_p{q}_s"] = pct([r["ttft"] for r in finished], q)
        summary[f"e2e_p{q}_s"] = pct([r["e2e"] for r in ok], q)
        summary[f"itl_p{q}_ms"] = None if not itl else pct(itl, q) * 1000.0
    return summary


LINE_KEYS = ("scenario", "requests", "ok", "failures", "unfinished", "adapters", "req_per_s",
             "tok_per_s", "ttft_p50_s", "ttft_p99_s", "slo_ttft_s", "slo_attainment",
             "itl_p50_ms", "itl_p99_ms", "e2e_p50_s", "e2e_p99_s", "queue_wait_p99_s")


def _fmt(value: Any) -> str:
    if value is None:
        return "nan"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_line(summary: dict[str, Any]) -> str:
    return "SUMMARY " + " ".join(f"{k}={_fmt(summary.get(k))}" for k in LINE_KEYS)


def parse_summary_line(text: str) -> dict[str, Any]:
    """The fields of the last SUMMARY line in `text` (numbers as int/float, nan as None)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("SUMMARY ")]
    if not lines:
        raise ValueError("no SUMMARY line")
    out: dict[str, Any] = {}
    for item in lines[-1].split()[1:]:
        key, _, value = item.partition("=")
        try:
            number = float(value)
            out[key] = None if math.isnan(number) else (
                int(number) if number.is_integer() and "." not in value and "e" not in value
                else number)
        except ValueError:
            out[key] = value
    return out


def _token_times(r: dict[str, Any]) -> list[float]:
    if r["ttft"] is None:
        return []
    first = r["t_arrival"] + r["ttft"]
    return [first, *(first + np.cumsum(r["itl"])).tolist()]


def plot_summary(records: list[dict[str, Any]], summary: dict[str, Any],
                 path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in records if not r.get("unfinished")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(
        f"{summary['scenario'] or 'load test'}: {summary['ok']} ok / {summary['failures']} "
        f"failed, {summary['req_per_s']:.3g} req/s, {summary['tok_per_s']:.3g} tok/s, "
        f"SLO (TTFT <= {summary['slo_ttft_s']:g} s) {100 * summary['slo_attainment']:.1f}%")

    # 1. latency percentiles
    ax = axes[0, 0]
    metrics = {
        "TTFT": [r["ttft"] for r in finished],
        "ITL": [g for r in finished for g in r["itl"]],
        "E2E": [r["e2e"] for r in finished if r["ok"]],
        "queue wait": [r["queue_wait"] for r in finished],
    }
    width = 0.8 / len(PERCENTILES)
    for j, q in enumerate(PERCENTILES):
        vals = [pct(v, q) or 0.0 for v in metrics.values()]
        xs = np.arange(len(metrics)) + (j - 1) * width
        bars = ax.bar(xs, vals, width, label=f"p{q}")
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=7, rotation=90,
                     padding=2)
    ax.set_xticks(np.arange(len(metrics)), list(metrics))
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, max([pct(v, 99) or 0.0 for v in metrics.values()] + [1e-3]) * 10)
    ax.set_ylabel("seconds")
    ax.set_title("latency percentiles")
    ax.legend()

    # 2. CDF of time to first token
    ax = axes[0, 1]
    groups = defaultdict(list)
    for r in finished:
        if r["ttft"] is not None:
            groups[r["protocol"]].append(r["ttft"])
    for name, vals in sorted(groups.items()):
        vals = np.sort(vals)
        ax.step(vals, np.arange(1, len(vals) + 1) / len(vals), where="post",
                label=f"{name} ({len(vals)})")
    ax.axvline(summary["slo_ttft_s"], color="red", linestyle="--",
               label=f"SLO {summary['slo_ttft_s']:g} s")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title("CDF of time to first token")
    ax.legend()

    # 3. throughput over time
    ax = axes[1, 0]
    span = max(summary["span_s"], 1e-9)
    bin_s = max(1.0, span / 40)
    edges = np.arange(0.0, span + bin_s, bin_s)
    tokens = [t for r in finished for t in _token_times(r)]
    done = [r["t_end"] for r in finished if r["ok"]]
    arrivals = [r["t_arrival"] for r in records]
    if len(edges) > 1:
        ax.stairs(np.histogram(tokens, edges)[0] / bin_s, edges, label="output tokens/s")
        ax2 = ax.twinx()
        ax2.stairs(np.histogram(arrivals, edges)[0] / bin_s, edges, color="gray",
                   linestyle=":", label="arrivals/s")
        ax2.stairs(np.histogram(done, edges)[0] / bin_s, edges, color="green",
                   label="completions/s")
        ax2.set_ylabel("requests/s")
        ax2.legend(loc="upper right")
    ax.set_xlabel(f"seconds since start (bins of {bin_s:.3g} s)")
    ax.set_ylabel("tokens/s")
    ax.set_title("throughput over time")
    ax.legend(loc="upper left")

    # 4. per-adapter breakdown (the 20 busiest)
    ax = axes[1, 1]
    per = sorted(summary["per_adapter"].items(), key=lambda kv: -kv[1]["requests"])[:20]
    labels = [k for k, _ in per]
    xs = np.arange(len(labels))
    ax.bar(xs, [v["ok"] for _, v in per], label="ok")
    ax.bar(xs, [v["failures"] for _, v in per], bottom=[v["ok"] for _, v in per],
           color="red", label="failed")
    ax.set_xticks(xs, labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("requests")
    ax.set_ylim(0, max([v["requests"] for _, v in per] + [1]) * 1.3)
    ax3 = ax.twinx()
    ax3.plot(xs, [v["ttft_p50_s"] or np.nan for _, v in per], "o", color="black",
             label="TTFT p50")
    ax3.plot(xs, [v["ttft_p99_s"] or np.nan for _, v in per], "v", color="gray",
             label="TTFT p99")
    ax3.set_ylabel("seconds")
    ax3.set_ylim(0, max([v["ttft_p99_s"] or 0.0 for _, v in per] + [1e-3]) * 1.3)
    ax3.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("per adapter")

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: str | Path, slo_ttft: float, scenario: str = "") -> dict[str, Any]:
    """Summarize out_dir/requests.jsonl into summary.json and summary.png."""
    out_dir = Path(out_dir)
    records = load_records(out_dir / RAW_FILE)
    summary = summarize(records, slo_ttft, scenario)
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    plot_summary(records, summary, out_dir / SUMMARY_PNG)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a loadtest/results/<run> directory")
    p.add_argument("--slo-ttft", type=float, default=None,
                   help="seconds (default: the run's, from summary.json, else 6)")
    args = p.parse_args(argv)
    old = Path(args.run_dir) / SUMMARY_JSON
    previous = json.loads(old.read_text()) if old.exists() else {}
    slo = args.slo_ttft or previous.get("slo_ttft_s") or 6.0
    summary = write_report(args.run_dir, slo, previous.get("scenario", ""))
    print(summary_line(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
