"""``python -m benchmarks.nats`` runs end to end with tiny counts (one NATS contender with two
workers, one short trial); the raw NATS protocol parser of its load generators.

Checks the shape of the result files and that nothing was lost; never a speed target.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.nats import MsgReader

ROOT = Path(__file__).resolve().parents[1]


def test_msg_reader_handles_split_messages_and_pings() -> None:
    r = MsgReader()
    wire = (
        b"INFO {}\r\nMSG forecast.a 1 5\r\nhello\r\nPING\r\n"
        b"MSG forecast.b 1 _INBOX.x 2\r\nhi\r\n+OK\r\n"
    )
    msgs: list[tuple[bytes, bytes]] = []
    pings = 0
    for i in range(0, len(wire), 7):  # in awkward pieces
        got, p = r.feed(wire[i : i + 7])
        msgs += got
        pings += p
    assert msgs == [(b"forecast.a", b"hello"), (b"forecast.b", b"hi")]
    assert pings == 1
    with pytest.raises(ConnectionError, match="Authorization"):
        r.feed(b"-ERR 'Authorization Violation'\r\n")


def test_nats_benchmark_smoke(tmp_path: Path) -> None:
    if shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists():
        pytest.skip("nats-server is not installed (scripts/system-deps.sh)")
    pytest.importorskip("nats", reason="nats-py is not installed (the 'nats' extra)")
    out = tmp_path / "nats.json"
    cmd = [sys.executable, "-m", "benchmarks.nats", "--contenders", "nats-2", "--streams", "20"]
    cmd += ["--duration", "1.5", "--repeats", "1", "--window", "200", "--partitions", "4"]
    cmd += ["--no-takeover", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert {"command", "machine", "settings", "contenders", "ratios", "targets"} <= set(report)
    r = report["contenders"]["nats-2"]
    assert "error" not in r, r
    assert r["workers"] == 2 and sorted(r["owned_at_start"]) == [2.0, 2.0]
    assert r["readings_per_s"] > 0 and r["lost"] == 0, r
    assert r["exit_status"] == 0  # SIGTERM to the supervisor: both workers stopped cleanly
    assert len(r["lease_health"]) == 2 and "takeovers_total" in r["lease_health"][0]
    assert r["load_average"]["before"] and r["load_average"]["after"]
    md = out.with_suffix(".md").read_text()
    assert "| nats-2 |" in md and "nats-2 / nats-1 >= 1.6" in md
