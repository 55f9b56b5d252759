"""The exceptions llmos raises at its boundaries. Each bad-input error names its field."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that cannot be served as sent. `param` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ContextLengthExceeded(RequestError):
    def __init__(self, message: str, *, param: str, prompt_tokens: int, limit: int) -> None:
        super().__init__(message, param=param, code="context_length_exceeded")
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class EngineError(RuntimeError):
    """The engine could not finish a request for a reason of its own, not the request's."""


class EngineDeadError(EngineError):
    """The engine thread stopped; no request can be served."""


class StepFailed(EngineError):
    """An engine step raised; the requests it touched were aborted and gave back their blocks."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"the engine step failed ({type(cause).__name__}: {cause})")
        self.request_ids = request_ids
