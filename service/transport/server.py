"""The gRPC server around an engine: servicer, health, reflection, auth, TLS, metrics and graceful drain."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from tokenwire.service.engine.engine import Engine
from tokenwire.service.engine.requests import Failure, Finished, GenerationRequest
from tokenwire.service.engine.wording import plural, shown_id
from tokenwire.service.transport.auth import ANONYMOUS_NAME, Authenticator, BearerTokenInterceptor, TokenTable
from tokenwire.service.transport.http_api import HttpApi
from tokenwire.service.transport.http_server import HttpServer, TlsFiles
from tokenwire.service.transport.interceptors import CatchAllInterceptor
from tokenwire.service.transport.metrics import ServerMetrics
from tokenwire.service.transport.servicer import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_STREAMS_PER_PRINCIPAL,
    TokenWireServicer,
)
from tokenwire.v1 import tokenwire_pb2, tokenwire_pb2_grpc

log = logging.getLogger("tokenwire.server")
request_log = logging.getLogger("tokenwire.requests")

SERVICE_NAME = tokenwire_pb2.DESCRIPTOR.services_by_name["TokenWire"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    """How the gRPC server listens and behaves (the model is configured by ModelConfig)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (see RunningServer.port)
    reflection: bool = True
    tls_cert: str | None = None  # PEM files; with tls_client_ca the server requires client certificates
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token: str | None = None  # bearer token required on every RPC but health (principal "default")
    auth_tokens_file: str | None = None  # named tokens, one "<name> <token>" a line; reloaded on change
    operators: tuple[str, ...] = ()  # principals whose Cancel reaches every principal's requests
    max_streams_per_principal: int = DEFAULT_MAX_STREAMS_PER_PRINCIPAL  # 0: no limit
    # A plaintext port serving only grpc.health.v1 (0: none): probes that cannot present a client
    # certificate reach health there under mutual TLS.
    health_port: int = 0
    health_host: str = "127.0.0.1"
    max_message_bytes: int = 4 * 1024 * 1024
    metrics_port: int = 0  # 0: no metrics endpoint
    metrics_host: str = "127.0.0.1"  # no auth on metrics: localhost unless an operator names an address
    # The OpenAI-compatible HTTP API (http_api.py) on `host` at this port, with the same tokens and TLS
    # files as gRPC: None off (the default), 0 any free port (see RunningServer.http_port).
    http_port: int | None = None
    grace_period_s: float = 30.0
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    min_client_ping_interval_s: float = 10.0
    max_connection_idle_s: float = 0.0  # 0: never close idle connections
    health_interval_s: float = 1.0  # how often the step loop's health is checked
    replica_id: str = ""  # sent as x-tokenwire-replica on Generate; prefixes server-assigned request ids
    # A Generate stream silent this long sends a Heartbeat, so proxies' idle timers do not cut it (0: off)
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_S


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """grpc channel arguments: message limits and keepalive tuned for long streams with idle gaps."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Without this a second server could bind the same port and steal half the connections.
        ("grpc.so_reuseport", 0),
        # Ping idle connections: finds dead clients (their requests are then aborted) and keeps NAT
        # and load-balancer idle timers from cutting a stream that is silent during a long prefill.
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        # grpc 1.85's transport times the answer to its keepalive ping with this one (default 60 s),
        # not keepalive_timeout_ms: without it a frozen or cut-off client holds its requests for a minute.
        ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        # Keep pinging while a stream sends no data (the default stops after two pings).
        ("grpc.http2.max_pings_without_data", 0),
        # Pings with no call in flight are fine both ways (the server's own, and clients'), and clients
        # may ping as often as every min_client_ping_interval_s without a GOAWAY (ENHANCE_YOUR_CALM,
        # "too_many_pings"; the default allows one ping per 5 minutes without data).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.min_client_ping_interval_s * 1000)),
    ]
    if config.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", int(config.max_connection_idle_s * 1000)))
    return options


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert and not config.tls_key:
        if config.tls_client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def tls_problem(config: ServerConfig) -> str | None:
    """Why the TLS files cannot serve, in one line naming the flags; None when they can (or TLS is off).

    Asked before the server starts: gRPC checks the key against the certificate only when it binds,
    and then reports a mismatch as "Failed to bind to address", the same words as a port in use.
    Python's ssl module loads the same PEM files with the same OpenSSL checks."""
    if not config.tls_cert or not config.tls_key:
        return None
    files = [("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key)]
    if config.tls_client_ca:
        files.append(("--tls-client-ca", config.tls_client_ca))
    for flag, path in files:  # the ssl module's errors do not say which file it could not read
        try:
            Path(path).read_bytes()
        except OSError as error:
            return f"cannot read {flag} {path}: {error.strerror or error}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback, so an encrypted key fails here rather than prompting on the terminal
        # (gRPC cannot take a passphrase either).
        context.load_cert_chain(config.tls_cert, config.tls_key, password=lambda: b"")
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            return (
                f"the key in --tls-key {config.tls_key} does not match the certificate in "
                f"--tls-cert {config.tls_cert}"
            )
        # Not PEM, an encrypted key, ...: OpenSSL's words are all there is to say which.
        return (
            f"cannot load --tls-cert {config.tls_cert} with --tls-key {config.tls_key} (PEM expected): "
            f"{error}"
        )
    if config.tls_client_ca:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except ssl.SSLError as error:
            return f"cannot load --tls-client-ca {config.tls_client_ca} (PEM certificates expected): {error}"
    return None


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class BindError(Exception):
    """An address the server was told to listen on cannot be bound (a port in use, an address that is
    not this machine's, a port below 1024 without the right)."""

    def __init__(
        self, address: str, reason: str, *, in_use: bool, metrics: bool = False, http: bool = False
    ) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason
        self.in_use = in_use  # another socket holds the port
        self.metrics = metrics  # the metrics endpoint's address, not the gRPC one
        self.http = http  # the HTTP API's address (--http-port), not the gRPC one

    @classmethod
    def from_os_error(
        cls, address: str, error: OSError, *, metrics: bool = False, http: bool = False
    ) -> BindError:
        reason = error.strerror or str(error)
        return cls(address, reason, in_use=error.errno == errno.EADDRINUSE, metrics=metrics, http=http)


def _bind_refusal(host: str, port: int) -> OSError | None:
    """Why the system would refuse to let the server listen on host:port, or None.

    Asked before gRPC binds: gRPC reports a refusal only as "Failed to bind to address", after its core
    has printed its own error line. Like gRPC, the address is taken when any of host's addresses binds,
    with SO_REUSEADDR (a port whose connections are closing is free)."""
    if port == 0:
        return None
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return None  # unresolvable here: gRPC resolves it its own way, and refuses below if it must
    refusal = None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
        except OSError as error:
            refusal = refusal or error
        else:
            return None
    return refusal


class RunningServer:
    """A started server. `engine` is None until `attach` (main loads the model while health answers)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics(lambda: self.engine)
        tokens = None
        if config.auth_token or config.auth_tokens_file:  # TokensFileError for a file that cannot be used
            tokens = TokenTable(config.auth_token, config.auth_tokens_file)
        self.authenticator = Authenticator(
            tokens, operators=config.operators, certificates=bool(config.tls_client_ca)
        )
        self.servicer = TokenWireServicer(
            on_refused=self.metrics.on_refused,
            replica_id=config.replica_id,
            max_message_bytes=config.max_message_bytes,
            authenticator=self.authenticator,
            max_streams_per_principal=config.max_streams_per_principal,
            heartbeat_s=config.heartbeat_interval_s,
        )
        self.health = HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self.http_api: HttpApi | None = None
        self._http: HttpServer | None = None
        self.http_port = 0
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        self._watcher: asyncio.Task[None] | None = None
        self._serving: bool | None = None
        self._draining = False
        self._stopped = False
        self._stopping_now = False

    @property
    def engine(self) -> Engine | None:
        return self.servicer.engine

    @property
    def address(self) -> str:
        """Where a client on this machine connects: a wildcard host becomes the loopback address."""
        host = self.config.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host in ("::", "[::]"):
            host = "::1"
        return host_port(host, self.port)

    async def _start(self, engine: Engine | None) -> None:
        config = self.config
        await self._set_health(False)  # HealthServicer starts out SERVING for ""
        # The first is the outermost: the catch-all guards every handler, the auth refusals included.
        interceptors: list[grpc.aio.ServerInterceptor] = [CatchAllInterceptor()]
        if self.authenticator.tokens is not None:
            interceptors.append(BearerTokenInterceptor(self.authenticator))
        server = grpc.aio.server(options=server_options(config), interceptors=interceptors)
        tokenwire_pb2_grpc.add_TokenWireServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if config.reflection:
            reflection.enable_server_reflection(
                [SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
            )
        bind = host_port(config.host, config.port)
        credentials = _server_credentials(config)
        refusal = _bind_refusal(config.host, config.port)
        if refusal is not None:
            raise BindError.from_os_error(bind, refusal)
        try:
            if credentials is not None:
                self.port = server.add_secure_port(bind, credentials)
            else:
                self.port = server.add_insecure_port(bind)
        except RuntimeError:  # taken since the check, or refused for a reason the check cannot see
            reason = "gRPC could not bind it (its log line above, or GRPC_VERBOSITY=debug, says why)"
            raise BindError(bind, reason, in_use=False) from None
        await server.start()
        self._server = server
        if config.health_port:
            self._health_server = await self._serve_health(config.health_host, config.health_port)
        if config.metrics_port:
            metrics_host = config.metrics_host
            try:
                self.metrics_port = self.metrics.serve(config.metrics_port, metrics_host)
            except OSError as error:
                address = host_port(metrics_host, config.metrics_port)
                raise BindError.from_os_error(address, error, metrics=True) from None
        if config.http_port is not None:
            await self._serve_http(config.http_port)
        self._watcher = asyncio.create_task(self._watch_health(), name="tokenwire-health")
        if engine is not None:
            await self.attach(engine)

    async def _serve_health(self, host: str, port: int) -> grpc.aio.Server:
        """grpc.health.v1 alone, in plaintext, on its own port: a probe (Kubernetes' gRPC probe, a load
        balancer's check) that cannot present a client certificate still reaches it under mutual TLS.
        Nothing else is served there, so the TokenWire RPCs stay behind TLS and auth."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        bind = host_port(host, port)
        refusal = _bind_refusal(host, port)
        if refusal is not None:
            raise BindError.from_os_error(bind, refusal)
        try:
            self.health_port = server.add_insecure_port(bind)
        except RuntimeError:
            raise BindError(bind, "gRPC could not bind it", in_use=False) from None
        await server.start()
        return server

    async def _serve_http(self, port: int) -> None:
        """The OpenAI-compatible HTTP API on `host`, on this loop and over the same engine (HTTP and gRPC
        requests batch together), the same tokens and the same TLS files. /health follows gRPC health."""
        config = self.config
        self.http_api = HttpApi(
            lambda: self.engine,
            self.authenticator,
            serving=lambda: bool(self._serving) and not self._draining,
            max_body_bytes=config.max_message_bytes,
            on_refused=self.metrics.on_refused,
            replica_id=config.replica_id,
        )
        tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
        self._http = HttpServer(self.http_api.app, tls)
        try:
            self.http_port = await self._http.start(config.host, port)
        except OSError as error:
            raise BindError.from_os_error(host_port(config.host, port), error, http=True) from None

    @property
    def http_url(self) -> str:
        """Where a client on this machine reaches the HTTP API (its /v1 is the OpenAI base URL)."""
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{self.address.rsplit(':', 1)[0]}:{self.http_port}"

    async def attach(self, engine: Engine) -> None:
        """Start serving `engine` (already started): hooks for logs and metrics, then health SERVING."""
        # The engine guards its hooks: a failing log line or metric cannot end generations.
        engine.on_finish = _chain(engine.on_finish, _log_finished, self.metrics.on_finish)
        engine.on_step = _chain(engine.on_step, self.metrics.on_step)
        self.servicer.engine = engine
        await self._update_health()

    # ---- health ----

    async def _set_health(self, serving: bool) -> None:
        status = _SERVING if serving else _NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _update_health(self) -> None:
        engine = self.engine
        serving = engine is not None and not self._draining and engine.accepting and engine.healthy()
        if serving != self._serving:
            if self._serving is not None or serving:
                log.log(
                    logging.INFO if serving else logging.WARNING,
                    "health: %s",
                    "SERVING" if serving else "NOT_SERVING",
                )
            self._serving = serving
            await self._set_health(serving)

    async def _watch_health(self) -> None:
        # A stuck step (or a dead step thread) turns health NOT_SERVING, and back when it recovers.
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self._update_health()
            except Exception:
                log.exception("health check failed")

    # ---- shutdown ----

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop: health NOT_SERVING and new Starts refused (UNAVAILABLE); running generations
        get up to grace_s to finish, then end with SHUTDOWN; open streams are flushed and closed."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_period_s if grace_s is None else grace_s
        self._draining = True
        await self.health.enter_graceful_shutdown()
        if self._watcher is not None:
            self._watcher.cancel()
        engine = self.engine
        if engine is not None:
            live = engine.num_live()
            if live:
                log.info("draining: %s, grace period %.1f s", plural(live, "live request"), grace)
            started = time.monotonic()
            await engine.stop(grace)
            if live:
                log.info("drained in %.2f s", time.monotonic() - started)
        # Let every stream send the last messages of its requests, then end it.
        await self.servicer.close_streams(timeout=2.0)
        if self._http is not None:  # its answers end with the engine's: each has up to 2 s to be sent
            await self._http.stop()
        if self._server is not None:
            await self._server.stop(1.0)
        if self._health_server is not None:
            await self._health_server.stop(0)
        await asyncio.to_thread(self.metrics.stop)  # waits out the HTTP server's poll interval

    async def stop_now(self) -> None:
        """Stop without waiting for running generations (a second signal, during `stop`'s drain): each
        live request gets an Error (UNAVAILABLE) instead of the rest of its output, the streams are
        flushed and closed, and gRPC stops. A drain under way then finds nothing left to wait for. The
        engine's step thread is not waited for: it may be deep in a long prefill (see main)."""
        if self._stopping_now:
            return
        self._stopping_now = True
        self._draining = True
        if self.http_api is not None:
            self.http_api.stop_now()
        await self.servicer.stop_streams_now(timeout=2.0)
        if self._server is not None:
            await self._server.stop(0)
        if self._http is not None:
            await self._http.stop()
        if self._health_server is not None:
            await self._health_server.stop(0)


async def serve(engine: Engine | None, config: ServerConfig) -> RunningServer:
    """Start a server for `engine` (started by the caller on this loop), or for none yet: then health
    answers NOT_SERVING and RPCs UNAVAILABLE until `RunningServer.attach(engine)`."""
    server = RunningServer(config)
    try:
        await server._start(engine)
    except BaseException:  # e.g. the metrics port is taken: do not leave a half-started server behind
        await server.stop(0)
        raise
    return server


# ---- engine hooks ----


def _chain(*hooks: Callable[..., None] | None) -> Callable[..., None]:
    present = [hook for hook in hooks if hook is not None]

    def call_all(*args: Any) -> None:
        for hook in present:
            hook(*args)

    return call_all


def _log_finished(request: GenerationRequest, result: Finished | Failure) -> None:
    if not isinstance(result, Finished):
        return
    timings = result.timings
    fields = {
        "request_id": request.request_id,
        "principal": request.owner or ANONYMOUS_NAME,
        "reason": result.reason.value,
        "prompt_tokens": result.usage.prompt_tokens,
        "cached_prompt_tokens": result.usage.cached_prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "sent_chars": result.sent_text_chars,
        "ttft_ms": round(timings.time_to_first_token_s * 1000, 1),
        "duration_ms": round(timings.total_s * 1000, 1),
    }
    # In the text the id is escaped (a newline in it must not start a forged line); JSON escapes its own
    shown = {**fields, "request_id": shown_id(request.request_id)}
    request_log.info("finished %s", " ".join(f"{k}={v}" for k, v in shown.items()), extra=fields)
