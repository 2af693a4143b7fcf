"""An OpenAI-compatible API in front of the running Triton server (a gRPC client of it).

    .venv/bin/python -m client.openai_api --port 9000 --triton-url localhost:8001

`model` is an adapter id, or the base model's id (`--base-model-id`, default `slora`).
Started by `make serve` next to tritonserver (OPENAI_PORT, 0 = off). README "OpenAI API".
Named `openai_api`, never `openai`, so that it cannot shadow the openai SDK.
"""
