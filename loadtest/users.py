"""Locust users for the `slora` model: gRPC streaming (tritonclient) and HTTP generate_stream.

Open loop. The scenario's `Workload` is one seeded schedule of arrivals (Gamma inter-arrival
times) shared by all users of the process. A Locust user is a *slot*: in its wait it claims the
next unclaimed arrival and sleeps until that arrival's time, then its task sends the request
and streams the answer. Arrival times never depend on responses; `--users` bounds how many
requests can be in flight at once. When every slot is busy, an arrival waits in the client
until a slot frees up: its latencies still count from its scheduled arrival time (no
coordinated omission) and the wait is recorded as `queue_wait`, so a run whose users were too
few shows it (the summary prints the p99 queue wait; raise --users).

Every request reports to Locust, with name = adapter id ("base" for the base model):
  TTFT  time to first token (arrival -> first token),
  ITL   one entry per generated token after the first (gap between chunks / tokens in chunk),
  E2E   arrival -> last response; response_length = output tokens; a failed request is an E2E
        failure carrying the server's message.
and appends one JSON line (`loadtest.records.RequestRecord`) to the file given by --raw-out.

tritonclient.grpc runs the response stream in a thread and grpcio blocks in C: under Locust's
gevent that would stall every greenlet, so `grpc.experimental.gevent.init_gevent()` is called
before any channel exists (the threads are greenlets after Locust's monkey patching, and
grpc's completion queue is polled cooperatively). Import this module only in a Locust process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import gevent
import gevent.queue
import numpy as np
from geventhttpclient import HTTPClient
from grpc.experimental import gevent as grpc_gevent
from locust import User, task
from locust.env import Environment
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING

from loadtest.openai_transport import OpenAITransport
from loadtest.records import (
    INPUTS,
    Chunk,
    RequestRecord,
    ServerError,
    build_record,
    error_message,
    parse_count,
    parse_int,
    parse_text,
    request_fields,
)
from loadtest.scenarios import (
    PROFILES,
    PROTOCOLS,
    RequestSpec,
    Scenario,
    Workload,
    load_scenario,
    parse_override,
    resolve_adapters,
)

grpc_gevent.init_gevent()  # before tritonclient creates any channel

import tritonclient.grpc as grpcclient  # noqa: E402

log = logging.getLogger("loadtest")

STOPPED_STATES = (STATE_CLEANUP, STATE_STOPPING, STATE_STOPPED)

class GrpcTransport:
    """One tritonclient gRPC client per user; one bidirectional stream per request."""

    def __init__(self, url: str, model: str):
        self.model = model
        self.client = grpcclient.InferenceServerClient(url)

    @staticmethod
    def inputs(spec: RequestSpec) -> list[grpcclient.InferInput]:
        tensors = []
        for name, value in request_fields(spec).items():
            datatype, dtype = INPUTS[name]
            if dtype is np.object_:
                value = value.encode("utf-8")
            t = grpcclient.InferInput(name, [1], datatype)
            t.set_data_from_numpy(np.array([value], dtype=dtype))
            tensors.append(t)
        return tensors

    def stream(self, spec: RequestSpec, request_id: str, timeout: float,
               chunks: list[Chunk]) -> None:
        responses: gevent.queue.Queue = gevent.queue.Queue()

        def on_response(result, error):
            responses.put((time.perf_counter(), result, error))

        finished = False
        self.client.start_stream(callback=on_response)
        try:
            self.client.async_stream_infer(self.model, self.inputs(spec), request_id=request_id,
                                           enable_empty_final_response=True)
            deadline = time.perf_counter() + timeout
            while not finished:
                left = max(0.0, deadline - time.perf_counter())
                try:
                    t, result, error = responses.get(timeout=left)
                except gevent.queue.Empty:
                    raise TimeoutError(f"no final response within {timeout:g} s") from None
                if error is not None:
                    raise ServerError(error.message())
                response = result.get_response()
                final = response.parameters["triton_final_response"].bool_param
                if response.outputs:  # the empty final response has none
                    chunks.append(Chunk(
                        t=t, num_tokens=parse_count(result.as_numpy("output_ids")),
                        finish_reason=parse_text(result.as_numpy("finish_reason")),
                        num_input_tokens=parse_int(result.as_numpy("num_input_tokens")),
                        num_output_tokens=parse_int(result.as_numpy("num_output_tokens"))))
                finished = final
        finally:
            # Cancel on the server unless the request completed (error, timeout, test stop).
            self.client.stop_stream(cancel_requests=not finished)

    def close(self) -> None:
        self.client.close()


class HttpTransport:
    """POST /v2/models/<model>/generate_stream, read the server-sent events as they come."""

    def __init__(self, host: str, port: int, model: str, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self.path = f"/v2/models/{model}/generate_stream"
        self.client = self._connect()

    def _connect(self) -> HTTPClient:
        return HTTPClient(self.host, self.port, connection_timeout=10.0,
                          network_timeout=self.timeout, concurrency=1)

    def stream(self, spec: RequestSpec, request_id: str, timeout: float,
               chunks: list[Chunk]) -> None:
        body = json.dumps(request_fields(spec))
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        finished = False
        try:
            response = self.client.post(self.path, body=body, headers=headers)
            if response.status_code != 200:
                finished = True  # the body is read to its end: the connection is reusable
                raise ServerError(f"HTTP {response.status_code}: "
                                  f"{error_message(response.read().decode('utf-8', 'replace'))}")
            deadline = time.perf_counter() + timeout
            error = None
            while True:
                line = response.readline(b"\n")
                t = time.perf_counter()
                if not line:
                    break  # end of the event stream: the request is complete
                if t > deadline:
                    raise TimeoutError(f"no final response within {timeout:g} s")
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    error = str(event["error"])  # the last event: read on to the stream's end
                    continue
                chunks.append(Chunk(
                    t=t, num_tokens=parse_count(event.get("output_ids")),
                    finish_reason=parse_text(event.get("finish_reason")),
                    num_input_tokens=parse_int(event.get("num_input_tokens")),
                    num_output_tokens=parse_int(event.get("num_output_tokens"))))
            finished = True
            if error is not None:
                raise ServerError(error)
        finally:
            if not finished:
                # Drop the connection mid-stream: the server sees the disconnect and cancels.
                self.client.close()
                self.client = self._connect()

    def close(self) -> None:
        self.client.close()


# --- per-test state ---------------------------------------------------------------------------

def add_arguments(parser) -> None:
    """Locust custom arguments (also shown in the web UI; env vars give their defaults)."""
    group = parser.add_argument_group("slora load test")
    group.add_argument("--scenario", default="chat", env_var="LOADTEST_SCENARIO",
                       help="scenario name (loadtest/scenarios/*.toml) or path")
    group.add_argument("--scenario-profile", default="cpu", choices=PROFILES,
                       env_var="LOADTEST_PROFILE",
                       help="cpu: the scaled-down values; paper: the scenario's [paper] values")
    group.add_argument("--overrides", default="", env_var="LOADTEST_OVERRIDES",
                       help="scenario overrides, space-separated key=value (e.g. 'rate=2 cv=4')")
    group.add_argument("--protocol", default="", choices=("", *PROTOCOLS),
                       env_var="LOADTEST_PROTOCOL",
                       help="grpc | http | both (default: the scenario's); selects the users "
                            "at startup")
    group.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8001)))
    group.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8000)))
    group.add_argument("--openai-port", type=int,
                       default=int(os.environ.get("OPENAI_PORT", 9000)))
    group.add_argument("--slo-ttft", type=float, default=0.0,
                       help="TTFT SLO in seconds for the summary (default: the scenario's)")
    group.add_argument("--request-timeout", type=float, default=600.0,
                       help="seconds before a request counts as failed")
    group.add_argument("--raw-out", default="", env_var="LOADTEST_RAW_OUT",
                       help="append one JSON line per request to this file")


def scenario_from_options(options) -> Scenario:
    overrides = dict(parse_override(o) for o in (options.overrides or "").split())
    if options.protocol:
        overrides["protocol"] = options.protocol
    if options.slo_ttft:
        overrides["slo_ttft"] = options.slo_ttft
    return load_scenario(options.scenario, options.scenario_profile, overrides)


def endpoints(host: str | None, options) -> tuple[str, int, int]:
    """(hostname, http port, grpc port) from --host (`localhost`, `host:port`, `http://h:p`;
    a port there is the HTTP port) and --http-port / --grpc-port."""
    host = host or "localhost"
    parts = urlsplit(host if "://" in host else f"//{host}")
    return parts.hostname or "localhost", parts.port or options.http_port, options.grpc_port


@dataclass
class LoadRun:
    """What the users of one test share: the schedule, where to send, where to record."""

    scenario: Scenario
    workload: Workload
    hostname: str
    http_port: int
    grpc_port: int
    request_timeout: float
    openai_port: int
    raw: IO[str] | None = None
    t0: float = field(default_factory=time.perf_counter)
    completed: int = 0
    failed: int = 0

    def record(self, rec: RequestRecord) -> None:
        self.completed += rec.ok
        self.failed += not (rec.ok or rec.unfinished)
        if self.raw is not None:
            self.raw.write(json.dumps(dataclasses.asdict(rec)) + "\n")
            self.raw.flush()

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()
            self.raw = None


def start_run(environment: Environment) -> LoadRun:
    """(Re)build the shared state at test start, from the current options (the web UI may have
    changed them), and keep the user classes of the scenario's protocol."""
    options = environment.parsed_options
    scenario = scenario_from_options(options)
    # Distributed Locust: each worker runs its own schedule (the offered load is workers x
    # rate); distinct seeds keep the workers' arrivals independent.
    worker = getattr(environment.runner, "worker_index", 0) or 0
    workload = Workload(scenario, resolve_adapters(scenario), seed=scenario.seed + 1000 * worker)
    hostname, http_port, grpc_port = endpoints(environment.host, options)
    raw = None
    if options.raw_out:
        Path(options.raw_out).parent.mkdir(parents=True, exist_ok=True)
        raw = open(options.raw_out, "a")  # closed at test stop
    if not options.user_classes:  # classes named on the command line win over the protocol
        environment.user_classes[:] = USER_CLASSES[scenario.protocol]
    run = LoadRun(scenario, workload, hostname, http_port, grpc_port,
                  options.request_timeout, options.openai_port, raw)
    environment.slora_run = run
    log.info("scenario %s: rate %.3g req/s, cv %g, %d adapters (%s), protocol %s, "
             "http %s:%d, grpc %s:%d", scenario.name, scenario.rate, scenario.cv,
             len(workload.adapter_ids), ", ".join(workload.adapter_ids[:8]) or "base only",
             scenario.protocol, hostname, http_port, hostname, grpc_port)
    return run


