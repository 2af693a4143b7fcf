"""Engine errors with a code that maps onto Triton error codes."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum


class ErrorCode(str, Enum):
    """Error classes; the Triton model maps them onto pb_utils.TritonError codes."""

    INVALID_ARG = "INVALID_ARG"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class EngineError(Exception):
    """An error reported to the client: `code` says which class, `message` says what."""

    def __init__(self, code: ErrorCode, message: str, field: str | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.field = field  # the offending field, for errors made by `invalid`

    @classmethod
    def invalid(cls, field: str, problem: str) -> EngineError:
        """An INVALID_ARG error naming the offending field."""
        return cls(ErrorCode.INVALID_ARG, f"{_invalid_prefix(field)}{problem}", field)

    def renamed(self, names: Mapping[str, str]) -> EngineError:
        """The same error naming `names[field]` instead of `field` (self when not in names)."""
        new = names.get(self.field or "")
        if new is None:
            return self
        message = self.message.replace(_invalid_prefix(self.field or ""), _invalid_prefix(new), 1)
        return EngineError(self.code, message, new)

    def detached(self) -> EngineError:
        """The same error without traceback, cause or context, for keeping: a raised error
        holds the frames it passed through, whose locals hold the request's inputs."""
        return EngineError(self.code, self.message, self.field)

    def __reduce__(self) -> tuple:
        # keep the error picklable (it crosses thread / process queues)
        return (type(self), (self.code, self.message, self.field))


def _invalid_prefix(field: str) -> str:
    return f"invalid '{field}': "


class PoolExhaustedError(Exception):
    """The page pool has fewer free pages than requested; nothing was allocated."""
