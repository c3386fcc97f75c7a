"""tokenwire replicas behind a real nginx (`grpc_pass`, routing as deploy/nginx/tokenwire.conf does):
bidi streams with in-band Interrupts, Cancels routed to their replica by the x-tokenwire-replica header
(2 replicas, then 3), quiet streams kept alive past nginx's idle timeouts by heartbeats (and cut without
them), and a replica killed mid-stream. nginx is installed from Debian when missing.

Run with `make test-proxy` (CI runs it too); the figures are printed (-s) and kept in build/proxy.json.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxy.nginx import Nginx, Timeouts, ensure_nginx, free_port, render_config
from tests.reliability.conftest import ROOT, ServerProcess
from tokenwire.client import AsyncClient, AsyncGeneration, StopReason, TokenWireError, Unavailable

pytestmark = pytest.mark.proxy

HEARTBEAT_S = 1.0  # replicas and clients, in this test (15 s by default)
IDLE_TIMEOUT_S = 3.0  # nginx's client_body_timeout and grpc_read_timeout, in this test (60 s by default)
IDLE_FOR_S = 3 * IDLE_TIMEOUT_S  # how long the idle streams stay quiet
STEP_S = 0.01  # the fake model's decode step: a LONG generation runs ~LONG * STEP_S s
LONG = 400
CANCELS = 20
FIGURES: dict[str, object] = {}


def _replica(replica_id: str, heartbeat_s: float = HEARTBEAT_S) -> ServerProcess:
    return ServerProcess(
        "--replica-id", replica_id, "--heartbeat-interval", str(heartbeat_s), "--step-delay", str(STEP_S)
    )


class Cluster:
    """Replicas (child processes) and the nginx in front of them, with short idle timeouts."""

    def __init__(self, nginx_binary: str, workdir: Path) -> None:
        self.binary = nginx_binary
        self.workdir = workdir
        self.replicas: dict[str, ServerProcess] = {}
        self.timeouts = Timeouts(IDLE_TIMEOUT_S, IDLE_TIMEOUT_S, IDLE_TIMEOUT_S)
        self.nginx: Nginx | None = None

    def scale(self, count: int) -> None:
        """Start replicas r1..r<count> that are not running yet, then (re)configure nginx for them."""
        for number in range(1, count + 1):
            if f"r{number}" not in self.replicas:
                self.replicas[f"r{number}"] = _replica(f"r{number}")
        port = self.nginx.port if self.nginx is not None else free_port()
        addresses = {name: replica.address for name, replica in self.replicas.items()}
        config = render_config(self.workdir, port, addresses, self.timeouts)
        if self.nginx is None:
            self.nginx = Nginx(self.binary, self.workdir, config, port)
        else:
            self.nginx.reload(config)

    @property
    def address(self) -> str:
        assert self.nginx is not None
        return self.nginx.address

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        for replica in self.replicas.values():
            replica.stop()


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    binary, why = ensure_nginx()
    if binary is None:
        pytest.skip(f"needs nginx: {why}")
    return binary


@pytest.fixture(scope="module")
def cluster(nginx_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(nginx_binary, tmp_path_factory.mktemp("nginx"))
    try:
        cluster.scale(2)
        yield cluster
    finally:
        cluster.stop()
        out = ROOT / "build" / "proxy.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(FIGURES, indent=2) + "\n")
        print(f"\nproxy figures: {json.dumps(FIGURES)}")


async def _running(client: AsyncClient, **options: object) -> AsyncGeneration:
    """A long generation that has sent its first chunk, so it is surely running on its replica."""
    generation = client.generate(" hello", max_tokens=LONG, **options)  # type: ignore[arg-type]
    await asyncio.wait_for(anext(generation), 10)
    assert generation.replica is not None, "the proxy passed on no replica header"
    return generation


def test_the_shipped_nginx_configuration_is_accepted(nginx_binary: str, tmp_path: Path) -> None:
    """deploy/nginx/tokenwire.conf, included in an http block as its comment says, passes `nginx -t`,
    and routes as render_config (which the tests below run) does."""
    shipped = ROOT / "deploy" / "nginx" / "tokenwire.conf"
    text = shipped.read_text()
    for directive in (
        "map $http_x_tokenwire_replica $tokenwire_upstream",
        "grpc_pass grpc://$tokenwire_upstream;",
        "client_max_body_size 0;",
        "client_body_timeout",
        "grpc_read_timeout",
    ):
        assert directive in text and directive.split()[0] in render_config(tmp_path, 1, {"r": "x:1"})
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{ access_log off; include {shipped}; }}\n"
    )
    check = subprocess.run(
        [nginx_binary, "-t", "-p", str(tmp_path), "-c", str(main)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stderr


async def test_bidi_stream_with_an_in_band_interrupt(cluster: Cluster) -> None:
    async with AsyncClient(cluster.address, heartbeat_s=HEARTBEAT_S) as client, client.stream() as stream:
        story = await stream.start(" hello", max_tokens=LONG)
        short = await stream.start(" world", max_tokens=20)
        await asyncio.wait_for(anext(story), 10)
        heard = await asyncio.wait_for(stream.interrupt(story.request_id), 5)
        assert heard.reason is StopReason.INTERRUPTED and heard.usage.completion_tokens < LONG
        rest = [chunk async for chunk in story]  # anything sent before the stop, then nothing more
        assert heard.sent_text_chars == len(story.result.text) and len(rest) < LONG
        assert (await short.final_result()).reason is StopReason.MAX_TOKENS
        assert stream.replica in cluster.replicas
    FIGURES["interrupt"] = {"reason": heard.reason.name, "tokens_before_stop": heard.usage.completion_tokens}


async def _cancel_round(cluster: Cluster, label: str) -> None:
    """CANCELS generations cancelled from another connection with the replica they report, CANCELS
    cancelled by the client that started them (which adds the header itself), and CANCELS Cancels
    without the header, for comparison: nginx then picks any replica."""
    routed = {"other_connection": 0, "own_client": 0, "no_header": 0}
    replicas: Counter[str] = Counter()
    async with AsyncClient(cluster.address) as client, AsyncClient(cluster.address) as other:
        for way in routed:
            for _ in range(CANCELS):
                generation = await _running(client)
                replicas[generation.replica or ""] += 1
                if way == "other_connection":
                    answer = await other.cancel(generation.request_id, replica=generation.replica)
                elif way == "own_client":
                    answer = await client.cancel(generation.request_id)
                else:
                    answer = await other.cancel(generation.request_id)  # never started there: no header
                if answer.found:
                    routed[way] += 1
                    assert (await generation.final_result()).reason is StopReason.CANCELLED
                else:
                    await generation.aclose()
    FIGURES[f"cancels_{label}"] = {**{k: f"{v}/{CANCELS}" for k, v in routed.items()}, "streams": replicas}
    assert routed["other_connection"] == CANCELS and routed["own_client"] == CANCELS, routed
    assert set(replicas) == set(cluster.replicas), replicas  # nginx spread the streams over them all


async def test_cancels_reach_their_replica_before_and_after_scaling(cluster: Cluster) -> None:
    await _cancel_round(cluster, "2_replicas")
    cluster.scale(3)
    await _cancel_round(cluster, "3_replicas")


async def _stream_fate(address: str, client_heartbeat_s: float | None) -> dict[str, object]:
    """A turn on a stream, then nothing for IDLE_FOR_S (a conversation waiting for its user), then
    another turn on it: what happened."""
    async with AsyncClient(address, heartbeat_s=client_heartbeat_s) as client:
        stream = client.stream()
        await stream.__aenter__()
        first = await stream.start(" hello", max_tokens=5)
        await asyncio.wait_for(first.final_result(), 10)
        loop = asyncio.get_running_loop()
        opened = loop.time()
        while not stream._ended and loop.time() - opened < IDLE_FOR_S:
            await asyncio.sleep(0.05)
        quiet_s = loop.time() - opened
        try:
            generation = await stream.start(" hello", max_tokens=10)
            result = await asyncio.wait_for(generation.final_result(), 10)
        except TokenWireError as error:
            stream.cancel()
            return {"survived": False, "cut_after_s": round(quiet_s, 1), "error": type(error).__name__}
        await stream.aclose()
        return {"survived": True, "quiet_s": round(quiet_s, 1), "then": result.reason.name}


async def test_heartbeats_keep_a_quiet_stream_past_the_proxy_idle_timeouts(
    cluster: Cluster, nginx_binary: str, tmp_path: Path
) -> None:
    """nginx 1.22 cuts an HTTP/2 gRPC stream silent both ways for client_body_timeout or
    grpc_read_timeout (INTERNAL, RST_STREAM); traffic either way restarts both timers. So each side's
    heartbeats alone keep it, and both are sent, for proxies that time each direction on its own."""
    both = await _stream_fate(cluster.address, HEARTBEAT_S)
    server_only = await _stream_fate(cluster.address, None)
    # A replica that sends no heartbeats, behind its own nginx with the same timeouts.
    quiet = _replica("quiet", heartbeat_s=0)
    try:
        config = render_config(tmp_path, port := free_port(), {"quiet": quiet.address}, cluster.timeouts)
        nginx = Nginx(nginx_binary, tmp_path, config, port)
        try:
            client_only = await _stream_fate(nginx.address, HEARTBEAT_S)
            neither = await _stream_fate(nginx.address, None)
        finally:
            nginx.stop()
    finally:
        quiet.stop()
    FIGURES["idle"] = {
        "nginx_timeouts_s": IDLE_TIMEOUT_S,
        "heartbeat_s": HEARTBEAT_S,
        "both_heartbeats": both,
        "server_heartbeats_only": server_only,
        "client_heartbeats_only": client_only,
        "no_heartbeats": neither,
    }
    for kept in (both, server_only, client_only):
        assert kept["survived"] and kept["then"] == "MAX_TOKENS", kept
    assert not neither["survived"], neither
    assert IDLE_TIMEOUT_S - 0.5 <= float(neither["cut_after_s"]) < IDLE_FOR_S, neither  # type: ignore[arg-type]


async def test_a_killed_replica_fails_its_streams_and_spares_the_others(cluster: Cluster) -> None:
    """Last in this module: it kills r1."""
    async with AsyncClient(cluster.address) as client:
        generations = [await _running(client) for _ in range(2 * len(cluster.replicas))]
        on_victim = [g for g in generations if g.replica == "r1"]
        others = [g for g in generations if g.replica != "r1"]
        assert on_victim and others
        killed_at = time.monotonic()
        cluster.replicas["r1"].process.kill()
        failed_after = []
        for generation in on_victim:
            with pytest.raises(TokenWireError) as failure:
                await asyncio.wait_for(generation.final_result(), 10)
            failed_after.append(time.monotonic() - killed_at)
            assert isinstance(failure.value, Unavailable), repr(failure.value)
        finished = [await asyncio.wait_for(g.final_result(), 30) for g in others]
        assert all(r.reason is StopReason.MAX_TOKENS and r.usage.completion_tokens == LONG for r in finished)
    FIGURES["killed_replica"] = {
        "streams_on_it": len(on_victim),
        "unavailable_after_s": round(max(failed_after), 3),
        "other_streams_finished": f"{len(finished)}/{len(others)}",
    }
    assert max(failed_after) < 2.0
