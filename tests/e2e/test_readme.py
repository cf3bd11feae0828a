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
import subprocess
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import pytest

from forecaster.harness import free_ports, wait_port, wait_until

from .terminal import Terminal

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- walk: terminal (\d+) -->\s*```sh\n(.*?)```", re.S)
DONE = "__walk_block_done__"


def walk_blocks(text: str) -> list[tuple[int, str]]:
    """(terminal, commands) for every marked block, in README order."""
    return [(int(n), body) for n, body in BLOCK.findall(text)]


class Shell(Terminal):
    """Terminal 1: one bash fed block after block on stdin, so ``cd`` and activation carry."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        super().__init__(["bash", "--norc", "--noprofile"], env, cwd, stdin=True)
        self.send("set -e")  # a failing command ends the shell: the test sees it at once

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
        """End of input, as closing the terminal; killed if it does not exit."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def printed(term: Terminal, text: str) -> bool:
    return text in term.output


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
    mqtt_port, metrics_port = free_ports(2)
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
    background: list[tuple[int, Terminal]] = []
    try:
        out = term1.run(blocks[0][1], timeout=600)
        evaluation = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
        assert evaluation["n"] == 254, out
        assert "configuration OK" in out, out
        for made in ("models/water-flow/model.onnx", "holdout.csv", "holdout.png"):
            assert (walk / made).is_file(), f"{made} missing in the scratch folder\n{out}"

        for n, commands in blocks[1:-1]:
            term = Terminal(["bash", "--norc", "--noprofile", "-c", commands], env, ROOT)
            background.append((n, term))
            if n == 2:
                wait_port(mqtt_port, timeout=15, proc=term.proc)
            elif n == 3:
                url = f"http://127.0.0.1:{metrics_port}/readyz"
                assert wait_until(partial(ready, url), 60), term.output
            elif n == 4:
                online = partial(printed, term, "forecaster/status online")
                assert wait_until(online, 15), term.output

        out = term1.run(blocks[-1][1], timeout=120)
        sent = re.search(r"published (\d+) readings .*; (\d+) predictions came back", out)
        assert sent, out
        assert int(sent.group(1)) == 2540 and int(sent.group(2)) == 2540, out
        assert "warning" not in out, out

        sub = background[-1][1]
        assert wait_until(lambda: sub.output.count("forecast/sensors/") >= 2540, 30), sub.output[
            -2000:
        ]
    finally:
        codes = {n: term.ctrl_c() for n, term in reversed(background)}
        term1.close()
    logs = "\n".join(f"--- terminal {n}\n{term.output[-3000:]}" for n, term in background)
    assert codes.get(3) == 0, f"the daemon did not stop cleanly: {codes}\n{logs}"
    assert (walk / "state").is_dir(), logs
    assert (walk / "runs" / "water-flow" / "report.json").is_file()
    # Nothing landed in the clone, and the bundled model is untouched.
    assert sha256(bundled) == bundled_sha
    for litter in ("holdout.csv", "holdout.png", "forecaster.toml", "state"):
        assert not (ROOT / litter).exists(), f"{litter} was written into the repository"
