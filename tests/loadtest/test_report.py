"""Summary, summary line and plots from synthetic per-request records (no server)."""

from __future__ import annotations

import json

import pytest

from loadtest import report


def rec(i, adapter="a", protocol="grpc", ttft=0.5, itl=(0.1, 0.1), ok=True, error="",
        unfinished=False, t_arrival=None, queue_wait=0.0):
    t_arrival = float(i) if t_arrival is None else t_arrival
    e2e = (ttft or 0.0) + sum(itl)
    return {
        "index": i, "request_id": f"{i}", "protocol": protocol, "adapter": adapter,
        "t_arrival": t_arrival, "t_send": t_arrival + queue_wait, "t_end": t_arrival + e2e,
        "queue_wait": queue_wait, "ttft": ttft, "e2e": e2e, "itl": list(itl),
        "input_tokens_target": 10, "num_input_tokens": 11, "max_tokens": len(itl) + 1,
        "output_tokens": len(itl) + 1 if ttft is not None else 0, "finish_reason": "length",
        "ok": ok, "error": error, "unfinished": unfinished,
    }


def records():
    return [
        rec(0, "a", ttft=1.0),
        rec(1, "b", ttft=2.0, protocol="http"),
        rec(2, "", ttft=7.0),  # misses a 6 s SLO
        rec(3, "b", ttft=None, itl=(), ok=False, error="unknown adapter 'b'"),
        rec(4, "a", ttft=3.0, itl=(0.2, 0.2, 0.2), queue_wait=0.5),
        rec(5, "a", ttft=None, itl=(), ok=False, error="unfinished", unfinished=True),
    ]


def test_summarize_counts_rates_percentiles_and_slo():
    s = report.summarize(records(), slo_ttft=6.0, scenario="t")
    assert (s["requests"], s["ok"], s["failures"], s["unfinished"]) == (5, 4, 1, 1)
    # span: test start -> last completion: request 2 ends at 2.0 + 7.0 + 0.2
    assert s["span_s"] == pytest.approx(9.2)
    assert s["output_tokens"] == 3 + 3 + 3 + 4
    assert s["req_per_s"] == pytest.approx(4 / 9.2)
    assert s["tok_per_s"] == pytest.approx(13 / 9.2)
    assert s["ttft_p50_s"] == pytest.approx(2.5)  # of 1, 2, 7, 3
    assert s["slo_attainment"] == pytest.approx(3 / 5)  # the failure and the 7 s one miss
    assert s["itl_p50_ms"] == pytest.approx(100.0)
    assert s["errors"] == {"unknown adapter 'b'": 1}
    assert set(s["per_adapter"]) == {"a", "b", "base"}
    assert s["per_adapter"]["b"]["failures"] == 1 and s["per_adapter"]["a"]["ok"] == 2
    assert set(s["per_protocol"]) == {"grpc", "http"}
    assert s["queue_wait_p99_s"] == pytest.approx(0.5, abs=0.05)


def test_summary_line_roundtrip():
    s = report.summarize(records(), slo_ttft=6.0, scenario="t")
    line = report.summary_line(s)
    assert line.startswith("SUMMARY ") and "\n" not in line
    parsed = report.parse_summary_line(f"noise\n{line}\nmore noise")
    assert parsed["scenario"] == "t"
    assert (parsed["requests"], parsed["ok"], parsed["failures"]) == (5, 4, 1)
    assert parsed["req_per_s"] == pytest.approx(s["req_per_s"], rel=1e-3)
    assert parsed["slo_attainment"] == pytest.approx(0.6)
    assert parsed["slo_ttft_s"] == 6
    with pytest.raises(ValueError):
        report.parse_summary_line("nothing here")


def test_empty_run_summarizes_without_errors(tmp_path):
    s = report.write_report(tmp_path, slo_ttft=6.0, scenario="empty")
    assert (s["requests"], s["req_per_s"], s["ttft_p50_s"]) == (0, 0.0, None)
    assert "ttft_p50_s=nan" in report.summary_line(s)
    assert (tmp_path / report.SUMMARY_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_and_cli(tmp_path, capsys):
    many = [rec(i, f"ad{i % 25}", protocol=("grpc", "http")[i % 2], ttft=0.1 + i / 100)
            for i in range(200)]
    with (tmp_path / report.RAW_FILE).open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in many)
    s = report.write_report(tmp_path, slo_ttft=1.0, scenario="many")
    png = tmp_path / report.SUMMARY_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    saved = json.loads((tmp_path / report.SUMMARY_JSON).read_text())
    assert saved["requests"] == 200 and saved["adapters"] == 25
    assert s["slo_attainment"] == pytest.approx(91 / 200)  # ttft <= 1.0 for i <= 90
    png.unlink()
    assert report.main([str(tmp_path)]) == 0
    assert png.exists()
    parsed = report.parse_summary_line(capsys.readouterr().out)
    assert parsed["scenario"] == "many" and parsed["slo_ttft_s"] == 1
