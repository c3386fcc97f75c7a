"""uvicorn serving an ASGI app inside the running event loop, beside grpc.aio: the HTTP front's
listening sockets, TLS, start and stop.

uvicorn runs on the loop the engine and gRPC already use (so HTTP and gRPC requests reach one engine
and batch together), driven through its Server's startup / main_loop / shutdown rather than `serve`,
which would take over SIGINT and SIGTERM from the process's own drain. The sockets are bound here,
so a port in use is an OSError the caller can report, not uvicorn's sys.exit."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: with cert and key the front speaks HTTPS; with client_ca it requires client certificates."""

    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of `host` (as gRPC binds them); port 0 picks one free port
    for all of them. Raises the OSError of the first address when none binds."""
    if not 0 <= port <= 65535:
        raise OSError(errno.EINVAL, f"port {port} is not in 0..65535")
    infos = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    refusal: OSError | None = None
    seen = set()
    for family, kind, proto, _, address in infos:
        if (family, address[0]) in seen:
            continue
        seen.add((family, address[0]))
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if sockets:  # the port the first address got, for port 0
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(2048)
            sock.setblocking(False)
        except OSError as error:
            sock.close()
            refusal = refusal or error
            continue
        sockets.append(sock)
    if not sockets:
        raise refusal or OSError(f"no address for {host}")
    return sockets


class HttpServer:
    """An ASGI app served by uvicorn (HTTP/1.1, h11) on this loop. `start` binds, `stop` drains."""

    def __init__(self, app: ASGIApp, tls: TlsFiles | None = None, *, shutdown_timeout_s: int = 2) -> None:
        tls = tls or TlsFiles()
        self.config = uvicorn.Config(
            app,
            http="h11",  # pure Python, always there; the protocol every client speaks
            ws="none",
            lifespan="off",
            log_config=None,  # the process's logging as configured by main
            access_log=False,  # tokenwire.requests logs each generation's end
            ssl_certfile=tls.cert,
            ssl_keyfile=tls.key,
            ssl_ca_certs=tls.client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE,
            # Connections still answering when the server stops get this long, then their tasks are
            # cancelled (which aborts their generations).
            timeout_graceful_shutdown=shutdown_timeout_s,
        )
        self.server: uvicorn.Server | None = None
        self.sockets: list[socket.socket] = []
        self.port = 0
        self._main_loop: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port); returns the port. Raises OSError when it cannot bind."""
        self.sockets = bind(host, port)
        self.port = self.sockets[0].getsockname()[1]
        if not self.config.loaded:
            self.config.load()
        server = uvicorn.Server(self.config)
        # What Server.serve does before startup (lifespan "off": a no-op).
        server.lifespan = self.config.lifespan_class(self.config)
        await server.startup(sockets=self.sockets)
        self.server = server
        self._main_loop = asyncio.create_task(server.main_loop(), name="tokenwire-http")
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let answers under way finish (up to the shutdown timeout), close. Idempotent."""
        server, self.server = self.server, None
        if server is None:
            for sock in self.sockets:
                sock.close()
            return
        server.should_exit = True
        if self._main_loop is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main_loop
        await server.shutdown(sockets=self.sockets)
