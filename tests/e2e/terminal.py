"""A command run the way a person's terminal runs it, for the end-to-end tests.

The process leads its own process group (a terminal's foreground job), so :meth:`ctrl_c` sends
SIGINT to it and everything it started in that group, exactly what Ctrl-C does; its output is
collected by a reader thread, so a test can wait on what it printed without blocking.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO


class Terminal:
    """``args`` running in its own process group; stdout and stderr collected together."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        stdin: bool = False,
    ) -> None:
        self.proc = subprocess.Popen(
            list(args),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            with self._lock:
                self._lines.append(line)

    @property
    def output(self) -> str:
        """Everything printed so far."""
        with self._lock:
            return "".join(self._lines)

    def ctrl_c(self, timeout: float = 30.0) -> int | None:
        """SIGINT to the process group, as Ctrl-C does; the exit code, or None if it had to be
        killed after ``timeout``."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        self._reader.join(timeout=10)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to the whole group (cleanup after a failure)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
