"""Request / sequence state tracked by the scheduler and the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slora_backend.errors import EngineError
from slora_backend.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from slora_backend.logprobs import TokenLogprobs
    from slora_backend.tokenizer import TextStream

# an output token sampled by a step still running on the device (async scheduling): the next
# step reads it on the device; the engine writes the value in when it reads the step back
PLACEHOLDER = -1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request. Its tokens are `prompt_token_ids + output_token_ids`; the first
    `num_computed_tokens` of them have K/V in the pool. A step that brings num_computed up to
    num_tokens samples the next token (prefill chunks and decodes are the same thing).
    Preemption (recompute) resets num_computed_tokens to 0 and keeps the outputs."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None
    arrival: int  # monotonically increasing admission order (FCFS and preemption priority)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    lora_slot: int = -1  # -1 = base model, else the adapter's slot while RUNNING
    holds_adapter: bool = False  # an adapter refcount is held (released on preempt/finish)
    finish_reason: str | None = None
    error: EngineError | None = None
    num_preemptions: int = 0
    # its last sampled token (still a PLACEHOLDER) ends it by length: not scheduled again
    finishing: bool = False
    # set at admission: the incremental detokenizer with its stop strings, and the sampler's
    # RNG (None for greedy requests)
    text: TextStream | None = None
    generator: torch.Generator | None = None
    # requests that asked for logprobs: those read back since the last output, and their sum
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)
    cumulative_logprob: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens read back from the device (placeholders are always the last ones)."""
        n = len(self.output_token_ids)
        while n and self.output_token_ids[n - 1] == PLACEHOLDER:
            n -= 1
        return n

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + outputs."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt:end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n_prompt]

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
