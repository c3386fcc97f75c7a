"""The exceptions a tokenwire call raises: one tree that keeps the gRPC status code and the field at fault.

    TokenWireError             any failure reported by the server or the connection
    ├── Unavailable            UNAVAILABLE: no connection, or the server is loading or draining
    │                          (also a builtin ConnectionError)
    ├── InvalidArgument        INVALID_ARGUMENT, OUT_OF_RANGE: a bad request; `.field` names the
    │                          offending field, e.g. "start.sampling.top_p" (also a ValueError)
    ├── NotFound               NOT_FOUND: an Interrupt named no live request on its stream
    ├── AlreadyExists          ALREADY_EXISTS: the request id is already live on the server
    ├── FailedPrecondition     FAILED_PRECONDITION: e.g. the session already has a live request
    ├── ResourceExhausted      RESOURCE_EXHAUSTED: the server is at its limit of live requests
    ├── Unauthenticated        UNAUTHENTICATED, PERMISSION_DENIED: the token is missing or refused
    ├── DeadlineExceeded       DEADLINE_EXCEEDED: the call's timeout ran out (also a TimeoutError)
    ├── Cancelled              CANCELLED: the call was cancelled (by this client or the server)
    └── ServerError            anything else: INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS, ...

Two kinds of failure map into it: a per-request `Error` message on a Generate stream (its code,
message and field), and a failed RPC's status (its code and details). The server writes details as
"field.path: what is wrong", so `.field` is parsed from them when they start that way.

Every exception has `.code` (a `grpc.StatusCode`), `.message`, `.field` ("" when no single field is at
fault) and `.request_id` ("" when the failure is not about one generation).
"""

from __future__ import annotations

import re

import grpc

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "ServerError",
    "TokenWireError",
    "Unauthenticated",
    "Unavailable",
]


class TokenWireError(Exception):
    """Base of every error the client raises for a failure reported by the server or the connection."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        field: str = "",
        request_id: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.field = field
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message


class Unavailable(TokenWireError, ConnectionError):
    """The server cannot be reached, or is not serving yet (loading) or any more (draining)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class InvalidArgument(TokenWireError, ValueError):
    """The request was refused as malformed; `.field` names the field (e.g. "start.sampling.top_p")."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TokenWireError):
    """The named request is not live: an Interrupt for an unknown or already finished id."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TokenWireError):
    """A request with this id is already live somewhere on the server."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TokenWireError):
    """The request conflicts with the server's state (e.g. a session that is already in use)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(TokenWireError):
    """The server is overloaded (too many live requests); try again later."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(TokenWireError):
    """The bearer token is missing, wrong, or not allowed to make this call."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(TokenWireError, TimeoutError):
    """The call's deadline (`timeout`) passed before it completed."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(TokenWireError):
    """The call was cancelled before it completed."""

    default_code = grpc.StatusCode.CANCELLED


class ServerError(TokenWireError):
    """Any other failure: the server broke (INTERNAL, UNKNOWN) or does not speak this contract."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[TokenWireError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# "start.sampling.top_p: must be ..." -> "start.sampling.top_p"; a lower-case dotted path, no spaces.
_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*): ")


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode for a google.rpc.Code number (UNKNOWN for numbers gRPC does not define)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def error_for(
    code: grpc.StatusCode, message: str, *, field: str = "", request_id: str = ""
) -> TokenWireError:
    """The exception for a status code; `field` falls back to the "field.path: " prefix of the message."""
    if not field:
        match = _FIELD_PREFIX.match(message)
        field = match.group(1) if match else ""
    cls = _BY_CODE.get(code, ServerError)
    return cls(message or code.name, code=code, field=field, request_id=request_id)


def from_rpc_error(error: grpc.RpcError, *, request_id: str = "") -> TokenWireError:
    """Map a failed RPC (sync or grpc.aio) to the exception tree."""
    # grpc.RpcError itself declares no accessors; the errors grpc raises are also grpc.Call objects.
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or ""
    if code == grpc.StatusCode.INTERNAL and details.startswith(_RESET):
        # No status from the server: the stream was reset on its way, which a proxy does when the
        # replica behind it died or the stream sat idle past its timeout. gRPC calls any reset INTERNAL;
        # for the caller it is a lost server, to retry elsewhere, not a server bug.
        return Unavailable(
            f"the stream was reset on its way (a proxy lost the server, or cut the stream): {details}",
            code=grpc.StatusCode.UNAVAILABLE,
            request_id=request_id,
        )
    return error_for(code or grpc.StatusCode.UNKNOWN, details, request_id=request_id)


# How gRPC words a stream that an HTTP/2 peer reset (RST_STREAM) instead of ending it with a status.
_RESET = "Stream removed (RST_STREAM"
