"""Private nats-server processes on free loopback ports: one server, or a 3-node cluster.

Each server runs JetStream (its own store directory), optionally the MQTT listener (sensors keep
speaking MQTT) and the partition mapping (:mod:`forecaster.serve.nats.partitions`), with the
monitoring port open so readiness is nats-server's own ``/healthz`` (JetStream up and, in a
cluster, a meta leader known) rather than an open port. Needs the ``nats-server`` program
(Debian package ``nats-server``; ``scripts/system-deps.sh`` installs it), never nats-py.

    from forecaster.harness.nats import NatsServer, NatsCluster

    with NatsServer(workdir / "nats", mappings=mappings_for(["sensors/+/flow"], 4)) as srv:
        srv.url, srv.mqtt_port          # nats://127.0.0.1:<p>, MQTT port for paho
    with NatsCluster(workdir / "cluster", size=3) as cluster:
        cluster.urls; cluster.nodes[1].kill(); cluster.nodes[1].start()

``restart()``/``start()`` after ``kill()`` reuse the ports and the store directory: what a
server restart looks like to clients.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from forecaster.harness.ports import (
    LOOPBACK,
    HarnessError,
    ServerChild,
    child_options,
    free_ports,
    server_binary,
    wait_port,
)


def nats_server_binary() -> str:
    """The nats-server executable; a one-line error that says how to install it otherwise."""
    return server_binary("nats-server", "scripts/system-deps.sh does it")


def _mappings_block(mappings: dict[str, str]) -> list[str]:
    if not mappings:
        return []
    return ["mappings = {", *(f'  "{s}": "{d}"' for s, d in mappings.items()), "}"]


@dataclass
class NatsServer(ServerChild):
    """One nats-server with JetStream; ports 0 are picked free at the first start."""

    what: ClassVar[str] = "nats-server"

    workdir: Path
    name: str = "fc1"
    host: str = LOOPBACK
    port: int = 0
    #: monitoring port (``/healthz``, ``/jsz``); always on, loopback
    http_port: int = 0
    #: the MQTT listener (needs JetStream and a server name, both given here)
    mqtt: bool = True
    mqtt_port: int = 0
    #: subject mappings, e.g. :func:`forecaster.serve.nats.partitions.mappings_for`
    mappings: dict[str, str] = field(default_factory=dict)
    #: cluster: name, our route port and every node's route port (ours included)
    cluster_name: str | None = None
    cluster_port: int = 0
    routes: list[int] = field(default_factory=list)
    max_payload: int | None = None
    max_file_store: str = "8GB"
    max_memory_store: str = "1GB"
    #: further nats-server.conf lines, verbatim
    extra: list[str] = field(default_factory=list)
    start_timeout: float = 60.0
    #: wait for ``/healthz`` (JetStream ready) in ``start()``; a cluster node waits in the cluster
    wait_healthy: bool = True
    new_session: bool = False
    die_with_parent: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def conf_path(self) -> Path:
        return self.workdir / "nats-server.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "nats-server.log"

    @property
    def store_dir(self) -> Path:
        return self.workdir / "jetstream"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def pick_ports(self, supply: Iterator[int] | None = None) -> None:
        """Choose free ports, distinct from each other, for every port still 0 (done by
        ``start()``); ``supply``: ports already picked together (a cluster's, so no two nodes
        get the same one either)."""
        unset = self.unset_ports()
        picked = iter(free_ports(len(unset), self.host)) if supply is None else supply
        for name in unset:
            setattr(self, name, next(picked))

    def unset_ports(self) -> list[str]:
        """The names of the ports still 0 that this server needs."""
        wanted = ["port", "http_port"]
        if self.mqtt:
            wanted.append("mqtt_port")
        if self.cluster_name is not None:
            wanted.append("cluster_port")
        return [name for name in wanted if getattr(self, name) == 0]

    def conf_text(self) -> str:
        lines = [
            f"server_name: {self.name}",
            f"listen: {self.host}:{self.port}",
            f"http: {self.host}:{self.http_port}",
            "jetstream {",
            f"  store_dir: {json.dumps(str(self.store_dir))}",
            f"  max_memory_store: {self.max_memory_store}",
            f"  max_file_store: {self.max_file_store}",
            "}",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.mqtt:
            lines += ["mqtt {", f"  listen: {self.host}:{self.mqtt_port}", "}"]
        if self.cluster_name is not None:
            routes = ", ".join(f"nats-route://{self.host}:{p}" for p in self.routes)
            lines += [
                "cluster {",
                f"  name: {self.cluster_name}",
                f"  listen: {self.host}:{self.cluster_port}",
                f"  routes: [ {routes} ]",
                "}",
            ]
        lines += _mappings_block(self.mappings)
        return "\n".join([*lines, *self.extra, ""])

    def check_config(self) -> None:
        """``nats-server -t``: raise HarnessError with the server's words if it refuses the
        config (used by the tests of deploy/ configs too)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pick_ports()
        self.conf_path.write_text(self.conf_text())
        out = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(self.conf_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise HarnessError(f"nats-server refused {self.conf_path}: {out.stderr or out.stdout}")

    def start(self) -> NatsServer:
        """Write the config and start the server; return once it accepts clients (and, with
        ``wait_healthy``, once ``/healthz`` says JetStream is ready)."""
        if self.running:
            raise HarnessError(f"nats-server {self.name} on port {self.port} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pick_ports()
        self.conf_path.write_text(self.conf_text())
        with self.log_path.open("ab") as log:
            offset = log.tell()
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(self.conf_path)],
                stdout=log,
                stderr=log,
                **child_options(self.new_session, self.die_with_parent),
            )
        try:
            wait_port(self.port, self.host, self.start_timeout, self.proc)
            if self.mqtt:
                wait_port(self.mqtt_port, self.host, self.start_timeout, self.proc)
            if self.wait_healthy:
                self.wait_healthy_for(self.start_timeout)
        except HarnessError as exc:
            self.kill()
            said = self.log_text()[offset:]
            raise HarnessError(
                f"nats-server {self.name} did not start ({exc}); it said:\n{said[-2000:]}"
            ) from None
        return self

    def healthz(self) -> tuple[bool, str]:
        """nats-server's ``/healthz``: (ok, its answer)."""
        url = f"http://{self.host}:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                return resp.status == 200, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return False, exc.read().decode(errors="replace")
        except OSError as exc:
            return False, str(exc)

    def wait_healthy_for(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        said = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise HarnessError(f"nats-server {self.name} exited {self.proc.returncode}")
            ok, said = self.healthz()
            if ok:
                return
            time.sleep(0.1)
        raise HarnessError(f"nats-server {self.name} not healthy after {timeout} s: {said}")


@dataclass
class NatsCluster:
    """``size`` nats-servers routed to each other on loopback (cluster ``fc``), each with
    JetStream, MQTT and the same mappings; ready once every node's ``/healthz`` is ok."""

    workdir: Path
    size: int = 3
    mappings: dict[str, str] = field(default_factory=dict)
    mqtt: bool = True
    max_payload: int | None = None
    start_timeout: float = 90.0
    new_session: bool = False
    die_with_parent: bool = False
    nodes: list[NatsServer] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        for i in range(self.size):
            self.nodes.append(
                NatsServer(
                    self.workdir / f"n{i + 1}",
                    name=f"n{i + 1}",
                    mqtt=self.mqtt,
                    mappings=dict(self.mappings),
                    cluster_name="fc",
                    max_payload=self.max_payload,
                    max_file_store="2GB",
                    max_memory_store="256MB",
                    start_timeout=self.start_timeout,
                    wait_healthy=False,
                    new_session=self.new_session,
                    die_with_parent=self.die_with_parent,
                )
            )

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> NatsCluster:
        count = sum(len(node.unset_ports()) for node in self.nodes)
        supply = iter(free_ports(count, self.nodes[0].host))
        for node in self.nodes:
            node.pick_ports(supply)
        ports = [n.cluster_port for n in self.nodes]
        for node in self.nodes:
            node.routes = list(ports)
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_healthy_for(self.start_timeout)
        except HarnessError:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
