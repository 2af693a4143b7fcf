"""Client helpers for the `slora` Triton model: gRPC streaming, HTTP generate / generate_stream.

    from client import GenerateRequest, stream_grpc
    for chunk in stream_grpc("localhost:8001", GenerateRequest("Hello", adapter_id="pirate")):
        print(chunk.text, end="")

Every function raises ClientError carrying the server's message on failure.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL_NAME = "slora"
DEFAULT_GRPC_URL = "localhost:8001"
DEFAULT_HTTP_URL = "localhost:8000"
DEFAULT_TIMEOUT_S = 600.0
OUTPUT_NAMES = ("text_output", "output_ids", "finish_reason", "num_input_tokens",
                "num_output_tokens", "logprobs", "cumulative_logprob")
RETURN_FLAGS = ("return_logprobs", "return_cumulative_logprob", "return_finish_reason",
                "return_num_input_tokens", "return_num_output_tokens")


class ClientError(RuntimeError):
    """The server refused or failed a request; the message is the server's."""


@dataclass
class GenerateRequest:
    """One generation request; None fields are not sent (the server's defaults apply)."""

    prompt: str
    adapter_id: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool | None = None
    chat: bool | None = None
    stream: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # any other inputs, sent as-is

    def fields(self) -> dict[str, Any]:
        """Input name -> value, without the unset ones."""
        values = {
            "text_input": self.prompt, "adapter_id": self.adapter_id,
            "max_tokens": self.max_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed, "stop": self.stop,
            "ignore_eos": self.ignore_eos, "chat": self.chat, "stream": self.stream,
        }
        values.update(self.extra)
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class Chunk:
    """One response: text since the previous one (the whole completion when not streaming)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_input_tokens: int | None
    num_output_tokens: int | None
    # with return_logprobs: per token {token_id: {logprob, rank, decoded_token}} (JSON)
    logprobs: list[dict[str, dict[str, Any]]] | None = None
    cumulative_logprob: float | None = None


# Triton datatype and numpy dtype of each input (must match config.pbtxt).
_INPUT_TYPES: dict[str, tuple[str, Any]] = {
    "text_input": ("BYTES", np.object_), "adapter_id": ("BYTES", np.object_),
    "max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32),
    "top_p": ("FP32", np.float32), "top_k": ("INT32", np.int32), "seed": ("UINT64", np.uint64),
    "stop": ("BYTES", np.object_), "ignore_eos": ("BOOL", np.bool_), "chat": ("BOOL", np.bool_),
    "stream": ("BOOL", np.bool_), "sampling_parameters": ("BYTES", np.object_),
    "exclude_input_in_output": ("BOOL", np.bool_), "input_ids": ("INT32", np.int32),
    "command": ("BYTES", np.object_),
    **{flag: ("BOOL", np.bool_) for flag in RETURN_FLAGS},
}


def grpc_inputs(values: dict[str, Any]) -> list[grpcclient.InferInput]:
    """tritonclient InferInputs for the given input values."""
    inputs = []
    for name, value in values.items():
        datatype, dtype = _INPUT_TYPES[name]
        items = value if isinstance(value, (list, tuple)) else [value]
        if dtype is np.object_:
            items = [v.encode("utf-8") if isinstance(v, str) else v for v in items]
        arr = np.array(items, dtype=dtype)
        inp = grpcclient.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def chunk_from_result(result: Any) -> Chunk:
    def get(name: str) -> np.ndarray | None:
        return result.as_numpy(name)

    text, ids, reason = get("text_output"), get("output_ids"), get("finish_reason")
    n_in, n_out = get("num_input_tokens"), get("num_output_tokens")
    logprobs, cumulative = get("logprobs"), get("cumulative_logprob")
    return Chunk(
        text=text.reshape(-1)[0].decode("utf-8") if text is not None else "",
        token_ids=[] if ids is None else ids.reshape(-1).tolist(),
        finish_reason=reason.reshape(-1)[0].decode() if reason is not None else None,
        num_input_tokens=None if n_in is None else int(n_in.reshape(-1)[0]),
        num_output_tokens=None if n_out is None else int(n_out.reshape(-1)[0]),
        logprobs=None if logprobs is None else json.loads(logprobs.reshape(-1)[0]),
        cumulative_logprob=None if cumulative is None else float(cumulative.reshape(-1)[0]),
    )


def is_final(result: Any) -> bool:
    """The response is its request's last (Triton's `triton_final_response` parameter)."""
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


def stream_grpc_values(
    url: str, values: dict[str, Any], model: str = MODEL_NAME, timeout: float = DEFAULT_TIMEOUT_S
) -> Iterator[Chunk]:
    """Send one request over a gRPC bidirectional stream; yield its responses as they come.
    Leaving early (an error, a timeout, the caller stops iterating) cancels the request; after
    its final response the stream is closed without cancelling (see close_stream)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    finished = False
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, grpc_inputs(values), enable_empty_final_response=True)
        while True:
            try:
                result, error = responses.get(timeout=timeout)
            except queue.Empty:
                raise ClientError(f"no response from the server within {timeout} s") from None
            if error is not None:
                finished = True  # the model's errors are final responses
                raise ClientError(error.message() if hasattr(error, "message") else str(error))
            finished = is_final(result)
            if result.get_response().outputs:
                yield chunk_from_result(result)
            if finished:
                return
    finally:
        close_stream(client, finished)
        client.close()


