"""A real nginx in front of tokenwire replicas on loopback: installing it from Debian when it is missing,
writing its configuration (the shape of deploy/nginx/tokenwire.conf), starting and reloading it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# Debian's packages that carry an nginx with the HTTP/2 and gRPC modules, smallest first.
NGINX_PACKAGES = ("nginx-light", "nginx-core", "nginx")
INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 10.0


def _nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def ensure_nginx() -> tuple[str | None, str]:
    """The nginx binary, installing it with apt-get when it is missing: (path, "") or (None, why not)."""
    found = _nginx_binary()
    if found:
        return found, ""
    apt = shutil.which("apt-get")
    if apt is None:
        return None, "nginx is not installed and there is no apt-get to install it with"
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None or subprocess.run([sudo, "-n", "true"], capture_output=True).returncode != 0:
            return None, "nginx is not installed, and installing it needs root (no password-less sudo)"
        prefix = [sudo, "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # The package's post-install script would start a system nginx on port 80: not wanted here.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not prefix and not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    try:
        update = subprocess.run(
            [*prefix, apt, "update"], env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
        )
        if update.returncode != 0:
            return None, f"apt-get update failed: {update.stderr.strip()[-300:]}"
        errors = []
        for package in NGINX_PACKAGES:
            install = subprocess.run(
                [*prefix, apt, "install", "-y", "--no-install-recommends", package],
                env=env,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
            )
            if install.returncode == 0 and _nginx_binary():
                return _nginx_binary(), ""
            errors.append(f"{package}: {install.stderr.strip()[-200:]}")
        return None, "no nginx package could be installed: " + "; ".join(errors)
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Timeouts:
    """nginx's idle timers on a gRPC stream, in seconds (deploy/ raises them; the test shortens them)."""

    client_body: float = 3600  # the request side silent this long: the stream is cut
    grpc_read: float = 3600  # the response side silent this long: the stream is cut
    grpc_send: float = 3600


def render_config(
    workdir: Path, listen_port: int, replicas: dict[str, str], timeouts: Timeouts = Timeouts()
) -> str:
    """A whole nginx.conf for `replicas` (replica id -> host:port), as deploy/nginx/tokenwire.conf
    has it: a map from the x-tokenwire-replica header to that replica's upstream, every replica
    otherwise (a new Generate stream), and idle timeouts as given."""
    names = {replica: "tokenwire_" + replica.replace("-", "_") for replica in replicas}
    routes = "\n".join(f"        {replica} {names[replica]};" for replica in replicas)
    upstreams = "\n".join(
        f"    upstream {names[replica]} {{ server {address}; }}" for replica, address in replicas.items()
    )
    every = "\n".join(f"        server {address};" for address in replicas.values())
    return f"""
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;

    map $http_x_tokenwire_replica $tokenwire_upstream {{
        default tokenwire_all;
{routes}
    }}
    upstream tokenwire_all {{
{every}
    }}
{upstreams}

    server {{
        listen 127.0.0.1:{listen_port} http2;
        client_max_body_size 0;
        client_body_timeout {timeouts.client_body:g}s;
        grpc_read_timeout {timeouts.grpc_read:g}s;
        grpc_send_timeout {timeouts.grpc_send:g}s;
        keepalive_timeout 3600s;
        location / {{
            grpc_pass grpc://$tokenwire_upstream;
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground as a child process, on a configuration written to `workdir`."""

    def __init__(self, binary: str, workdir: Path, config: str, port: int) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.config_path = workdir / "nginx.conf"
        self.config_path.write_text(config)
        self.check()
        self.process = subprocess.Popen(
            [binary, "-p", str(workdir), "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # it logs to error.log
        )
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def check(self) -> None:
        test = subprocess.run(
            [self.binary, "-t", "-p", str(self.workdir), "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert test.returncode == 0, f"nginx -t refused the configuration:\n{test.stderr}"

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"nginx exited: {self.error_log()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nginx did not listen on {self.address}: {self.error_log()}")

    def reload(self, config: str) -> None:
        """New configuration, gracefully (SIGHUP): open streams stay on the old workers."""
        self.config_path.write_text(config)
        self.check()
        self.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # the new workers take over; nothing to poll for but the log
        assert self.process.poll() is None, self.error_log()

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
