"""deploy/kubernetes/nginx.yaml's nginx configuration, run for real: replicas whose ids are their addresses
(as the Deployment sets --replica-id to the pod's IP), two on 127.0.0.1 and 127.0.0.2 at one port like
two pods, and the map that sends a Cancel to the address its x-tokenwire-replica header names."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxy.nginx import Nginx, ensure_nginx, free_port
from tests.reliability.conftest import ServerProcess
from tests.test_deploy import kubernetes_nginx_conf
from tokenwire.client import AsyncClient, StopReason

pytestmark = pytest.mark.proxy

HOSTS = ("127.0.0.1", "127.0.0.2")
LONG = 400
CANCELS = 20


def _port_free_on_every_host() -> int:
    for _ in range(20):
        port = free_port()
        try:
            with socket.socket() as second:
                second.bind((HOSTS[1], port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on both loopback addresses")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary, why = ensure_nginx()
    if binary is None:
        pytest.skip(why)
    port = _port_free_on_every_host()
    replicas = [
        ServerProcess("--host", host, "--port", str(port), "--replica-id", host, "--step-delay", "0.01")
        for host in HOSTS
    ]
    workdir: Path = tmp_path_factory.mktemp("nginx-kubernetes")
    listen = free_port()
    # The pods' port, the Service's name and nginx's listening address made local; the rest as shipped.
    routing = (
        kubernetes_nginx_conf()
        .replace(":50051;", f":{port};")
        .replace("server tokenwire-replicas:", "server 127.0.0.1:")
        .replace("    server 127.0.0.1:", f"    server {HOSTS[1]}:{port};\n    server 127.0.0.1:", 1)
        .replace("listen 50050 http2;", f"listen 127.0.0.1:{listen} http2;")
    )
    config = (
        f"daemon off;\npid {workdir}/nginx.pid;\nerror_log {workdir}/error.log info;\nevents {{}}\n"
        f"http {{\naccess_log off;\nclient_body_temp_path {workdir}/body;\n{routing}\n}}\n"
    )
    nginx = Nginx(binary, workdir, config, listen)
    try:
        yield nginx.address
    finally:
        nginx.stop()
        for replica in replicas:
            replica.stop()


async def test_cancels_from_another_connection_reach_the_pod_their_header_names(proxy: str) -> None:
    async with AsyncClient(proxy) as starter, AsyncClient(proxy) as other:
        generations = [
            starter.generate(" hello", max_tokens=LONG, request_id=f"k-{n}") for n in range(CANCELS)
        ]
        await asyncio.gather(*(anext(generation) for generation in generations))
        assert {generation.replica for generation in generations} == set(HOSTS)  # new streams spread
        found = [
            (await other.cancel(generation.request_id, replica=generation.replica)).found
            for generation in generations
        ]
        assert sum(found) == CANCELS, f"{sum(found)} of {CANCELS} cancels reached their replica"
        for generation in generations:
            assert (await generation.final_result()).reason == StopReason.CANCELLED
