"""Deployment files are checked by the tools that will consume them, not by eye.

systemd-analyze, promtool and mosquitto are apt packages that CI installs; a missing one fails
these tests with the package to install, so a green run always means the files were checked.
"""

from __future__ import annotations

import getpass
import json
import re
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from prometheus_client import CollectorRegistry

from forecaster.harness import HarnessError, free_port, wait_port
from forecaster.serve.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "forecaster.service"
DEPLOY = ROOT / "deploy"
MAX_EXPOSURE = 2.0


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} not found: apt-get install -y {package} (CI installs it)")
    return path


def _run(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False, **kw
    )  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------
# systemd unit
# --------------------------------------------------------------------------------------------


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart's binary swapped for /bin/true (verify insists it exists)."""
    text = UNIT.read_text()
    swapped, n = re.subn(r"^ExecStart=/usr/local/bin/forecaster ", "ExecStart=/bin/true ", text,
                         flags=re.M)  # fmt: skip
    assert n == 1, "ExecStart=/usr/local/bin/forecaster ... not found in the unit"
    path = tmp_path / "forecaster.service"
    path.write_text(swapped)
    return path


def test_unit_verifies(unit_copy: Path) -> None:
    analyze = _tool("systemd-analyze", "systemd")
    res = _run(analyze, "verify", str(unit_copy))
    # verify exits 0 even for unknown keys or unparsable values; it only prints them.
    assert res.returncode == 0, res.stderr
    assert (res.stdout + res.stderr).strip() == "", res.stdout + res.stderr


def test_unit_exposure(unit_copy: Path) -> None:
    analyze = _tool("systemd-analyze", "systemd")
    res = _run(analyze, "security", "--offline=yes", str(unit_copy))
    assert res.returncode == 0, res.stderr
    match = re.search(
        r"Overall exposure level for forecaster\.service: (\d+(?:\.\d+)?)", res.stdout
    )
    assert match, res.stdout + res.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, res.stdout


def test_unit_contract() -> None:
    """What the daemon relies on (README 'integration'): catch an edit that silently drops it."""
    lines = set(UNIT.read_text().splitlines())
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "ExecStart=/usr/local/bin/forecaster serve --config "
        "${CONFIGURATION_DIRECTORY}/forecaster.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=forecaster",
        "ConfigurationDirectory=forecaster",
        "LoadCredential=mqtt-password:/etc/forecaster/mqtt-password",
        "Environment=FORECASTER_DAEMON__STATE_DIR=%S/forecaster",
        "MemoryDenyWriteExecute=yes",
    ):
        assert line in lines, line


# --------------------------------------------------------------------------------------------
# MemoryDenyWriteExecute=yes: ONNX Runtime inference under systemd's seccomp rule
# --------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _bytes(field: int, b: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(b)) + b


def _str(field: int, s: str) -> bytes:
    return _bytes(field, s.encode())


def _tensor(name: str, arr: np.ndarray) -> bytes:
    # TensorProto: dims=1, data_type=2 (1 = FLOAT), name=8, raw_data=9 (little-endian).
    dims = b"".join(_int(1, d) for d in arr.shape)
    return dims + _int(2, 1) + _str(8, name) + _bytes(9, arr.astype("<f4").tobytes())


def _value_info(name: str, shape: tuple[int | str, ...]) -> bytes:
    # ValueInfoProto{name=1, type=2 TypeProto{tensor_type=1 {elem_type=1, shape=2 {dim=1}}}}
    dims = b"".join(_bytes(1, _str(2, d) if isinstance(d, str) else _int(1, d)) for d in shape)
    tensor_type = _int(1, 1) + _bytes(2, dims)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(op: str, inputs: list[str], outputs: list[str], hidden: int | None = None) -> bytes:
    # NodeProto: input=1, output=2, name=3, op_type=4, attribute=5 {name=1, i=3, type=20 (INT=2)}
    body = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs)
    body += _str(3, f"{op.lower()}0") + _str(4, op)
    if hidden is not None:
        body += _bytes(5, _str(1, "hidden_size") + _int(3, hidden) + _int(20, 2))
    return body


