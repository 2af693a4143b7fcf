"""Several engine instances of one model (Triton instance groups): each instance runs its own
engine, where Triton placed it, and concurrent requests are spread over them. On a GPU host
that is one engine per GPU (one instance group per GPU, scripts/tritonserver.sh); here two
KIND_CPU instances show the same mechanism."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from client import GenerateRequest

REPO = Path(__file__).resolve().parents[2]
ONE_PER_GPU = "instance_group [ { count: 1, kind: KIND_AUTO } ]"
TWO_ON_CPU = "instance_group [ { count: 2, kind: KIND_CPU } ]"
NUM_REQUESTS = 24
MAX_TOKENS = 6


def two_instance_repository(root: Path) -> Path:
    shutil.copytree(REPO / "model_repository" / "slora", root / "slora",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = root / "slora" / "config.pbtxt"
    text = config.read_text()
    assert ONE_PER_GPU in text, "config.pbtxt's instance group changed: update this test"
    config.write_text(text.replace(ONE_PER_GPU, TWO_ON_CPU))
    return root


def test_two_instances_both_serve(triton_server_factory, wrap_server, tmp_path: Path) -> None:
    repository = two_instance_repository(tmp_path / "repository")
    with triton_server_factory(repository=repository) as server:
        srv = wrap_server(server)
        requests = [GenerateRequest(f"Count to {i}.", max_tokens=MAX_TOKENS, temperature=0.0,
                                    adapter_id="uppercase" if i % 2 else None)
                    for i in range(NUM_REQUESTS)]
        with ThreadPoolExecutor(NUM_REQUESTS) as pool:
            finals = [chunks[-1] for chunks in pool.map(srv.stream, requests)]
        assert all(f.finish_reason == "length" for f in finals)
        served = {dict(labels)["instance"]: value
                  for (name, labels), value in srv.metrics().items()
                  if name == "slora_requests_total" and ("outcome", "success") in labels}
        assert len(served) == 2, served  # one engine (and metric series) per instance
        assert sum(served.values()) == NUM_REQUESTS
        assert all(v >= 1 for v in served.values()), f"one instance served nothing: {served}"
        assert {dict(labels)["device"] for (name, labels) in srv.metrics()
                if name == "slora_requests_total"} == {"cpu:0"}
