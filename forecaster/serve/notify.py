"""The sd_notify protocol, spoken directly: one datagram per state change, no dependency.

systemd's ``Type=notify`` waits for ``READY=1`` before calling the unit started, and
``WatchdogSec=`` restarts the service when ``WATCHDOG=1`` stops arriving. The protocol is a few
``KEY=value`` lines sent to the AF_UNIX datagram socket named in ``$NOTIFY_SOCKET``; the
python-systemd bindings would add a C extension to the serving set for that.

Every method is a no-op without ``$NOTIFY_SOCKET`` (running in a terminal, in tests, in a
container) and none raises: a lost notification must not take the daemon down. A lost ``READY=1``
or watchdog ping does surface anyway, as a start-up timeout or a watchdog restart in the journal,
and each failure is logged here.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """A connection to the service manager's notification socket, if there is one.

    ``env`` defaults to ``os.environ`` read at construction (not at import), so tests pass their
    own mapping and the daemon's environment is never mutated.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._address = self._parse_address(self._env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        # The inference loop pings the watchdog while the main thread may send STATUS/RELOADING.
        self._lock = threading.Lock()

    @staticmethod
    def _parse_address(raw: str) -> str | None:
        if not raw:
            return None
        if raw.startswith("@"):
            # Abstract namespace: the leading NUL is how Linux spells it to bind/sendto.
            return "\0" + raw[1:]
        if raw.startswith("/"):
            return raw
        # systemd ≥ 254 may hand out "vsock:CID:PORT"; nothing in our unit asks for that.
        log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX path; notifications disabled", raw)
        return None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram; True if it was sent.

        One datagram carries all fields so the manager applies them atomically (e.g. READY with
        its STATUS). Returns False both when disabled and on failure; the failure is logged.
        """
        if self._address is None:
            return False
        message = "\n".join(fields).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock = sock
                self._sock.sendto(message, self._address)
            except OSError as exc:
                log.warning("sd_notify %r to %r failed: %s", fields, self._address, exc)
                self._close_locked()
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) finished: systemd lets dependants start and stops waiting."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def reloading(self) -> bool:
        """A reload began; send :meth:`ready` when it ends.

        ``MONOTONIC_USEC`` lets systemd ≥ 253 (``Type=notify-reload``) match this message to the
        reload it requested; older managers ignore the field.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Shutdown began, so a slow drain shows as 'deactivating' rather than a hang."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """Free-form one-line state, shown by ``systemctl status``."""
        return self.notify(_status_field(text))

    def watchdog(self) -> bool:
        """Keep-alive; must come from the inference loop so a wedged loop gets restarted."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when no watchdog applies to this process.

        This is systemd's full timeout; ping at half of it (sd_watchdog_enabled's advice) so one
        slow loop turn does not cost a restart. ``$WATCHDOG_PID`` names the process meant; a child
        that inherited the variables must not think it is watched.
        """
        raw = self._env.get("WATCHDOG_USEC")
        if not raw:
            return None
        try:
            usec = int(raw)
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_USEC=%r", raw)
            return None
        if usec <= 0:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                log.warning("ignoring malformed WATCHDOG_PID=%r", pid)
                return None
        return usec / 1_000_000

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except (
                OSError
            ) as exc:  # close() of a datagram socket should not fail; say so if it does
                log.warning("closing the notify socket failed: %s", exc)
            self._sock = None


def _status_field(text: str) -> str:
    # A newline would start a new KEY=value field: a status text could then forge READY=1.
    return "STATUS=" + " ".join(text.splitlines())