def close_stream(client: grpcclient.InferenceServerClient, finished: bool) -> None:
    """End a stream: cancel it if its request is still running, else close it gracefully.
    Cancelling a stream right after its final response trips Triton's gRPC frontend (2.51 and
    later): the request's state stays CANCELLATION_ISSUED for good, a leak that also holds the
    model, so a stopping server waits out its exit timeout (docs/DESIGN.md "Shutdown")."""
    client.stop_stream(cancel_requests=not finished)


def stream_grpc(url: str, request: GenerateRequest, **kwargs: Any) -> Iterator[Chunk]:
    """stream_grpc_values for a GenerateRequest."""
    return stream_grpc_values(url, request.fields(), **kwargs)


def _http_base(url: str) -> str:
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


def _chunk_from_json(data: dict[str, Any]) -> Chunk:
    if "error" in data:
        raise ClientError(str(data["error"]))
    ids = data.get("output_ids", [])
    reason = data.get("finish_reason")
    return Chunk(
        text=data.get("text_output", ""),
        token_ids=ids if isinstance(ids, list) else [ids],
        finish_reason=reason or None,
        num_input_tokens=data.get("num_input_tokens"),
        num_output_tokens=data.get("num_output_tokens"),
    )


def generate_http(
    url: str, request: GenerateRequest, model: str = MODEL_NAME,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Chunk:
    """POST /v2/models/<model>/generate (one response: the whole completion)."""
    return _post_generate(url, {**request.fields(), "stream": False}, model, timeout)


def _post_generate(url: str, body: dict[str, Any], model: str, timeout: float) -> Chunk:
    import requests  # only the HTTP helpers need it

    resp = requests.post(f"{_http_base(url)}/v2/models/{model}/generate", json=body,
                         timeout=timeout)
    try:
        data = resp.json()
    except ValueError:
        raise ClientError(f"HTTP {resp.status_code}: {resp.text}") from None
    if resp.status_code != requests.codes.ok:
        raise ClientError(f"HTTP {resp.status_code}: {data.get('error', data)}")
    return _chunk_from_json(data)


def stream_http(
    url: str, request: GenerateRequest, model: str = MODEL_NAME,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Iterator[Chunk]:
    """POST /v2/models/<model>/generate_stream and yield the server-sent events."""
    import requests

    body = {**request.fields(), "stream": True}
    url = f"{_http_base(url)}/v2/models/{model}/generate_stream"
    with requests.post(url, json=body, stream=True, timeout=timeout) as resp:
        if resp.status_code != requests.codes.ok:
            raise ClientError(f"HTTP {resp.status_code}: {resp.text}")
        for line in resp.iter_lines(decode_unicode=False):
            if line.startswith(b"data:"):
                chunk = _chunk_from_json(json.loads(line[len(b"data:"):]))
                yield chunk
                if chunk.finish_reason is not None:
                    return


def list_adapters(url: str = DEFAULT_GRPC_URL, model: str = MODEL_NAME,
                  protocol: str = "grpc") -> dict[str, list[str]]:
    """{"available": [...], "resident": [...]} through the `command: list_adapters` request,
    over gRPC (url: host:port of the gRPC endpoint) or HTTP generate (url of the HTTP one)."""
    command = {"command": "list_adapters"}
    if protocol == "http":
        return json.loads(_post_generate(url, command, model, DEFAULT_TIMEOUT_S).text)
    chunks = list(stream_grpc_values(url, command, model=model))
    return json.loads(chunks[0].text)


__all__ = [
    "Chunk", "ClientError", "GenerateRequest", "InferenceServerException", "MODEL_NAME",
    "close_stream", "generate_http", "grpc_inputs", "is_final", "list_adapters", "stream_grpc",
    "stream_grpc_values", "stream_http",
]
