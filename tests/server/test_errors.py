"""Error handling through the real server: each refusal names its field; serving goes on."""

from __future__ import annotations

import json
import threading

import pytest
import requests
import tritonclient.grpc as grpcclient

from client import ClientError, GenerateRequest, grpc_inputs, stream_grpc_values

pytestmark = pytest.mark.server

GOOD = {"text_input": "Hello", "max_tokens": 2, "temperature": 0.0}
TOO_MANY_STOP_STRINGS = 17
HTTP_BAD_REQUEST = 400
FIRST_TOKEN_TIMEOUT_S = 120.0
# (input values on top of GOOD, the field the error must name)
BAD_INPUTS = [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"stop": ["x"] * TOO_MANY_STOP_STRINGS}, "stop"),
    ({"sampling_parameters": "{not json"}, "sampling_parameters"),
    ({"sampling_parameters": json.dumps({"bogus_key": 1})}, "bogus_key"),
    ({"sampling_parameters": json.dumps({"top_p": "hot"})}, "top_p"),
    ({"sampling_parameters": json.dumps({"lora_name": 7})}, "lora_name"),
    ({"chat": True, "text_input": '[{"role": "wizard", "content": "hi"}]'}, "text_input"),
    ({"input_ids": [1, 2, 3]}, "input_ids"),
    ({"command": "reboot"}, "command"),
]


def assert_still_serving(srv) -> None:
    chunks = srv.stream_values(GOOD)
    assert chunks[-1].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("values", "field"), BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_parameter_names_field(srv, values: dict, field: str) -> None:
    with pytest.raises(ClientError) as err:
        srv.stream_values({**GOOD, **values})
    message = str(err.value)
    assert "INVALID_ARG" in message and f"'{field}'" in message, message


def test_missing_prompt(srv) -> None:
    with pytest.raises(ClientError, match="INVALID_ARG.*'text_input'.*prompt is required"):
        srv.stream_values({"max_tokens": 4})
    assert_still_serving(srv)


def test_unknown_adapter_is_refused_by_name(srv) -> None:
    with pytest.raises(ClientError, match="NOT_FOUND.*no-such-adapter"):
        srv.stream(GenerateRequest("Hello", adapter_id="no-such-adapter", max_tokens=4))
    assert_still_serving(srv)


def test_adapter_id_escaping_the_directory_is_refused(srv) -> None:
    with pytest.raises(ClientError, match="INVALID_ARG"):
        srv.stream(GenerateRequest("Hello", adapter_id="../adapters/pirate", max_tokens=4))


def test_http_status_codes(srv) -> None:
    url = f"http://{srv.info.http_url}/v2/models/slora/generate"
    bad = requests.post(url, json={**GOOD, "stream": False, "temperature": -1.0}, timeout=60)
    assert bad.status_code == HTTP_BAD_REQUEST
    assert "'temperature'" in bad.json()["error"]
    unknown = requests.post(url, json={**GOOD, "stream": False, "adapter_id": "nope"}, timeout=60)
    assert unknown.status_code != requests.codes.ok and "nope" in unknown.json()["error"]
    good = requests.post(url, json={**GOOD, "stream": False}, timeout=60)
    assert good.status_code == requests.codes.ok, good.text
    assert good.json()["finish_reason"] in ("stop", "length")


def test_queue_full_is_unavailable(triton_server_factory, wrap_server) -> None:
    """max_num_seqs=1, max_waiting=1: one running + one waiting, the third is refused at once."""
    settings = {"SLORA_MAX_NUM_SEQS": "1", "SLORA_MAX_WAITING": "1"}
    with triton_server_factory(env=settings) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        responses: list = []
        first_token = threading.Event()

        def on_response(result, error) -> None:
            responses.append((result, error))
            first_token.set()

        long = {"text_input": "Tell me a long story.", "max_tokens": 500, "ignore_eos": True}
        client.start_stream(callback=on_response)
        try:
            client.async_stream_infer("slora", grpc_inputs(long), request_id="running")
            assert first_token.wait(FIRST_TOKEN_TIMEOUT_S), "no first token"
            client.async_stream_infer("slora", grpc_inputs(long), request_id="waiting")
            helper = wrap_server(server)
            helper.wait_for(lambda: helper.metric("slora_requests", state="waiting") == 1,
                            FIRST_TOKEN_TIMEOUT_S, "one waiting request")
            with pytest.raises(ClientError, match="UNAVAILABLE.*queue full"):
                list(stream_grpc_values(server.grpc_url, GOOD))
            # the refusal did not disturb the admitted requests
            assert not [error for _, error in responses if error is not None]
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
