"""docker/lb/nginx.conf with a real nginx (Debian: apt-get install nginx-light): the config
passes `nginx -t`, and -- in front of the session's real tritonserver, reached as two
"replicas" at 127.0.0.1 and 127.0.0.2 -- it routes by adapter (same X-Adapter-Id, same
replica; different ids spread), and proxies HTTP generate, SSE generate_stream and gRPC
streaming. Only the replica addresses and the listen ports are rewritten for the test."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from docker_files import NGINX_CONF, demo_adapters, free_port, tool

NGINX = tool("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx not installed "
                                "(apt-get install nginx-light)")

REPLICA_ADDRESSES = {"replica-0": "127.0.0.1", "replica-1": "127.0.0.2"}


def _rewrite(text: str, upstream_ports: dict[str, int], listen: dict[str, int]) -> str:
    """Point the replicas at local addresses and listen on free local ports."""
    for host, address in REPLICA_ADDRESSES.items():
        for port, new_port in upstream_ports.items():
            text, n = re.subn(rf"server {host}:{port}\b", f"server {address}:{new_port}", text)
            assert n == 1, f"expected one `server {host}:{port}` in nginx.conf"
    for port, new_port in listen.items():
        text, n = re.subn(rf"listen {port}\b", f"listen 127.0.0.1:{new_port}", text)
        assert n == 1, f"expected one `listen {port}` in nginx.conf"
    return text


def _nginx_cmd(prefix: Path, conf: Path, *extra: str) -> list[str]:
    (prefix / "logs").mkdir(exist_ok=True)
    return [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs/error.log"),
            "-g", f"pid {prefix}/nginx.pid;", *extra]


def test_nginx_config_is_valid(tmp_path):
    conf = tmp_path / "nginx.conf"
    conf.write_text(_rewrite(NGINX_CONF.read_text(), {"8000": 18000, "8001": 18001},
                             {"8000": 18080, "8001": 18081}))
    res = subprocess.run(_nginx_cmd(tmp_path, conf, "-t"), capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def balancer(triton_server, tmp_path_factory):
    """nginx with docker/lb/nginx.conf in front of the session's server (as two replicas)."""
    http_port = int(triton_server.http_url.rsplit(":", 1)[1])
    grpc_port = int(triton_server.grpc_url.rsplit(":", 1)[1])
    lb_http, lb_grpc = free_port(), free_port()
    prefix = tmp_path_factory.mktemp("nginx")
    conf = prefix / "nginx.conf"
    conf.write_text(_rewrite(NGINX_CONF.read_text(), {"8000": http_port, "8001": grpc_port},
                             {"8000": lb_http, "8001": lb_grpc}))
    proc = subprocess.Popen(_nginx_cmd(prefix, conf, "-g", "daemon off;"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while True:
        try:
            requests.get(f"http://127.0.0.1:{lb_http}/v2/health/live", timeout=2)
            break
        except requests.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"nginx did not start: {proc.stderr.read().decode()}")
            time.sleep(0.2)
    yield f"127.0.0.1:{lb_http}", f"127.0.0.1:{lb_grpc}"
    proc.send_signal(signal.SIGQUIT)  # graceful stop
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _upstream(http: str, adapter: str | None) -> str:
    headers = {"X-Adapter-Id": adapter} if adapter is not None else {}
    r = requests.get(f"http://{http}/v2/health/ready", headers=headers, timeout=10)
    assert r.status_code == 200
    return r.headers["X-Upstream"].split(":")[0]


def _demo_adapter() -> str:
    """A demo adapter when the repo has one, else the base model."""
    return (demo_adapters() or [""])[0]


@pytest.mark.server
def test_same_adapter_same_replica_and_adapters_spread(balancer):
    http, _ = balancer
    chosen = {}
    for i in range(24):
        adapter = f"adapter-{i}"
        chosen[adapter] = {_upstream(http, adapter) for _ in range(3)}
        assert len(chosen[adapter]) == 1, f"{adapter} went to {chosen[adapter]}"
    used = set().union(*chosen.values())
    assert used == set(REPLICA_ADDRESSES.values()), f"adapters all on {used}"
    # no header (base model): spread per request
    assert {_upstream(http, None) for _ in range(24)} == set(REPLICA_ADDRESSES.values())


@pytest.mark.server
def test_http_generate_and_sse_stream_through_the_balancer(balancer):
    http, _ = balancer
    adapter = _demo_adapter()
    body = {"text_input": "Say hi.", "adapter_id": adapter, "max_tokens": 4,
            "ignore_eos": True, "temperature": 0.0}
    headers = {"X-Adapter-Id": adapter}
    r = requests.post(f"http://{http}/v2/models/slora/generate",
                      json={**body, "stream": False}, headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] and r.headers["X-Upstream"]

    events = []
    with requests.post(f"http://{http}/v2/models/slora/generate_stream",
                       json={**body, "stream": True}, headers=headers, stream=True,
                       timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert len(events) >= 2, f"no token streaming through nginx: {events}"
    assert events[-1].get("finish_reason") == "length"


@pytest.mark.server
def test_grpc_stream_through_the_balancer(balancer):
    _, grpc_url = balancer
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    adapter = _demo_adapter()
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)),
                        headers={"x-adapter-id": adapter})
    try:
        inputs = []
        for name, dtype, value in (("text_input", "BYTES", np.array([b"Say hi."], np.object_)),
                                   ("adapter_id", "BYTES", np.array([adapter.encode()],
                                                                    np.object_)),
                                   ("max_tokens", "INT32", np.array([4], np.int32)),
                                   ("ignore_eos", "BOOL", np.array([True]))):
            t = grpcclient.InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            inputs.append(t)
        client.async_stream_infer("slora", inputs, enable_empty_final_response=True)
        tokens = 0
        while True:
            result, error = responses.get(timeout=300)
            assert error is None, str(error)
            ids = result.as_numpy("output_ids")
            tokens += 0 if ids is None else ids.size
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        assert tokens == 4
    finally:
        client.stop_stream()
        client.close()
