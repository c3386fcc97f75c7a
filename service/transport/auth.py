"""Who is calling: bearer tokens (one, or a named set from a file that is reloaded when it changes) and
client certificates under mutual TLS, turned into a Principal that owns the caller's requests and
sessions. A grpc.aio server interceptor refuses calls without a known token."""

from __future__ import annotations

import hmac
import logging
import os
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger("tokenwire.auth")

# Health stays open: load balancers and Kubernetes probes carry no credentials, and the health
# status reveals nothing. Everything else (the TokenWire RPCs, Cancel included, and reflection)
# needs the token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
# The principal of --auth-token's token.
DEFAULT_TOKEN_NAME = "default"
# A tokens file is looked at again at most this often: edits (a rotated Kubernetes secret, say) take
# effect within this many seconds, without a restart.
RELOAD_CHECK_S = 1.0
MAX_NAME_CHARS = 64
ANONYMOUS_NAME = "anonymous"  # how logs show the principal of a server without auth


class TokensFileError(ValueError):
    """A tokens file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class Principal:
    """A caller. Its requests and sessions are its own: ids are names in its namespace."""

    name: str  # "" for the anonymous principal (no auth): every caller is the same one
    operator: bool = False  # may Cancel any principal's request

    @property
    def shown(self) -> str:
        return self.name or ANONYMOUS_NAME


ANONYMOUS = Principal("")


def parse_tokens(text: str, source: str) -> dict[str, bytes]:
    """A tokens file's principals: name -> token. One per line, "<name> <token>"; blank lines and
    lines starting with "#" are skipped. Names and tokens must be unique; names printable, without
    spaces, at most MAX_NAME_CHARS characters."""
    tokens: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{source} line {number}"
        if len(fields) != 2:
            raise TokensFileError(f"{where}: expected '<name> <token>', found {len(fields)} fields")
        name, token = fields
        if len(name) > MAX_NAME_CHARS or any(unicodedata.category(c)[0] in "CZ" for c in name):
            raise TokensFileError(f"{where}: a name has printable characters only, at most {MAX_NAME_CHARS}")
        if name == ANONYMOUS_NAME:
            raise TokensFileError(f"{where}: {ANONYMOUS_NAME!r} names the caller of a server without auth")
        if name in tokens:
            raise TokensFileError(f"{where}: the name {name!r} is given twice")
        if token.encode() in tokens.values():
            raise TokensFileError(f"{where}: the token of {name!r} is also another name's")
        tokens[name] = token.encode()
    if not tokens:
        raise TokensFileError(f"{source}: no '<name> <token>' line: nobody could call")
    return tokens


class TokenTable:
    """The tokens a server accepts, by principal name: --auth-token's (named DEFAULT_TOKEN_NAME) and a
    tokens file's. The file is read again when it changes (checked at most every RELOAD_CHECK_S);
    a changed file that cannot be used is logged and the tokens before it stay in force."""

    def __init__(
        self, token: str | None = None, path: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._fixed = {DEFAULT_TOKEN_NAME: token.encode()} if token else {}
        self._path = path
        self._clock = clock
        self._checked = clock()
        self._seen: tuple[int, int, int] | None = None
        self._tokens = dict(self._fixed)
        if path is not None:
            try:
                self._seen = _file_state(path)
                text = _read(path)
            except OSError as error:
                raise TokensFileError(f"cannot read {path}: {error.strerror}") from None
            self._tokens = self._merged(parse_tokens(text, path))

    def _merged(self, loaded: dict[str, bytes]) -> dict[str, bytes]:
        if DEFAULT_TOKEN_NAME in loaded and self._fixed:
            raise TokensFileError(f"{self._path}: {DEFAULT_TOKEN_NAME!r} is --auth-token's name; use another")
        return {**self._fixed, **loaded}

    def name_of(self, token: bytes) -> str | None:
        """The principal whose token this is, or None. Compares with every token in constant time."""
        self._reload_if_changed()
        found = None
        for name, expected in self._tokens.items():
            if hmac.compare_digest(token, expected):
                found = name
        return found

    def _reload_if_changed(self) -> None:
        if self._path is None or self._clock() - self._checked < RELOAD_CHECK_S:
            return
        self._checked = self._clock()
        try:
            state = _file_state(self._path)
            if state == self._seen:
                return
            self._seen = state
            tokens = self._merged(parse_tokens(_read(self._path), self._path))
        except (OSError, TokensFileError) as error:
            log.error("tokens file not reloaded, the tokens before it stay in force: %s", error)
            return
        added, removed = tokens.keys() - self._tokens.keys(), self._tokens.keys() - tokens.keys()
        self._tokens = tokens
        log.info(
            "tokens file %s reloaded: %d principals (added: %s; removed: %s)",
            self._path,
            len(tokens),
            ", ".join(sorted(added)) or "none",
            ", ".join(sorted(removed)) or "none",
        )


def _file_state(path: str) -> tuple[int, int, int]:
    # Through symlinks: a Kubernetes secret volume swaps a link to a new folder on update.
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise TokensFileError(f"{path}: not UTF-8 text ({error})") from None


class Authenticator:
    """Names the caller of an RPC.

    With tokens, the token names the principal (a client certificate under mutual TLS only admits
    the connection). With mutual TLS and no tokens, the client certificate's common name (or its
    whole subject when it has none) does. With neither, every caller is ANONYMOUS."""

    def __init__(
        self, tokens: TokenTable | None = None, *, operators: Iterable[str] = (), certificates: bool = False
    ) -> None:
        self.tokens = tokens
        self.operators = frozenset(operators)
        self.certificates = certificates

    def name_in(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """The principal named by the call's `authorization: Bearer <token>`, or None."""
        if self.tokens is None:
            return None
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                scheme, _, credentials = given.partition(b" ")
                # The scheme name is case-insensitive (RFC 7235 section 2.1) and public; the token is
                # compared in constant time. Spaces after the scheme are 1*SP in RFC 7235.
                name = self.tokens.name_of(credentials.lstrip(b" "))
                return name if scheme.lower() == b"bearer" else None
        return None

    def principal(self, context: grpc.aio.ServicerContext) -> Principal | None:
        """The caller of an RPC the interceptor let through; None when its token is no longer known."""
        if self.tokens is not None:
            found = self.name_in(context.invocation_metadata())
            if found is None:
                return None
            name = found
        elif self.certificates:
            name = _certificate_name(context.auth_context())
        else:
            return ANONYMOUS
        return Principal(name, operator=name in self.operators)


def _certificate_name(auth_context: dict[str, list[bytes]]) -> str:
    for key in ("x509_common_name", "x509_subject"):
        values = auth_context.get(key)
        if values:
            return values[0].decode(errors="replace")
    return ""


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but those under `open_prefixes` without a token the authenticator knows."""

    def __init__(
        self, authenticator: Authenticator, open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES
    ) -> None:
        if authenticator.tokens is None:
            raise ValueError("a bearer token interceptor needs tokens")
        self._authenticator = authenticator
        self._open_prefixes = tuple(open_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(self._open_prefixes):
            return handler
        if self._authenticator.name_in(handler_call_details.invocation_metadata) is not None:
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED without reading anything."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **serializers)
    return grpc.unary_unary_rpc_method_handler(refuse, **serializers)
