"""Channel settings shared by both clients: address, TLS, bearer token, keepalive, timeouts, connecting."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

import tokenwire
from tokenwire.v1.metadata import REPLICA_HEADER

from ._errors import Unavailable

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# A keepalive ping after this long without traffic notices a dead peer (or a proxy that dropped the
# connection) during a long queue wait. gRPC servers by default tolerate pings every few minutes only
# while no data flows; grpc core then sends at most two such pings, so this stays within that policy.
DEFAULT_KEEPALIVE_S = 60.0
# Between the unary retries on UNAVAILABLE while connecting.
RETRY_BACKOFF_S = (0.1, 0.25, 0.5, 1.0)

# The pause between reconnect attempts starts small, so that a client waiting for a server that is
# starting up connects soon after it listens, and stays small, so a connect timeout is not overshot by
# a long backoff. (grpc.min_reconnect_backoff_ms is left alone: gRPC uses it as the connect deadline.)
_RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


@dataclass(frozen=True)
class ChannelConfig:
    """Everything needed to open a channel and to decorate its calls."""

    address: str = DEFAULT_ADDRESS
    tls: bool = False
    ca_file: str | Path | None = None
    client_cert: str | Path | None = None
    client_key: str | Path | None = None
    token: str | None = None
    timeout: float | None = None
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S
    keepalive_s: float | None = DEFAULT_KEEPALIVE_S

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")

    @property
    def secure(self) -> bool:
        return self.tls or self.ca_file is not None or self.client_cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials: the CA (or the system roots), and the client certificate for mutual TLS."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_cert),
        )

    def options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.primary_user_agent", f"tokenwire-python/{tokenwire.__version__}"),
            *_RECONNECT_OPTIONS,
        ]
        if self.keepalive_s:
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", 20_000),
            ]
        return options

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        # Plain metadata rather than call credentials: gRPC refuses call credentials on plaintext
        # channels, and a token over plaintext to a local server (or a TLS-terminating proxy) is common.
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def unavailable(self) -> Unavailable:
        waited = f" within {self.connect_timeout:g} s" if self.connect_timeout is not None else ""
        return Unavailable(f"could not connect to {self.address}{waited}")


def replica_metadata(replica: str | None) -> tuple[tuple[str, str], ...]:
    """The header a proxy routes a Cancel on, to the replica that serves the generation."""
    return ((REPLICA_HEADER, replica),) if replica else ()


def open_sync(config: ChannelConfig) -> grpc.Channel:
    if config.secure:
        return grpc.secure_channel(config.address, config.credentials(), options=config.options())
    return grpc.insecure_channel(config.address, options=config.options())


def open_async(config: ChannelConfig) -> grpc.aio.Channel:
    if config.secure:
        return grpc.aio.secure_channel(config.address, config.credentials(), options=config.options())
    return grpc.aio.insecure_channel(config.address, options=config.options())


def _connected(channel: grpc.Channel) -> bool:
    """Whether a sync channel is READY, asking to connect if it is idle.

    grpc's public way (subscribe / channel_ready_future) starts a polling thread that can outlive the
    subscription and fail noisily when the channel is closed soon after, so the common case (already
    connected) reads the state directly from grpc's channel object; if that ever moves, fall back."""
    check = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
    if check is None:
        return False
    try:
        return bool(check(True) == grpc.ChannelConnectivity.READY.value[0])
    except Exception:  # a closed channel; the call that follows reports it
        return False


def wait_ready_sync(channel: grpc.Channel, config: ChannelConfig, timeout: float | None) -> None:
    """Block until the channel is connected (gRPC retries with backoff meanwhile); Unavailable after
    `timeout` seconds (None: wait for ever)."""
    if _connected(channel):
        return
    future = grpc.channel_ready_future(channel)
    try:
        future.result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise config.unavailable() from None
    finally:
        future.cancel()  # unsubscribes from the channel's connectivity updates


async def wait_ready_async(channel: grpc.aio.Channel, config: ChannelConfig, timeout: float | None) -> None:
    """The asyncio form of wait_ready_sync."""
    if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
        return
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        raise config.unavailable() from None
