"""Channel settings shared by both clients: address, TLS, bearer token, keepalive, timeouts, connecting."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

import tokenwire
from tokenwire.v1.metadata import REPLICA_HEADER

from ._errors import InvalidArgument, TokenWireError, Unavailable

DEFAULT_ADDRESS = "127.0.0.1:50051"
LOAD_BALANCING = (None, "pick_first", "round_robin")
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# A keepalive ping after this long without traffic notices a dead peer (or a proxy that dropped the
# connection) during a long queue wait. gRPC servers by default tolerate pings every few minutes only
# while no data flows; grpc core then sends at most two such pings, so this stays within that policy.
DEFAULT_KEEPALIVE_S = 60.0
# A Generate stream whose request side has sent nothing this long sends a Heartbeat message: proxies
# cut a request side silent for long (nginx's client_body_timeout: 60 s) and do not forward HTTP/2
# pings, which would not count. Well under common idle timeouts, a few bytes per interval.
DEFAULT_HEARTBEAT_S = 15.0
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
    # False: a refused connection or a bad address fails at once, saying so, instead of being retried
    # until connect_timeout (which then only bounds a host that does not answer).
    wait_for_server: bool = True
    # A Heartbeat on a Generate request side silent this long (None or 0: never).
    heartbeat_s: float | None = DEFAULT_HEARTBEAT_S
    # gRPC's load-balancing policy over every address the target resolves to (None: gRPC's default,
    # pick_first: one connection). "round_robin" spreads calls over all of them, e.g. over the pods of a
    # headless Kubernetes Service ("dns:///tokenwire-headless:50051").
    load_balancing: str | None = None
    # The server name for a channel opened to one replica's address (see `pinned`): the :authority, and
    # the name a TLS certificate is checked against.
    authority: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        if self.load_balancing not in LOAD_BALANCING:
            choices = ", ".join(repr(p) for p in LOAD_BALANCING)
            raise ValueError(f"load_balancing must be one of {choices}, got {self.load_balancing!r}")

    @property
    def balanced(self) -> bool:
        """Whether calls spread over several servers, so that a unary call may reach another replica."""
        return self.load_balancing == "round_robin"

    def pinned(self, replica: str | None) -> ChannelConfig | None:
        """The settings for a channel to the one replica named `replica`, when that name is its IP
        address (as deploy/kubernetes sets --replica-id to the pod's IP): that address at the target's
        port, with the same credentials and server name, one connection. None for any other name, or a
        target whose port is not known. (gRPC's Python calls do not say which address served them.)"""
        try:
            ip = ipaddress.ip_address(replica or "")
        except ValueError:
            return None
        port = target_port(self.address)
        if port is None:
            return None
        address = f"ipv4:{ip}:{port}" if ip.version == 4 else f"ipv6:[{ip}]:{port}"
        authority = self.authority or target_authority(self.address)
        return dataclasses.replace(self, address=address, load_balancing=None, authority=authority)

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
        if self.load_balancing:
            options.append(("grpc.lb_policy_name", self.load_balancing))
        if self.authority:
            options.append(("grpc.default_authority", self.authority))
            if self.secure:  # check the certificate against the server's name, not the bare address
                options.append(("grpc.ssl_target_name_override", self.authority.rsplit(":", 1)[0]))
        return options

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        # Plain metadata rather than call credentials: gRPC refuses call credentials on plaintext
        # channels, and a token over plaintext to a local server (or a TLS-terminating proxy) is common.
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def unavailable(self, reason: str = "") -> Unavailable:
        waited = f" within {self.connect_timeout:g} s" if self.connect_timeout is not None else ""
        why = f": {reason}" if reason else ""
        return Unavailable(f"could not connect to {self.address}{waited}{why}")

    def not_connected(self, details: str, *, waited: bool) -> TokenWireError:
        """The error for a connection that failed, from what gRPC said of the last attempt ("" when it
        said nothing): InvalidArgument for an address that cannot work, else Unavailable. `waited`:
        connect_timeout was spent (the message says so)."""
        found = connect_failure(details)
        if found is not None and found[0]:
            return InvalidArgument(f"invalid address {self.address!r}: {found[1]}", field="address")
        reason = found[1] if found is not None else ""
        if waited or not reason:
            return self.unavailable(reason)
        return Unavailable(f"could not connect to {self.address}: {reason}")


# What gRPC's details say when a connection attempt failed (grpcio 1.6x-1.8x wording, lower case).
_BAD_ADDRESS = (
    "target uri is not valid",
    "failed to parse port",
    "misformatted domain name",
    "invalid target",
)
_NOT_RESOLVED = ("errors resolving", "dns resolution failed", "hostname lookup error")
_UNKNOWN_HOST = ("domain name not found", "not known", "nxdomain")
_NOT_CONNECTED = ("failed to connect to all addresses", "failed to create channel")


def connect_failure(details: str) -> tuple[bool, str] | None:
    """(whether the address itself is invalid, a short reason) for gRPC's details of a failed connection
    attempt; None when the details are about something else."""
    text = details.lower()
    last = details.split("last error: ", 1)[-1].strip()  # "UNKNOWN: ipv4:127.0.0.1:1: Failed to ..."
    tail = last.rsplit(": ", 1)[-1].strip(" ]")  # "Connection refused", "Domain name not found"
    if any(s in text for s in _BAD_ADDRESS):
        return True, "expected HOST:PORT (for example 127.0.0.1:50051)"
    if any(s in text for s in _NOT_RESOLVED):
        unknown = any(s in text for s in _UNKNOWN_HOST)
        return False, "unknown host" if unknown else f"host lookup failed ({tail})"
    if "handshake failed" in text or "ssl_error" in text:
        if "wrong_version_number" in text:
            return False, "TLS handshake failed: the server does not seem to use TLS"
        if "certificate_verify_failed" in text:
            return False, "TLS handshake failed: the server's certificate was not verified"
        return False, "TLS handshake failed"
    if "connection refused" in text:
        return False, "connection refused"
    if any(s in text for s in _NOT_CONNECTED):
        return False, tail or last
    return None


def target_authority(address: str) -> str | None:
    """The host:port a target names ("dns:///tokenwire-headless:50051" -> "tokenwire-headless:50051"),
    or None for one that names addresses only (ipv4:, ipv6:, unix:)."""
    if address.startswith("dns:"):
        rest = address[len("dns:") :]
        return rest[2:].split("/", 1)[-1] if rest.startswith("//") else rest
    scheme = address.split(":", 1)[0]
    return None if scheme in ("ipv4", "ipv6", "unix", "unix-abstract", "vsock") else address


def target_port(address: str) -> int | None:
    """The port a target dials (the first address's, for a list), or None when it names none."""
    rest = target_authority(address)
    if rest is None and address.startswith(("ipv4:", "ipv6:")):
        rest = address.split(":", 1)[1].split(",", 1)[0]
    if not rest or not rest.rsplit(":", 1)[-1].isdigit() or ":" not in rest:
        return None
    return int(rest.rsplit(":", 1)[1])


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


# A call that needs no particular service: any answer, even UNIMPLEMENTED, means the server was reached.
_PROBE = "/grpc.health.v1.Health/Check"
# How long a probe for the reason waits, once connect_timeout is spent: long enough for a channel in
# TRANSIENT_FAILURE to report its last error, too short to matter when it is still connecting.
_REASON_PROBE_S = 0.1


def _failed_attempt(error: grpc.RpcError) -> str | None:
    """What gRPC said of the failed connection attempt that failed a probe ("" for none: the probe's
    time ran out first); None when the probe reached the server (which answered it with an error)."""
    code = error.code() if hasattr(error, "code") else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ""
    details = (error.details() if hasattr(error, "details") else None) or ""
    return details if connect_failure(details) is not None else None


def _probe_sync(channel: grpc.Channel, config: ChannelConfig, timeout: float | None) -> str | None:
    """Connect with a call that does not wait for the channel: gRPC fails it as soon as an attempt to
    connect fails, saying why (refused, unknown host, TLS...). None once the server answered; else
    the reason, as _failed_attempt gives it."""
    check = channel.unary_unary(_PROBE)  # bytes in and out: an empty HealthCheckRequest is b""
    try:
        check(b"", timeout=timeout, metadata=config.metadata, wait_for_ready=False)
    except grpc.RpcError as error:
        return _failed_attempt(error)
    return None


async def _probe_async(channel: grpc.aio.Channel, config: ChannelConfig, timeout: float | None) -> str | None:
    """The asyncio form of _probe_sync."""
    check = channel.unary_unary(_PROBE)
    try:
        await check(b"", timeout=timeout, metadata=config.metadata, wait_for_ready=False)
    except grpc.aio.AioRpcError as error:
        return _failed_attempt(error)
    return None


def wait_ready_sync(channel: grpc.Channel, config: ChannelConfig, timeout: float | None) -> None:
    """Block until the channel is connected (gRPC retries with backoff meanwhile); Unavailable after
    `timeout` seconds (None: wait for ever), with the last attempt's reason. Without
    `config.wait_for_server`, the first failed attempt raises (InvalidArgument for a bad address)."""
    if _connected(channel):
        return
    if not config.wait_for_server:
        failed = _probe_sync(channel, config, timeout)
        if failed is not None:
            raise config.not_connected(failed, waited=not failed)
        return
    future = grpc.channel_ready_future(channel)
    try:
        future.result(timeout=timeout)
    except grpc.FutureTimeoutError:
        failed = _probe_sync(channel, config, _REASON_PROBE_S)
        if failed is not None:  # (None: it connected just now)
            raise config.not_connected(failed, waited=True) from None
    finally:
        future.cancel()  # unsubscribes from the channel's connectivity updates


async def wait_ready_async(channel: grpc.aio.Channel, config: ChannelConfig, timeout: float | None) -> None:
    """The asyncio form of wait_ready_sync."""
    if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
        return
    if not config.wait_for_server:
        failed = await _probe_async(channel, config, timeout)
        if failed is not None:
            raise config.not_connected(failed, waited=not failed)
        return
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        failed = await _probe_async(channel, config, _REASON_PROBE_S)
        if failed is not None:  # (None: it connected just now)
            raise config.not_connected(failed, waited=True) from None
