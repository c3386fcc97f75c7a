"""Client-side balancing without a proxy: `load_balancing="round_robin"` spreads generations over two real
server processes behind one target, and a Cancel of a generation reaches the server that runs it.

In Kubernetes the target is a headless Service (`dns:///tokenwire-headless:50051`), whose name resolves
to every pod's IP at one port. Here the two servers listen on 127.0.0.1 and 127.0.0.2 at one port, named
by an `ipv4:` target list (gRPC's dns resolver needs one port for every address, as a headless Service
has), and each runs with its address as `--replica-id`, as deploy/kubernetes sets it to the pod's IP.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.reliability.conftest import ServerProcess
from tokenwire.client import AsyncClient, Client, StopReason

HOSTS = ("127.0.0.1", "127.0.0.2")
SHORT = 10  # generations spread over the servers
LONG = 400  # tokens at STEP_S each: ~4 s, cancelled long before
STEP_S = 0.01


def _port_free_on_every_host() -> int:
    for _ in range(20):
        with socket.socket() as first:
            first.bind((HOSTS[0], 0))
            port = int(first.getsockname()[1])
            try:
                with socket.socket() as second:
                    second.bind((HOSTS[1], port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free on both loopback addresses")


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    """`ipv4:127.0.0.1:P,127.0.0.2:P`, two server processes whose replica ids are their addresses."""
    try:
        with socket.socket() as probe:
            probe.bind((HOSTS[1], 0))
    except OSError:
        pytest.skip("127.0.0.2 is not a local address here (Linux routes all of 127.0.0.0/8 to loopback)")
    port = _port_free_on_every_host()
    servers = []
    try:
        for host in HOSTS:
            servers.append(
                ServerProcess(
                    "--host", host, "--port", str(port), "--replica-id", host, "--step-delay", str(STEP_S)
                )
            )
        yield "ipv4:" + ",".join(f"{host}:{port}" for host in HOSTS)
    finally:
        for server in servers:
            server.stop()


async def test_async_client_spreads_generations_and_cancels_reach_their_server(target: str) -> None:
    async with AsyncClient(target, load_balancing="round_robin") as client:
        await client.health()
        await asyncio.sleep(0.2)  # round_robin connects to every address; let the second be READY too
        served: Counter[str | None] = Counter()
        for number in range(SHORT):
            generation = client.generate(" hello", max_tokens=4, request_id=f"short-{number}")
            async for _ in generation:
                pass
            served[generation.replica] += 1
        assert set(served) == set(HOSTS) and min(served.values()) >= SHORT // 2 - 1, served

        long = [client.generate(" hello", max_tokens=LONG, request_id=f"long-{n}") for n in range(8)]
        await asyncio.gather(*(anext(generation) for generation in long))  # each is surely running
        assert {generation.replica for generation in long} == set(HOSTS)
        # One more call moves round_robin on by one: sent over the balanced channel, every Cancel would
        # now reach the other server (measured: 0 of 20 found; without this call, 20 of 20 by luck).
        await client.health()
        cancelled = [await client.cancel(generation.request_id) for generation in long]
        assert all(result.found for result in cancelled), [r.found for r in cancelled]
        for generation in long:
            assert (await generation.final_result()).reason == StopReason.CANCELLED


async def test_another_process_cancels_by_the_replica_it_was_told(target: str) -> None:
    """Another client knows only the id and the replica (its IP): the Cancel goes to that server. Without
    the replica, the round_robin channel sends it to whichever server is next."""
    async with (
        AsyncClient(target, load_balancing="round_robin") as starter,
        AsyncClient(target, load_balancing="round_robin") as other,
    ):
        long = [starter.generate(" hello", max_tokens=LONG, request_id=f"other-{n}") for n in range(6)]
        await asyncio.gather(*(anext(generation) for generation in long))
        replicas = {generation.request_id: generation.replica for generation in long}
        results = [await other.cancel(request_id, replica=replicas[request_id]) for request_id in replicas]
        assert all(result.found for result in results)
        for generation in long:
            assert (await generation.final_result()).reason == StopReason.CANCELLED


def test_sync_client_spreads_generations_and_cancels_reach_their_server(target: str) -> None:
    with Client(target, load_balancing="round_robin") as client:
        client.health()
        served: Counter[str | None] = Counter()
        for number in range(SHORT):
            with client.generate(" hello", max_tokens=4, request_id=f"sync-short-{number}") as generation:
                for _ in generation:
                    pass
            served[generation.replica] += 1
        assert set(served) == set(HOSTS), served

        long = [client.generate(" hello", max_tokens=LONG, request_id=f"sync-long-{n}") for n in range(6)]
        for generation in long:
            next(iter(generation))
        assert {generation.replica for generation in long} == set(HOSTS)
        client.health()  # round_robin moves on by one (see the async test)
        assert all(client.cancel(generation.request_id).found for generation in long)
        assert all(generation.final_result().reason == StopReason.CANCELLED for generation in long)


def test_load_balancing_names_a_policy_grpc_has() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        Client("127.0.0.1:1", load_balancing="round-robin")
    with pytest.raises(ValueError, match="load_balancing"):
        Client("127.0.0.1:1", load_balancing="round_robin", channel=object())  # type: ignore[arg-type]
