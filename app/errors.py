"""The whole exception tree of runcast.

Every error a client can see carries a stable ``code`` from PROTOCOL.md §7 and optional
structured details (``field``, ``active_run_id``, ``last_index``, ...). Only the transport
layer turns one into an HTTP status, a reply frame or a close code, in one table
(``app.transport.wire.HTTP_STATUS``)::

    RuncastError                      code "internal"
     ├── BadRequestError              "bad_request"        (field)
 │    └── MalformedError          "bad_request"        (not JSON / not an object: HTTP 400)
     ├── NotFoundError                "not_found"
     ├── UnknownAgentError            "unknown_agent"      (field)
     ├── RunInProgressError           "run_in_progress"    (active_run_id)
     ├── ConflictError                "conflict"           (expected_revision, actual_revision)
     ├── CursorOutOfRangeError        "cursor_out_of_range" (last_index, field)
     ├── NotWaitingError              "not_waiting"
     ├── UnauthorizedError            "unauthorized"
     ├── ForbiddenError               "forbidden"
     ├── PayloadTooLargeError         "payload_too_large"
     ├── TooManySubscriptionsError    "too_many_subscriptions"
     ├── RateLimitedError             "rate_limited"       (retry_after)
     ├── OverloadedError              "overloaded"  (a server-wide limit, such as live runs)
     │    └── ShuttingDownError       "overloaded"  (the server refuses new work while it stops)
     ├── TooManyConnectionsError      "rate_limited" (connections from one address)
     ├── AgentError                   (per instance: what an agent chose to tell clients)
     └── StoreError                   "internal"  (the database failed; the cause is chained)
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationError


class RuncastError(Exception):
    """Base of every runcast error; ``code`` is what programs match on."""

    code: ClassVar[str] = "internal"
    # What a client is told instead of the message, when the message is for the log only
    # (it may carry SQL, a file path or a library's own words).
    public_message: ClassVar[str | None] = None

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = {k: v for k, v in details.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` object of a reply frame or an HTTP error body."""
        message = self.public_message or self.message
        return {"code": self.code, "message": message, **self.details}


class BadRequestError(RuncastError):
    """A frame or body is malformed, or a field is missing or invalid (names ``field``)."""

    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, **details: Any) -> None:
        super().__init__(message, field=field, **details)

    @classmethod
    def from_validation(
        cls, exc: ValidationError, what: str, *, within: str | None = None
    ) -> BadRequestError:
        """The first problem of a pydantic ``exc`` as an error naming its top-level field
        (``within.field`` when the model validated a part, e.g. ``input.n``)."""
        first = exc.errors()[0]
        if not first["loc"]:  # the value as a whole
            field = within or "body"
        else:
            name = str(first["loc"][0])
            field = name if within is None else f"{within}.{name}"
        if first["type"] == "missing":
            message = f"{what}: {field} is required"
        elif first["type"] == "extra_forbidden":
            message = f"{what}: unknown field {field}"
        else:
            message = f"{what}: {field}: {first['msg']}"
        return cls(message, field=field)


class MalformedError(BadRequestError):
    """The frame or body as a whole is unreadable: not JSON, or not a JSON object."""


class NotFoundError(RuncastError):
    code = "not_found"


class UnknownAgentError(RuncastError):
    code = "unknown_agent"

    def __init__(self, agent: str) -> None:
        super().__init__(f"no agent is registered under the name {agent!r}", field="agent")


class RunInProgressError(RuncastError):
    code = "run_in_progress"

    def __init__(self, thread_id: str, active_run_id: str) -> None:
        super().__init__(
            f"thread {thread_id} already has an active run", active_run_id=active_run_id
        )


class ConflictError(RuncastError):
    code = "conflict"


class CursorOutOfRangeError(RuncastError):
    code = "cursor_out_of_range"

    def __init__(self, cursor: int, last_index: int, *, field: str = "after") -> None:
        super().__init__(
            f"{field}={cursor} is past the last index {last_index} of the run",
            last_index=last_index,
            field=field,
        )


class NotWaitingError(RuncastError):
    code = "not_waiting"


class UnauthorizedError(RuncastError):
    code = "unauthorized"


class ForbiddenError(RuncastError):
    code = "forbidden"


class PayloadTooLargeError(RuncastError):
    code = "payload_too_large"

    def __init__(self, size: int, limit: int, *, field: str | None = None) -> None:
        what = "payload" if field is None else field
        super().__init__(f"{what} of {size} bytes is over the limit of {limit} bytes", field=field)


class TooManySubscriptionsError(RuncastError):
    code = "too_many_subscriptions"


class RateLimitedError(RuncastError):
    code = "rate_limited"

    def __init__(self, retry_after: float) -> None:
        retry_after = round(max(retry_after, 0.001), 3)
        super().__init__(f"too many requests; retry after {retry_after} s", retry_after=retry_after)


class OverloadedError(RuncastError):
    """A server-wide limit (live runs) is reached; the client may retry later."""

    code = "overloaded"


class TooManyConnectionsError(RuncastError):
    """A client address holds as many WebSocket connections as it may."""

    code = "rate_limited"


class ShuttingDownError(OverloadedError):
    """New work is refused because the server is stopping: a 503, worth retrying (on
    another node, or once this one is back)."""


class AgentError(RuncastError):
    """Raised by an agent on purpose: its run ends ``failed`` with this ``code`` and
    ``message`` in the terminal event, as the agent chose them. Any other exception from
    an agent shows clients only ``agent_error`` and a generic message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        # Per instance, where every other class has one: ``code`` is a ClassVar above.
        self.__dict__["code"] = code


class StoreError(RuncastError):
    """The database failed; the original exception is the ``__cause__``. Clients get a
    generic message; the detail goes to the log."""

    public_message = "the database failed; the server logged the details"