def current_run(environment: Environment) -> LoadRun:
    run = getattr(environment, "slora_run", None)
    if run is None:
        run = start_run(environment)
    return run


# --- users ------------------------------------------------------------------------------------

class _SloraUser(User):
    abstract = True
    protocol = ""
    host = "localhost"  # the web UI's default; --host overrides

    def __init__(self, environment: Environment):
        super().__init__(environment)
        self._next: RequestSpec | None = None
        self._transport = None

    def wait_time(self) -> float:
        # Claim the next arrival of the shared schedule and sleep until it is due. Locust may
        # stop the user during this wait (the claimed arrival is then simply not sent).
        run = current_run(self.environment)
        self._next = run.workload.next()
        return max(0.0, run.t0 + self._next.t_arrival - time.perf_counter())

    @task
    def send_next(self) -> None:
        spec, self._next = self._next, None
        # None on the very first iteration (wait_time claims first). Locust stops a waiting
        # user asynchronously: one that wakes up after the test began stopping sends nothing.
        runner = self.environment.runner
        if spec is not None and (runner is None or runner.state not in STOPPED_STATES):
            self.send(spec)

    def make_transport(self, run: LoadRun):
        raise NotImplementedError

    def on_stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def send(self, spec: RequestSpec) -> RequestRecord:
        run = current_run(self.environment)
        if self._transport is None:
            self._transport = self.make_transport(run)
        request_id = f"{spec.index}-{uuid.uuid4().hex[:8]}"
        t_arrival = run.t0 + spec.t_arrival
        t_send = time.perf_counter()
        chunks: list[Chunk] = []
        error, unfinished = "", False
        try:
            self._transport.stream(spec, request_id, run.request_timeout, chunks)
        except ServerError as exc:
            error = str(exc)
        except Exception as exc:  # transport trouble: connection refused, timeout, ...
            error = f"{type(exc).__name__}: {exc}"
        except BaseException:  # GreenletExit: the test stopped with this request in flight
            error, unfinished = "unfinished: the test stopped first", True
            raise
        finally:
            rec = self._record(run, spec, request_id, t_arrival, t_send, chunks, error,
                               unfinished)
        return rec

    def _record(self, run: LoadRun, spec: RequestSpec, request_id: str, t_arrival: float,
                t_send: float, chunks: list[Chunk], error: str,
                unfinished: bool) -> RequestRecord:
        t_end = chunks[-1].t if chunks and not error else time.perf_counter()
        rec = build_record(spec, request_id, self.protocol, chunks, t0=run.t0,
                           t_arrival=t_arrival, t_send=t_send, t_end=t_end, error=error,
                           unfinished=unfinished)
        run.record(rec)
        if not unfinished:
            self._report(rec)
        return rec

    def _report(self, rec: RequestRecord) -> None:
        fire = self.environment.events.request.fire
        context = {"protocol": self.protocol, "adapter": rec.label}
        if rec.ttft is not None:
            fire(request_type="TTFT", name=rec.label, response_time=rec.ttft * 1000.0,
                 response_length=0, exception=None, context=context)
        for gap in rec.itl:
            fire(request_type="ITL", name=rec.label, response_time=gap * 1000.0,
                 response_length=1, exception=None, context=context)
        fire(request_type="E2E", name=rec.label, response_time=rec.e2e * 1000.0,
             response_length=rec.output_tokens,
             exception=ServerError(rec.error) if rec.error else None, context=context)


class GrpcStreamUser(_SloraUser):
    """Streams each request over a gRPC bidirectional stream (tritonclient.grpc)."""

    protocol = "grpc"

    def make_transport(self, run: LoadRun) -> GrpcTransport:
        return GrpcTransport(f"{run.hostname}:{run.grpc_port}", run.scenario.model)


class HttpStreamUser(_SloraUser):
    """Streams each request over HTTP POST /v2/models/slora/generate_stream (SSE)."""

    protocol = "http"

    def make_transport(self, run: LoadRun) -> HttpTransport:
        return HttpTransport(run.hostname, run.http_port, run.scenario.model,
                             run.request_timeout)


class OpenAIChatUser(_SloraUser):
    """Streams each request from the OpenAI API's /v1/chat/completions (SSE)."""

    protocol = "openai"

    def make_transport(self, run: LoadRun) -> OpenAITransport:
        return OpenAITransport(run.hostname, run.openai_port, run.request_timeout)


USER_CLASSES = {"grpc": [GrpcStreamUser], "http": [HttpStreamUser],
                "both": [GrpcStreamUser, HttpStreamUser], "openai": [OpenAIChatUser]}
