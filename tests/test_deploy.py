"""deploy/kubernetes: every manifest validates against Kubernetes' own schemas (kubernetes-validate bundles
them: no network), the nginx ConfigMap keeps deploy/nginx/tokenwire.conf's server block, and the pieces
that must agree do (grace periods, probe ports, the replica id)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes still maintained when these were written; gRPC probes are GA since 1.27.
VERSION = "1.31"


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, document)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def _find(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def _server_block(conf: str) -> str:
    return conf[conf.index("\nserver {") + 1 :]


def kubernetes_nginx_conf() -> str:
    return str(_find("ConfigMap", "tokenwire-nginx")["data"]["tokenwire.conf"])


@pytest.mark.parametrize("path, document", _documents(), ids=lambda v: getattr(v, "name", None) or "")
def test_manifest_validates_strictly(path: Path, document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, VERSION, strict=True)  # raises on any unknown or bad field


def test_the_shipped_manifests_hold_what_they_should() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in _documents())
    assert kinds == [
        ("ConfigMap", "tokenwire-nginx"),
        ("Deployment", "tokenwire"),
        ("Deployment", "tokenwire-nginx"),
        ("NetworkPolicy", "tokenwire-nginx-egress"),
        ("Service", "tokenwire"),
        ("Service", "tokenwire-headless"),
        ("Service", "tokenwire-replicas"),
    ]
    assert _find("Service", "tokenwire-headless")["spec"]["clusterIP"] == "None"
    assert _find("Service", "tokenwire-replicas")["spec"]["type"] == "ClusterIP"


def test_the_nginx_config_map_keeps_the_shipped_server_block() -> None:
    """Timeouts, body size and grpc_pass are deploy/nginx/tokenwire.conf's, character for character."""
    shipped = (ROOT / "deploy" / "nginx" / "tokenwire.conf").read_text()
    assert _server_block(kubernetes_nginx_conf()) == _server_block(shipped)


def test_grace_periods_probes_and_replica_id_agree() -> None:
    pod = _find("Deployment", "tokenwire")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    # The kubelet's SIGKILL must come after the preStop sleep, the drain, and closing the streams.
    assert pod["terminationGracePeriodSeconds"] >= sleep + float(env["TOKENWIRE_GRACE_PERIOD"]) + 5
    health_port = int(env["TOKENWIRE_HEALTH_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > float(env["TOKENWIRE_GRACE_PERIOD"])
    assert env["TOKENWIRE_REPLICA_ID"] == "$(POD_IP)"  # what the nginx map and round_robin clients route on
    assert env["TOKENWIRE_HOST"] == "0.0.0.0" and env["TOKENWIRE_HEALTH_HOST"] == "0.0.0.0"


def test_the_kubernetes_nginx_config_is_accepted(tmp_path: Path) -> None:
    """`nginx -t` on the ConfigMap's configuration (the upstream's Service name made local)."""
    nginx = shutil.which("nginx") or (shutil.which("/usr/sbin/nginx"))
    if nginx is None:
        pytest.skip("nginx is not installed (make test-proxy installs it and runs this too)")
    conf = tmp_path / "tokenwire.conf"
    conf.write_text(kubernetes_nginx_conf().replace("tokenwire-replicas:", "127.0.0.1:"))
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{ access_log off; include {conf}; }}\n"
    )
    check = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(main)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
