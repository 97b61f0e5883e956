"""A deployment orchestration: validate a manifest, build artifacts, run services, verify health.

"Services" are real HTTP servers on loopback ports, one per service, checked over HTTP; build
hashes generated artifact bytes. Nothing here sleeps for show: waits are health-check intervals.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
import urllib.request
from dataclasses import dataclass, field

STEPS = ("validate", "build", "run", "verify")


class DeployStepFailed(Exception):
    """A deployment step failed."""


@dataclass
class Service:
    name: str
    server: http.server.ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@dataclass
class Deployment:
    stack: str
    environment: str
    service_names: list[str]
    services: list[Service] = field(default_factory=list)

    def manifest(self) -> dict[str, object]:
        return {"stack": self.stack, "environment": self.environment, "services": self.service_names}


def validate(deployment: Deployment) -> dict[str, object]:
    if not deployment.stack.replace("-", "").isalnum():
        raise DeployStepFailed(f"stack name {deployment.stack!r} may hold only letters, digits and '-'")
    if len(set(deployment.service_names)) != len(deployment.service_names):
        raise DeployStepFailed("service names must be unique")
    return deployment.manifest()


def build(deployment: Deployment, megabytes: int, on_progress: object = None) -> str:
    """Hash `megabytes` of generated artifact bytes per service; returns the release digest."""
    release = hashlib.sha256()
    block = bytes(range(256)) * 4096  # 1 MiB
    total = max(1, megabytes * len(deployment.service_names))
    done = 0
    for name in deployment.service_names:
        artifact = hashlib.sha256(name.encode())
        for _ in range(megabytes):
            artifact.update(block)
            done += 1
            if callable(on_progress):
                on_progress(done / total)
        release.update(artifact.digest())
    return release.hexdigest()


def run(deployment: Deployment, digest: str) -> None:
    for name in deployment.service_names:
        handler = _health_handler(name, digest)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, name=f"svc-{name}", daemon=True)
        thread.start()
        deployment.services.append(Service(name, server, thread))


def verify(deployment: Deployment, digest: str, checks: int, interval: float, on_check: object = None) -> list[dict[str, object]]:
    report = []
    total = max(1, checks * len(deployment.services))
    done = 0
    for service in deployment.services:
        for _ in range(checks):
            with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/health", timeout=5) as response:
                body = response.read().decode()
            if body != f"ok {service.name} {digest[:12]}":
                raise DeployStepFailed(f"service {service.name} answered {body!r}")
            done += 1
            if callable(on_check):
                on_check(done / total)
            if interval:
                time.sleep(interval)
        report.append({"name": service.name, "port": service.port, "healthy": True, "checks": checks})
    return report


def tear_down(deployment: Deployment) -> None:
    for service in deployment.services:
        service.server.shutdown()
        service.server.server_close()


def _health_handler(name: str, digest: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"ok {name} {digest[:12]}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Health
