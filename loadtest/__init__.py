"""Locust load-test suite for the `slora` Triton model.

Modules (importing this package has no side effects; only `users`/`locustfile` touch gevent):
  scenarios  declarative workloads (TOML files in loadtest/scenarios/) and the open-loop sampler
  records    request inputs, response parsing, the per-request record (pure)
  users      Locust users streaming over gRPC (tritonclient + gevent) and HTTP generate_stream (SSE)
  locustfile entry point for `locust -f loadtest/locustfile.py` (web UI or headless)
  run        `python -m loadtest.run ...`: headless run -> loadtest/results/<scenario>-<time>/
  report     summary line, summary.json and the PNG summary from the raw per-request records
"""