def _rnn_model(features: int = 3, hidden: int = 8) -> bytes:
    """A one-step GRU and LSTM with a linear head, as an ONNX ModelProto.

    Encoded by hand because the ``onnx`` package belongs to the training extra; the daemon (and
    this check) must work with the serving set alone. The ops are the ones our bundles use.
    """
    rng = np.random.default_rng(0)
    f, h = features, hidden
    w = {
        "Wg": rng.normal(0, 0.3, (1, 3 * h, f)),
        "Rg": rng.normal(0, 0.3, (1, 3 * h, h)),
        "Bg": rng.normal(0, 0.1, (1, 6 * h)),
        "Wl": rng.normal(0, 0.3, (1, 4 * h, f)),
        "Rl": rng.normal(0, 0.3, (1, 4 * h, h)),
        "Bl": rng.normal(0, 0.1, (1, 8 * h)),
        "head": rng.normal(0, 0.3, (h, 1)),
    }
    nodes = [
        _node("GRU", ["x", "Wg", "Rg", "Bg", "", "h"], ["yg", "h_out"], hidden=h),
        _node("LSTM", ["x", "Wl", "Rl", "Bl", "", "h", "c"], ["yl", "hl_out", "c_out"], hidden=h),
        _node("MatMul", ["h_out", "head"], ["y"]),
    ]
    graph = b"".join(_bytes(1, n) for n in nodes) + _str(2, "rnn")
    graph += b"".join(_bytes(5, _tensor(k, v)) for k, v in w.items())
    graph += _bytes(11, _value_info("x", (1, "B", f)))
    graph += _bytes(11, _value_info("h", (1, "B", h)))
    graph += _bytes(11, _value_info("c", (1, "B", h)))
    graph += _bytes(12, _value_info("y", (1, "B", 1)))
    graph += _bytes(12, _value_info("h_out", (1, "B", h)))
    graph += _bytes(12, _value_info("hl_out", (1, "B", h)))
    graph += _bytes(12, _value_info("c_out", (1, "B", h)))
    # ModelProto: ir_version=1, producer_name=2, graph=7, opset_import=8 {domain=1, version=2}
    return _int(1, 8) + _str(2, "test_deploy") + _bytes(7, graph) + _bytes(8, _int(2, 17))


