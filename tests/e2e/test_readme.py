"""The README's walk "From data to a live model", run as written: the blocks themselves.

The test reads every fenced block marked ``<!-- walk: terminal N -->`` out of README.md and runs
it the way a person would: terminal 1 is one long-lived shell fed block after block (so its
``cd`` and venv activation carry over), and the other terminals run their block in the
background until they are stopped with Ctrl-C (SIGINT to their process group). Only what the
README itself leaves open is set: ``HOME`` (so ``~/forecaster-walk`` is a temporary folder),
``MQTT_PORT`` (a free port), ``EPOCHS=1`` (the README names it for a quick look) and the metrics
port through the documented ``FORECASTER_METRICS__PORT`` (18090 may be taken on a test machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

import pytest

from forecaster.harness import free_port, wait_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- walk: terminal (\d+) -->\s*```sh\n(.*?)```", re.S)
DONE = "__walk_block_done__"


def walk_blocks(text: str) -> list[tuple[int, str]]:
    """(terminal, commands) for every marked block, in README order."""
    return [(int(n), body) for n, body in BLOCK.findall(text)]


class Shell:
    """One terminal: a bash fed commands on stdin, its output collected by a reader thread."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            ["bash", "--norc", "--noprofile"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        self.send("set -e")  # a failing command ends the shell: the test sees it at once

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            with self._lock:
                self.lines.append(line)

    @property
    def output(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def send(self, commands: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(commands + "\n")
        self.proc.stdin.flush()

    def run(self, commands: str, timeout: float) -> str:
        """Run one block to its end; the output it printed."""
        before = len(self.output)
        self.send(commands)
        self.send(f"echo {DONE}")
        ok = wait_until(
            lambda: DONE in self.output[before:] or self.proc.poll() is not None, timeout
        )
        out = self.output[before:]
        assert ok and DONE in out, f"block failed or timed out (exit {self.proc.poll()}):\n{out}"
        return out.replace(DONE + "\n", "")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def ctrl_c(proc: subprocess.Popen[str], timeout: float = 20.0) -> int | None:
    """What Ctrl-C in a terminal does: SIGINT to the foreground process group; the exit code."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
    return proc.returncode


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 (http://127.0.0.1)
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_walk_has_four_terminals() -> None:
    """The parser finds what the README promises; a renamed marker would skip the walk."""
    terminals = [n for n, _ in walk_blocks(README.read_text())]
    assert terminals == [1, 2, 3, 4, 1], terminals


@pytest.mark.broker
def test_readme_walk_runs_as_written(tmp_path: Path) -> None:
    for tool in ("mosquitto_sub", "make"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: make broker-deps installs it")
    blocks = walk_blocks(README.read_text())
    home = tmp_path / "home"
    home.mkdir()
    mqtt_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORECASTER_")}
    env.pop("VIRTUAL_ENV", None)
    env.update(
        HOME=str(home),
        MQTT_PORT=str(mqtt_port),
        EPOCHS="1",
        FORECASTER_METRICS__PORT=str(metrics_port),
    )
    bundled = ROOT / "models" / "water-flow" / "model.onnx"
    bundled_sha = sha256(bundled)
    walk = home / "forecaster-walk"

    term1 = Shell(env, ROOT)
    background: list[tuple[int, subprocess.Popen[str], Path]] = []
    try:
        out = term1.run(blocks[0][1], timeout=600)
        evaluation = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
        assert evaluation["n"] == 254, out
        assert "configuration OK" in out, out
        for made in ("models/water-flow/model.onnx", "holdout.csv", "holdout.png"):
            assert (walk / made).is_file(), f"{made} missing in the scratch folder\n{out}"

        for n, commands in blocks[1:-1]:
            log = tmp_path / f"terminal-{n}.log"
            proc = subprocess.Popen(
                ["bash", "--norc", "--noprofile", "-c", commands],
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
            background.append((n, proc, log))
            if n == 2:
                wait_port(mqtt_port, timeout=15, proc=proc)
            elif n == 3:
                url = f"http://127.0.0.1:{metrics_port}/readyz"
                assert wait_until(lambda u=url: ready(u), 60), log.read_text()
            elif n == 4:
                assert wait_until(lambda p=log: "forecaster/status online" in p.read_text(), 15), (
                    log.read_text()
                )

        out = term1.run(blocks[-1][1], timeout=120)
        sent = re.search(r"published (\d+) readings .*; (\d+) predictions came back", out)
        assert sent, out
        assert int(sent.group(1)) == 2540 and int(sent.group(2)) == 2540, out
        assert "warning" not in out, out

        sub_log = background[-1][2]
        assert wait_until(lambda: sub_log.read_text().count("forecast/sensors/") >= 2540, 30), (
            sub_log.read_text()[-2000:]
        )
    finally:
        codes = {n: ctrl_c(proc) for n, proc, _ in reversed(background)}
        term1.close()
    logs = "\n".join(f"--- terminal {n}\n{log.read_text()[-3000:]}" for n, _, log in background)
    assert codes.get(3) == 0, f"the daemon did not stop cleanly: {codes}\n{logs}"
    assert (walk / "state").is_dir(), logs
    assert (walk / "runs" / "water-flow" / "report.json").is_file()
    # Nothing landed in the clone, and the bundled model is untouched.
    assert sha256(bundled) == bundled_sha
    for litter in ("holdout.csv", "holdout.png", "forecaster.toml", "state"):
        assert not (ROOT / litter).exists(), f"{litter} was written into the repository"
