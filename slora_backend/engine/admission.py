"""Admission: a request becomes a Sequence or is refused at once with an EngineError naming
the field (prompt to tokens; the length, adapter and pool checks; the per-request RNG)."""

from __future__ import annotations

import threading

import torch

from slora_backend.adapters.adapter_manager import AdapterManager
from slora_backend.engine.sequence import Sequence
from slora_backend.errors import EngineError
from slora_backend.model.spec import ModelSpec
from slora_backend.pages import ceil_div
from slora_backend.sampler import make_generator
from slora_backend.sampling_params import SamplingParams
from slora_backend.tokenizer import Tokenizer

Prompt = str | list[dict] | None


class Admission:
    def __init__(self, spec: ModelSpec, tokenizer: Tokenizer, adapters: AdapterManager,
                 max_model_len: int, block_size: int, pool_pages: int, seed: int) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.pool_pages = pool_pages
        self._rng = torch.Generator(device="cpu")
        self._rng.manual_seed(seed)
        self._rng_lock = threading.Lock()  # requests are admitted on any thread

    def sequence(self, request_id: str, prompt: Prompt, prompt_token_ids: list[int] | None,
                 params: SamplingParams | None, adapter_id: str | None,
                 arrival: int) -> Sequence:
        """Validate a request (EngineError INVALID_ARG / NOT_FOUND) into a Sequence."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise EngineError.invalid("params", "must be a SamplingParams")
        if not isinstance(request_id, str) or not request_id:
            raise EngineError.invalid("request_id", "must be a non-empty string")
        token_ids = self._prompt_tokens(prompt, prompt_token_ids)
        self._check_length(len(token_ids), params)
        adapter_pages = self._check_adapter(adapter_id)
        self._check_fits_pool(len(token_ids), params, adapter_pages)
        seq = Sequence(request_id, token_ids, params, adapter_id or None, arrival)
        seq.text = self.tokenizer.stream(token_ids, params.stop)
        seq.generator = self._generator(params)
        return seq

    def _prompt_tokens(self, prompt: Prompt, prompt_token_ids: list[int] | None) -> list[int]:
        if (prompt is None) == (prompt_token_ids is None):
            raise EngineError.invalid("prompt", "give exactly one of prompt / prompt_token_ids")
        if prompt_token_ids is not None:
            ids = list(prompt_token_ids)
            vocab = self.spec.vocab_size
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
                   for t in ids):
                raise EngineError.invalid("prompt_token_ids", f"must be integers in [0, {vocab})")
        elif isinstance(prompt, str) or (isinstance(prompt, list) and prompt):
            try:
                ids = self.tokenizer.encode(prompt, self.max_model_len)
            except ValueError as err:  # too long, a malformed chat, or no chat template
                raise EngineError.invalid("prompt", str(err)) from err
        else:
            raise EngineError.invalid("prompt", "must be a string or a non-empty list of "
                                                "{role, content} messages")
        if not ids:
            raise EngineError.invalid("prompt", "is empty")
        return ids

    def _check_length(self, num_prompt: int, params: SamplingParams) -> None:
        if num_prompt + params.max_tokens > self.max_model_len:
            raise EngineError.invalid(
                "max_tokens", f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) "
                              f"exceeds the model's max length {self.max_model_len}")

    def _check_adapter(self, adapter_id: str | None) -> int:
        """Validate the adapter synchronously (NOT_FOUND / INVALID_ARG); its pool pages."""
        if adapter_id is None or adapter_id == "":
            return 0
        if not isinstance(adapter_id, str):
            raise EngineError.invalid("adapter_id", "must be a string")
        return self.adapters.pages_for(adapter_id)

    def _check_fits_pool(self, num_prompt: int, params: SamplingParams, adapter_pages: int) -> None:
        # a request alone must fit the pool, or preemption could never make room for it
        kv_pages = ceil_div(num_prompt + params.max_tokens, self.block_size)
        if kv_pages + adapter_pages > self.pool_pages:
            raise EngineError.invalid(
                "max_tokens", f"request needs {kv_pages + adapter_pages} pool pages "
                              f"(KV + adapter), the pool has {self.pool_pages}")

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        """Per-request RNG: seeded by the request, else from the engine's seeded RNG."""
        if params.greedy:
            return None
        with self._rng_lock:
            return make_generator(params.seed, self._rng)
