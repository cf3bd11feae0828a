"""A private mosquitto on a free loopback port, with a generated config.

Tests, benchmarks and the demo each need a broker nobody else uses: its own port, its own
persistence directory, limits set on purpose (mosquitto silently drops a client's backlog beyond
``max_queued_messages``, which would read as the daemon losing readings). The config is written
from the fields below, so a test says ``Broker(dir, max_queued_messages=0)`` rather than editing
text. ``restart()`` comes back on the same port with the same persistence directory: what a
broker restart looks like to its clients.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from forecaster.harness.ports import (
    LOOPBACK,
    HarnessError,
    ServerChild,
    child_options,
    free_port,
    server_binary,
    wait_port,
)


def mosquitto_binary() -> str:
    """The mosquitto executable; a one-line error that says how to install it otherwise."""
    return server_binary("mosquitto", "make test does it")


@dataclass
class Broker(ServerChild):
    """One mosquitto process; ``port = 0`` picks a free port at the first start."""

    what: ClassVar[str] = "broker"

    workdir: Path
    port: int = 0
    host: str = LOOPBACK
    #: keep sessions and queued messages across a restart (written every ``autosave_interval`` s)
    persistence: bool = True
    autosave_interval: int = 1
    #: per-client queue limits; mosquitto drops beyond them silently (0 = no limit)
    max_queued_messages: int = 100_000
    max_queued_bytes: int = 0
    max_inflight_messages: int = 0
    tcp_nodelay: bool = False
    allow_anonymous: bool = True
    #: a ``mosquitto_passwd`` file; implies clients must log in unless ``allow_anonymous``
    password_file: Path | None = None
    #: TLS on the listener: CA, certificate and key files (all three or none)
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    #: further mosquitto.conf lines, verbatim
    extra: list[str] = field(default_factory=list)
    start_timeout: float = 30.0
    #: start mosquitto in its own session (Ctrl-C in our terminal does not reach it)
    new_session: bool = False
    #: Linux: mosquitto gets SIGTERM when the thread that started it exits
    die_with_parent: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def conf_text(self) -> str:
        """The mosquitto.conf for the fields above (one listener, nothing else exposed)."""
        lines = [f"listener {self.port} {self.host}"]
        lines.append(f"allow_anonymous {'true' if self.allow_anonymous else 'false'}")
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        tls = (self.cafile, self.certfile, self.keyfile)
        if any(tls):
            if not all(tls):
                raise HarnessError("TLS needs cafile, certfile and keyfile together")
            lines += [
                f"cafile {self.cafile}",
                f"certfile {self.certfile}",
                f"keyfile {self.keyfile}",
            ]
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                f"autosave_interval {self.autosave_interval}",
            ]
        else:
            lines.append("persistence false")
        lines += [
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {self.max_queued_bytes}",
            f"max_inflight_messages {self.max_inflight_messages}",
        ]
        if self.tcp_nodelay:
            lines.append("set_tcp_nodelay true")
        if os.geteuid() == 0:
            # as root mosquitto drops to user "mosquitto", who cannot write our workdir
            lines.append("user root")
        return "\n".join([*lines, *self.extra, ""])

    def start(self) -> Broker:
        """Write the config and start mosquitto; return once it accepts connections.

        With an automatically chosen port, a port taken between our pick and mosquitto's bind
        (other tests run beside us) is retried with a new one; a fixed port is not changed.
        """
        if self.running:
            raise HarnessError(f"the broker on port {self.port} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        auto = self.port == 0
        for attempt in range(5):
            if auto:
                self.port = free_port(self.host)
            self.conf_path.write_text(self.conf_text())
            with self.log_path.open("ab") as log:
                offset = log.tell()
                self.proc = subprocess.Popen(
                    [mosquitto_binary(), "-c", str(self.conf_path)],
                    stdout=log,
                    stderr=log,
                    **child_options(self.new_session, self.die_with_parent),
                )
            try:
                wait_port(self.port, self.host, self.start_timeout, self.proc)
                return self
            except HarnessError:
                self.kill()
                said = self.log_text()[offset:]
                if auto and attempt < 4 and "in use" in said:
                    continue
                raise HarnessError(
                    f"mosquitto did not start on {self.host}:{self.port}; it said:\n{said[-2000:]}"
                ) from None
        raise AssertionError("unreachable")