# Runs in a fresh interpreter: the filter must be in place before any library is loaded, exactly
# as systemd installs it before exec(). The rules mirror systemd 252's
# seccomp_memory_deny_write_execute(): mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect
# adding PROT_EXEC, and shmat with SHM_EXEC all fail with EPERM.
_MDWE_CHILD = r"""
import ctypes, errno, json, sys

lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)

class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_uint, ctypes.POINTER(ArgCmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_release.argtypes = [ctypes.c_void_p]
SCMP_ACT_ALLOW, SCMP_ACT_ERRNO, SCMP_CMP_MASKED_EQ = 0x7FFF0000, 0x00050000, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000

ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
assert ctx, "seccomp_init failed"
for name, mask in (("mmap", PROT_WRITE | PROT_EXEC), ("mprotect", PROT_EXEC),
                   ("pkey_mprotect", PROT_EXEC), ("shmat", SHM_EXEC)):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    assert nr >= 0, name
    cmp = ArgCmp(2, SCMP_CMP_MASKED_EQ, mask, mask)
    rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO | errno.EPERM, nr, 1, ctypes.byref(cmp))
    assert rc == 0, (name, rc)
rc = lib.seccomp_load(ctx)
assert rc == 0, f"seccomp_load: {rc}"
lib.seccomp_release(ctx)

# SystemCallFilter=: an allow-list, anything else fails (default action given by the parent).
allow = json.loads(sys.argv[2])
if allow is not None:
    ctx = lib.seccomp_init(allow["default"])
    assert ctx, "seccomp_init failed"
    for name in allow["syscalls"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:  # names of other architectures do not resolve here
            rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None)
            assert rc == 0, (name, rc)
    rc = lib.seccomp_load(ctx)
    assert rc == 0, f"seccomp_load: {rc}"
    lib.seccomp_release(ctx)

# Negative controls: the filter is really active.
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED, RW, MAP_PRIVATE_ANON = ctypes.c_void_p(-1).value, 0x1 | 0x2, 0x02 | 0x20
assert libc.mmap(None, 4096, RW | PROT_EXEC, MAP_PRIVATE_ANON, -1, 0) == MAP_FAILED
assert ctypes.get_errno() == errno.EPERM
page = libc.mmap(None, 4096, RW, MAP_PRIVATE_ANON, -1, 0)
assert page != MAP_FAILED
assert libc.mprotect(page, 4096, 0x1 | PROT_EXEC) == -1 and ctypes.get_errno() == errno.EPERM

# What the daemon loads, then inference at batch 1 and 64 on two intra-op threads.
import ssl
import numpy as np
import onnxruntime as ort
import paho.mqtt.client
import prometheus_client
import pydantic
import forecaster.serve.metrics, forecaster.serve.notify

ssl.create_default_context()
class Cfg(pydantic.BaseModel):
    port: int
Cfg.model_validate({"port": "1883"})

opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
out = {}
for b in (1, 64):
    x = np.linspace(-1, 1, 3 * b, dtype=np.float32).reshape(1, b, 3)
    h = np.zeros((1, b, 8), np.float32)
    y, h_out, hl, c = sess.run(None, {"x": x, "h": h, "c": h})
    out[b] = [y.tolist(), c.tolist()]
print(json.dumps(out))
"""


#: systemd.exec(5): allowed with any allow-list SystemCallFilter=, in addition to @default.
_IMPLICIT_SYSCALLS = {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}
SCMP_ACT_ERRNO_EPERM = 0x00050000 | 1  # SystemCallErrorNumber=EPERM


def _syscall_groups(analyze: str) -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: every @group with its members (names or @groups)."""
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in _run(analyze, "syscall-filter").stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def _unit_syscalls(analyze: str) -> list[str]:
    """The allow-list the unit's SystemCallFilter= lines produce, with groups expanded."""
    groups = _syscall_groups(analyze)

    def expand(item: str) -> set[str]:
        if not item.startswith("@"):
            return {item}
        return set().union(*(expand(m) for m in groups[item]))

    allowed: set[str] | None = None
    for line in UNIT.read_text().splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1]
        deny = value.startswith("~")
        items = set().union(*(expand(x) for x in value.lstrip("~").split()))
        if allowed is None:
            assert not deny, "the unit should start with an allow-list"
            allowed = items | _IMPLICIT_SYSCALLS | expand("@default")
        elif deny:
            allowed -= items
        else:
            allowed |= items
    assert allowed, "no SystemCallFilter= in the unit"
    return sorted(allowed)


