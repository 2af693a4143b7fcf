"""Outputs: a sampled token becomes text (incremental detokenizing, stop strings), is checked
for the end (stop string, EOS, length) and is streamed as a RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass

from slora_backend.engine.sequence import Sequence
from slora_backend.errors import EngineError
from slora_backend.logprobs import TokenLogprobs, take

STOP = "stop"
LENGTH = "length"


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    error: EngineError | None = None
    # only for requests whose params.logprobs is set: one entry per token of new_token_ids
    new_logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs so far


class OutputProcessor:
    def __init__(self, eos_token_ids: list[int], max_model_len: int) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def ends_by_length(self, seq: Sequence, num_outputs: int) -> bool:
        return (num_outputs >= seq.params.max_tokens
                or seq.num_prompt_tokens + num_outputs >= self.max_model_len)

    def add_token(self, seq: Sequence, token: int, num_outputs: int) -> tuple[str, str | None]:
        """The text `token` adds to `seq` (the `num_outputs`-th output) and the reason it
        finishes the request (None: it goes on)."""
        text, stopped = seq.text.add(token)
        if stopped:
            return text, STOP
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            reason = STOP
        elif self.ends_by_length(seq, num_outputs):
            reason = LENGTH
        else:
            return text, None
        return text + seq.text.finish(), reason  # text held back as a possible stop start


def make_output(seq: Sequence, tokens: list[int], text: str, finished: bool) -> RequestOutput:
    return RequestOutput(seq.request_id, tokens, text, finished, seq.finish_reason,
                         seq.num_prompt_tokens, seq.num_output_tokens, seq.error, take(seq),
                         seq.cumulative_logprob)
