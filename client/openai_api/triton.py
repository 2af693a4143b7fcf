"""The OpenAI server's link to the running Triton server: one gRPC stream per request
(tritonclient.grpc.aio), so that closing it cancels exactly that request on the server (a
stream whose request has finished is closed without cancelling: client.close_stream says
why)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tritonclient.grpc import aio as grpcaio

from client import MODEL_NAME, Chunk, chunk_from_result, grpc_inputs, is_final
from client.openai_api.protocol import ApiError

# "INVALID_ARG: invalid 'top_p': ..." -> code, input name
_MESSAGE = re.compile(r"^(?P<code>[A-Z_]+): (?:invalid '(?P<field>[^']+)')?")
# the model's input names -> the OpenAI parameter a client sent
_PARAMS = {"adapter_id": "model", "lora_name": "model", "text_input": "messages",
           "input_ids": "prompt", "prompt": "messages", "prompt_token_ids": "prompt"}
_STATUS = {"INVALID_ARG": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503}
# a finished request's stream: how long to wait for the server to end it before cancelling
CLOSE_TIMEOUT_S = 5.0


def api_error(message: str, chat: bool = True) -> ApiError:
    """The model's error message as an OpenAI error (status from its code prefix)."""
    match = _MESSAGE.match(message)
    code = match["code"] if match else "INTERNAL"
    status = _STATUS.get(code, 500)
    if status == 404:
        return ApiError(404, message, "model", "model_not_found")
    if status == 400:
        field = match["field"] if match else None
        param = _PARAMS.get(field, field)
        if param == "messages" and not chat:
            param = "prompt"
        return ApiError(400, message, param, "invalid_value")
    kind = "server_error"
    return ApiError(status, message, None, code.lower(), kind)


class TritonLink:
    """Requests to the `slora` model over gRPC streaming."""

    def __init__(self, url: str, model: str = MODEL_NAME) -> None:
        self.url = url
        self.model = model
        self._client = grpcaio.InferenceServerClient(url)
        self._ids = itertools.count()

    async def ready(self) -> bool:
        try:
            return await self._client.is_model_ready(self.model)
        except Exception:  # noqa: BLE001 (any failure to reach it means not ready)
            return False

    async def stream(self, values: dict[str, Any], chat: bool = True) -> AsyncIterator[Chunk]:
        """The responses of one request. Leaving the iteration early (the HTTP client went
        away, the handler was cancelled) cancels the gRPC stream, so the server aborts it."""
        done = asyncio.Event()
        request = {"model_name": self.model, "inputs": grpc_inputs(values),
                   "request_id": f"openai-{next(self._ids)}"}

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request
            await done.wait()  # keep the stream open until the last response

        call = self._client.stream_infer(requests())
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    finished = True  # the model's errors are final responses
                    raise api_error(error.message(), chat)
                finished = is_final(result)
                yield chunk_from_result(result)
        except grpc.aio.AioRpcError as exc:
            raise ApiError(503, f"Triton server unreachable at {self.url}: {exc.details()}",
                           None, "unavailable", "server_error") from None
        finally:
            done.set()  # the request stream ends: the server ends a finished call
            if not (finished and await _ended(call)):
                call.cancel()

    async def generate(self, values: dict[str, Any], chat: bool) -> AsyncIterator[Chunk]:
        """stream() up to the response with a finish_reason (every final one has it)."""
        async with contextlib.aclosing(self.stream(values, chat)) as chunks:
            async for chunk in chunks:
                yield chunk
                if chunk.finish_reason is not None:
                    return

    async def list_adapters(self) -> list[str]:
        """The adapters on the server's disk (rescanned by the model on each call)."""
        async with contextlib.aclosing(self.stream({"command": "list_adapters"})) as chunks:
            async for chunk in chunks:
                return list(json.loads(chunk.text)["available"])
        return []

    async def close(self) -> None:
        await self._client.close()


async def _ended(call: Any) -> bool:
    """Whether the server ended `call` (its requests all finished) within CLOSE_TIMEOUT_S."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            async for _ in call:
                pass
    except (TimeoutError, grpc.aio.AioRpcError):
        return False
    return True