@pytest.mark.parametrize("syscall_filter", [False, True], ids=["mdwe", "mdwe+syscall-filter"])
def test_onnxruntime_runs_in_unit_sandbox(tmp_path: Path, syscall_filter: bool) -> None:
    """MemoryDenyWriteExecute= (and SystemCallFilter=) as seccomp filters, then real inference.

    Mirrors the unit: a syscall outside the allow-list fails with EPERM, as
    SystemCallErrorNumber=EPERM says. Known hits, both harmless and covered by the result check:
    numpy's OpenBLAS calls mbind() (@resources) and ignores the error; ONNX Runtime's telemetry
    store fchown()s its SQLite file when running as root (@chown) and falls back to memory.
    To list what is denied, swap the default for SCMP_ACT_KILL_PROCESS (0x80000000) and run the
    child under ``strace -f``.
    """
    found = _run("/sbin/ldconfig", "-p").stdout
    if "libseccomp.so.2" not in found:
        pytest.fail(
            "libseccomp.so.2 not found: apt-get install -y libseccomp2 (comes with systemd)"
        )
    allow = None
    if syscall_filter:
        analyze = _tool("systemd-analyze", "systemd")
        allow = {"default": SCMP_ACT_ERRNO_EPERM, "syscalls": _unit_syscalls(analyze)}
    model = tmp_path / "rnn.onnx"
    model.write_bytes(_rnn_model())

    res = _run(
        sys.executable, "-c", _MDWE_CHILD, str(model), json.dumps(allow), cwd=ROOT, timeout=120
    )
    assert res.returncode == 0, (
        f"exit {res.returncode} under the unit's seccomp rules (see the docstring to find the "
        f"syscall)\n{res.stderr[-4000:]}"
    )
    restricted = json.loads(res.stdout)

    import onnxruntime as ort  # the parent runs unrestricted: results must be identical

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for b in (1, 64):
        x = np.linspace(-1, 1, 3 * b, dtype=np.float32).reshape(1, b, 3)
        h = np.zeros((1, b, 8), np.float32)
        y, _, _, c = sess.run(None, {"x": x, "h": h, "c": h})
        assert np.isfinite(y).all() and np.abs(y).sum() > 0
        np.testing.assert_allclose(np.array(restricted[str(b)][0]), y, rtol=1e-6)
        np.testing.assert_allclose(np.array(restricted[str(b)][1]), c, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Prometheus: config, rules, rule unit tests, and names against what Metrics exports
# --------------------------------------------------------------------------------------------


def _exported_names() -> set[str]:
    """Every sample name a fresh Metrics can expose, including histogram/counter suffixes."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in CollectorRegistry.collect(Metrics(CollectorRegistry()).registry):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_promtool_check_config() -> None:
    promtool = _tool("promtool", "prometheus")
    res = _run(promtool, "check", "config", str(DEPLOY / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout


def test_promtool_check_rules() -> None:
    promtool = _tool("promtool", "prometheus")
    res = _run(promtool, "check", "rules", str(DEPLOY / "forecaster-alerts.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_rule_unit_tests() -> None:
    promtool = _tool("promtool", "prometheus")
    res = _run(promtool, "test", "rules", str(DEPLOY / "forecaster-alerts.test.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout
    tests = (DEPLOY / "forecaster-alerts.test.yml").read_text()
    for alert in (
        "ModelWorseThanPersistence",
        "NoPredictionsWhileReadings",
        "PredictionsRefusedByBroker",
    ):
        assert f"alertname: {alert}" in tests


def test_alert_names() -> None:
    rules = (DEPLOY / "forecaster-alerts.yml").read_text()
    for alert in (
        "ForecasterDown",
        "ForecasterNotReady",
        "NoPredictionsWhileReadings",
        "ModelWorseThanPersistence",
        "MQTTDisconnected",
        "PredictionsRefusedByBroker",
        "RejectedReadingRatioHigh",
    ):
        assert f"- alert: {alert}\n" in rules


@pytest.mark.parametrize("name", ["forecaster-alerts.yml", "forecaster-alerts.test.yml"])
def test_alert_files_use_exported_metric_names(name: str) -> None:
    used = set(re.findall(r"\b((?:forecaster|process)_[a-z0-9_]+)", (DEPLOY / name).read_text()))
    # forecaster_queue_depth etc. also appear in prose, which is fine: they must exist too.
    unknown = used - _exported_names()
    assert not unknown, f"{name} uses metrics Metrics does not define: {sorted(unknown)}"


# --------------------------------------------------------------------------------------------
# Grafana dashboard
# --------------------------------------------------------------------------------------------

_PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                 "group_right", "bool", "offset", "inf", "nan"}  # fmt: skip
_GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "1h", "$window": "15m",
                 "$instance": ".*", "$route": ".*"}  # fmt: skip


def check_promql(exprs: list[str], variables: dict[str, str], tmp_path: Path) -> None:
    """Every dashboard expression is valid PromQL: promtool parses them as recording rules once
    Grafana's ``variables`` are substituted (and none is left)."""
    promtool = _tool("promtool", "prometheus")
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        for var, value in variables.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        lines += [f"      - record: dashboard:expr_{i}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    res = _run(promtool, "check", "rules", str(rules))
    assert res.returncode == 0, res.stdout + res.stderr


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, labels, keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()", e):
        if m.group(1).lower() not in _PROMQL_WORDS:
            names.add(m.group(1))
    return names


def _panels(dashboard: dict[str, object]) -> Iterator[dict[str, object]]:
    for p in dashboard["panels"]:  # type: ignore[attr-defined]
        yield p
        yield from p.get("panels", [])


def test_grafana_dashboard(tmp_path: Path) -> None:
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dash["schemaVersion"] >= 36
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]

    exported = _exported_names()
    exprs: list[str] = []
    titles = set()
    ids = []
    for panel in _panels(dash):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:  # type: ignore[attr-defined]
            exprs.append(target["expr"])
            unknown = _metric_names(target["expr"]) - exported
            assert not unknown, f"panel {panel['title']!r} uses unknown metrics {unknown}"
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for title in ("Readings/s", "Predictions/s", "End-to-end latency", "Streams", "Batch size",
                  "Skill vs persistence", "RMSE", "Rejected readings by reason", "Queue depth",
                  "MQTT connected"):  # fmt: skip
        assert title in titles, title

    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            metric = re.match(r"label_values\((\w+)", var["definition"])
            assert metric and metric.group(1) in exported, var["definition"]

    check_promql(exprs, _GRAFANA_VARS, tmp_path)


def test_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(forecaster_batch_size_bucket{a="b"}'
        "[$__rate_interval]))) / on(route) group_left forecaster_streams or vector(0)"
    )
    assert _metric_names(expr) == {"forecaster_batch_size_bucket", "forecaster_streams"}


# --------------------------------------------------------------------------------------------
# mosquitto
# --------------------------------------------------------------------------------------------


def _substitute(text: str, pattern: str, replacement: str) -> str:
    new, n = re.subn(pattern, replacement, text, flags=re.M)
    assert n == 1, f"deploy/mosquitto.conf: expected one line matching {pattern!r}"
    return new


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    """deploy/mosquitto.conf with only paths and the port changed, running."""
    mosquitto = _tool("mosquitto", "mosquitto")
    passwd_tool = _tool("mosquitto_passwd", "mosquitto")
    passwd = tmp_path / "passwd"
    for i, (user, pw) in enumerate((("forecaster", "s3cret"), ("sensor", "sens0r"))):
        args = [passwd_tool, *(["-c"] if i == 0 else []), "-b", str(passwd), user, pw]
        res = _run(*args)
        assert res.returncode == 0, res.stderr
    acl = tmp_path / "acl"
    shutil.copy(DEPLOY / "mosquitto.acl", acl)
    (tmp_path / "data").mkdir()

    port = free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text()
    conf = _substitute(conf, r"^listener 1883$", f"listener {port} 127.0.0.1")
    conf = _substitute(conf, r"^persistence_location .*$", f"persistence_location {tmp_path}/data/")
    conf = _substitute(conf, r"^password_file .*$", f"password_file {passwd}")
    conf = _substitute(conf, r"^acl_file .*$", f"acl_file {acl}")
    conf = _substitute(conf, r"^pid_file .*$", "")
    conf = _substitute(conf, r"^log_dest file .*$", "log_dest stderr")
    # Started as root, mosquitto drops to user "mosquitto", which cannot write tmp_path.
    conf += f"\nuser {getpass.getuser()}\n"
    path = tmp_path / "mosquitto.conf"
    path.write_text(conf)

    proc = subprocess.Popen([mosquitto, "-c", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        try:
            wait_port(port, timeout=30, proc=proc)
        except HarnessError as exc:
            proc.kill()
            pytest.fail(f"{exc}: {proc.communicate()[0]}")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Client:
    """A paho client driven synchronously: connect, subscribe, and collect messages."""

    def __init__(self, port: int, user: str | None, password: str | None) -> None:
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.reason: mqtt.ReasonCode | None = None
        self.granted: list[int] = []
        self.messages: list[tuple[str, bytes]] = []
        self.got_message = threading.Event()
        self.acks: dict[int, int] = {}
        self.acked = threading.Condition()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if user is not None:
            c.username_pw_set(user, password)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        self.client = c
        c.connect("127.0.0.1", port, keepalive=10)
        c.loop_start()
        assert self.connected.wait(3), "no CONNACK"

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason: mqtt.ReasonCode, props: object) -> None:  # fmt: skip
        if self.reason is None:
            self.reason = reason
        self.connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reasons: list[mqtt.ReasonCode], props: object) -> None:  # fmt: skip
        self.granted = [r.value for r in reasons]
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.append((msg.topic, bytes(msg.payload)))
        self.got_message.set()

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason: mqtt.ReasonCode, props: object) -> None:  # fmt: skip
        with self.acked:
            self.acks[mid] = reason.value
            self.acked.notify_all()

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (0 = accepted)."""
        with self.acked:
            info = self.client.publish(topic, payload, qos=1)
            assert self.acked.wait_for(lambda: info.mid in self.acks, timeout=3), "no PUBACK"
            return self.acks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mosquitto_config_authenticates_and_applies_acl(broker: int) -> None:
    anonymous = _Client(broker, None, None)
    wrong = _Client(broker, "forecaster", "nope")
    fc = _Client(broker, "forecaster", "s3cret")
    sensor = _Client(broker, "sensor", "sens0r")
    try:
        assert anonymous.reason is not None and anonymous.reason.is_failure
        assert wrong.reason is not None and wrong.reason.is_failure
        assert fc.reason is not None and not fc.reason.is_failure, fc.reason
        assert sensor.reason is not None and not sensor.reason.is_failure, sensor.reason

        fc.client.subscribe([("sensors/#", 1), ("forecast/#", 1)])
        assert fc.subscribed.wait(3)
        assert fc.granted == [1, 1], fc.granted  # mosquitto 2 applies read ACLs on delivery

        # Writes: forecaster may publish predictions and its status, a sensor may not.
        # (PUBACK codes below 0x80 are successes; 0x10 is "no matching subscribers".)
        assert fc.publish("forecast/kitchen/temp", b"21.7") < 0x80
        assert fc.publish("forecaster/status", b"online") < 0x80
        assert fc.publish("sensors/kitchen/temp", b"0") == 0x87  # Not authorized
        assert sensor.publish("forecaster/status", b"offline") == 0x87

        # Reads: the sensor reading reaches forecaster; its own forecast/# publish did not come
        # back (no read right there). The broker delivers per client in order, and that publish
        # was acknowledged before this one was sent, so it would have arrived first.
        assert sensor.publish("sensors/kitchen/temp", b"21.5") < 0x80
        assert fc.got_message.wait(3)
        assert fc.messages == [("sensors/kitchen/temp", b"21.5")]
    finally:
        for c in (anonymous, wrong, fc, sensor):
            c.close()


def test_mosquitto_conf_backlog_settings() -> None:
    conf = (DEPLOY / "mosquitto.conf").read_text()
    settings = dict(
        line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#")
    )
    assert settings["persistence"] == "true"
    assert int(settings["autosave_interval"]) <= 60
    assert int(settings["max_queued_messages"]) > 1000
    assert settings["allow_anonymous"] == "false"


def test_varint_matches_protobuf_reference() -> None:
    """The hand-written protobuf varint matches the reference encoding for multi-byte values."""
    assert _varint(300) == bytes([0xAC, 0x02])  # protobuf docs' worked example
    assert _varint(1) == struct.pack("B", 1)
