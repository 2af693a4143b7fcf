"""Engine errors with a code that maps onto Triton error codes."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Error classes; the Triton model maps them onto pb_utils.TritonError codes."""

    INVALID_ARG = "INVALID_ARG"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class EngineError(Exception):
    """An error reported to the client: `code` says which class, `message` says what."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def invalid(cls, field: str, problem: str) -> EngineError:
        """An INVALID_ARG error naming the offending field."""
        return cls(ErrorCode.INVALID_ARG, f"invalid '{field}': {problem}")

    def __reduce__(self) -> tuple:
        # keep the error picklable (it crosses thread / process queues)
        return (type(self), (self.code, self.message))


class PoolExhaustedError(Exception):
    """The page pool has fewer free pages than requested; nothing was allocated."""
