"""Tokenizer (HF, from the model dir or GGUF), chat template, incremental detokenizer, stop strings.

- `Tokenizer.encode(prompt)`: a str is tokenized as HF does by default (special tokens such as
  BOS added when the tokenizer adds them); a list of {"role", "content"} dicts is a chat: the
  model's chat template is applied with add_generation_prompt=True.
- `IncrementalDetokenizer`: returns only the new text per token and never splits a UTF-8
  character (text that decodes to a trailing U+FFFD is held back until the character completes).
- `StopStringMatcher`: finds stop strings across token boundaries, truncates the text at the stop
  string, and holds back text that might still become the start of a stop string.
- `TextStream`: both, per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        p = Path(path)
        if p.is_file() and p.suffix.lower() == ".gguf":
            self.hf = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        else:
            self.hf = AutoTokenizer.from_pretrained(str(p))
        self.path = p
        backend = getattr(self.hf, "backend_tokenizer", None)
        cleanup = bool(getattr(self.hf, "clean_up_tokenization_spaces", False))
        # the Rust tokenizer's decode is much cheaper than the Python wrapper; same text when no
        # clean-up of tokenization spaces is configured
        self._fast_decode = backend.decode if backend is not None and not cleanup else None
        self.max_token_bytes = self._longest_token_bytes()

    def _longest_token_bytes(self) -> int:
        """UTF-8 bytes of the longest token's text (special tokens included): a text of more
        than n times this many bytes cannot tokenize to n tokens or fewer."""
        ids = [[i] for i in range(len(self.hf))]
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            texts = backend.decode_batch(ids, skip_special_tokens=False)
        else:
            texts = self.hf.batch_decode(ids, skip_special_tokens=False)
        return max(len(t.encode("utf-8")) for t in texts)

    def check_fits(self, prompt: str | Sequence[dict[str, Any]], max_tokens: int) -> None:
        """ValueError when the prompt's text alone cannot fit in `max_tokens` tokens; costs a
        length count, not a tokenization (a 16 MiB prompt would take seconds to tokenize)."""
        if isinstance(prompt, str):
            num_bytes = len(prompt.encode("utf-8"))
        else:
            num_bytes = sum(len(str(m.get("content", "")).encode("utf-8")) for m in prompt
                            if isinstance(m, dict))
        limit = max_tokens * self.max_token_bytes
        if num_bytes > limit:
            raise ValueError(f"the prompt's {num_bytes} bytes cannot fit in {max_tokens} tokens "
                             f"(at most {limit} bytes: {self.max_token_bytes} per token)")

    # ---- properties -------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    # ---- encode / decode ----------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[dict[str, Any]],
               max_tokens: int | None = None) -> list[int]:
        """Token ids; with `max_tokens`, a prompt whose text cannot fit is refused first."""
        if max_tokens is not None:
            self.check_fits(prompt, max_tokens)
        if isinstance(prompt, str):
            return list(self.hf(prompt)["input_ids"])
        messages = list(prompt)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"chat message {i} must be a dict with 'role' and 'content'")
        if not self.has_chat_template:
            raise ValueError(
                "this model's tokenizer has no chat template; send a plain text prompt"
            )
        out = self.hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        ids = out["input_ids"]
        if ids and isinstance(ids[0], list):  # batched form
            ids = ids[0]
        return [int(t) for t in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(
        self, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    def stream(
        self,
        prompt_ids: Sequence[int] | None = None,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> TextStream:
        return TextStream(self.detokenizer(prompt_ids, skip_special_tokens), stop)


class IncrementalDetokenizer:
    """Text of generated tokens, piece by piece.

    Decodes a small window: tokens [prefix_offset, read_offset) were already emitted and serve
    as context (so leading spaces of SentencePiece tokens come out right); the new text is what
    decoding [prefix_offset, end) adds to that.
    """

    CONTEXT = 5  # prompt tokens kept as context

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        ctx = list(prompt_ids[-self.CONTEXT :]) if prompt_ids else []
        self.ids: list[int] = ctx
        self.prefix_offset = 0
        self.read_offset = len(ctx)
        self.num_context = len(ctx)
        self.text = ""  # all text emitted so far

    def _decode(self, a: int, b: int) -> str:
        return self.tok.decode(self.ids[a:b], skip_special_tokens=self.skip)

    def add(self, token_ids: int | Sequence[int]) -> str:
        """Append generated token(s); return the text that is now complete."""
        if isinstance(token_ids, int):
            self.ids.append(token_ids)
        else:
            self.ids.extend(int(t) for t in token_ids)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.ids))
        if full.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete UTF-8 character: wait for the rest of its bytes
        new = full[len(prefix) :] if full.startswith(prefix) else self._resync()
        if not new:
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += new
        return new

    def _resync(self) -> str:
        # fall back to decoding everything generated and diffing against what was emitted
        gen = self.tok.decode(self.ids[self.num_context :], skip_special_tokens=self.skip)
        return gen[len(self.text) :] if gen.startswith(self.text) else ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (an incomplete character)."""
        if self.read_offset >= len(self.ids):
            return ""
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.ids))
        new = full[len(prefix) :] if full.startswith(prefix) else ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += new
        return new


class StopStringMatcher:
    """Feed text pieces; get back the text safe to emit and whether a stop string was hit."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stops = [s for s in stop if s]
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self.pending + text
        first = -1
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (first == -1 or i < first):
                first = i
                self.matched = s
        if first != -1:
            self.stopped = True
            self.pending = ""
            return buf[:first], True
        hold = self._holdback(buf)
        cut = len(buf) - hold
        self.pending = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        """Generation ended without a stop: the held-back text was not a stop string after all."""
        out, self.pending = self.pending, ""
        return "" if self.stopped else out


class TextStream:
    """Per-request text: incremental detokenization + stop strings."""

    def __init__(self, detok: IncrementalDetokenizer, stop: Sequence[str] = ()) -> None:
        self.detok = detok
        self.matcher = StopStringMatcher(stop)
        self.text = ""

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def add(self, token_ids: int | Sequence[int]) -> tuple[str, bool]:
        """(new text to emit, stop string hit).

        After a hit, the text ends before the stop string.
        """
        out, hit = self.matcher.feed(self.detok.add(token_ids))
        self.text += out
        return out, hit

    def finish(self) -> str:
        """At the end (eos / length / abort): emit what was held back."""
        if self.matcher.stopped:
            return ""
        out, hit = self.matcher.feed(self.detok.flush())
        if not hit:
            out += self.matcher.flush()
        self.text += out
        return out
