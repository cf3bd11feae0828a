"""Hostile input at the edges: payload decoding, topic matching and routing, the MQTT callback,
snapshot files. Zero uncaught exceptions allowed.

The default suite runs a small sample per target (``FAULTS_FUZZ_EXAMPLES``, default 300);
``-m slow`` runs 10,000 examples per target.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecaster.serve.codec import PayloadSpec, decode, prediction_topic, topic_matches
from forecaster.serve.config import Config, MQTTConfig
from forecaster.serve.daemon import Daemon
from forecaster.serve.mqtt import Transport
from forecaster.serve.state import SnapshotError, StateStore

from .conftest import MODEL
from .test_snapshots import SHA, SHAPES, write_snapshot

DEFAULT_EXAMPLES = int(os.environ.get("FAULTS_FUZZ_EXAMPLES", "300"))
SLOW_EXAMPLES = 10_000


def fuzz(n: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        print_blob=True,  # a failure prints @reproduce_failure(...): the replayable example
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------ strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_docs = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=5)
        | st.dictionaries(
            st.sampled_from(["value", "ts", "stream", "seq", "x"]) | st.text(max_size=5),
            kids,
            max_size=5,
        )
    ),
    max_leaves=30,
)


def _dump(doc: object) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


payloads = (
    st.binary(max_size=300)
    | json_docs.map(_dump)
    | st.builds(
        lambda depth, inner: b"[" * depth + inner + b"]" * depth,
        st.integers(0, 3000),
        st.sampled_from([b"", b"1", b'{"value": 1}']),
    )
    | st.sampled_from(
        [b"NaN", b"-Infinity", b"1e999", b"1" * 5000, b"\xef\xbb\xbf1", b"1_0", "١".encode()]
    )
)
specs = st.builds(
    PayloadSpec,
    format=st.sampled_from(["auto", "number", "json", "batch"]),
    max_bytes=st.sampled_from([16, 65536]),
    max_items=st.sampled_from([1, 10000]),
)
levels = st.sampled_from(["a", "b", "", "$sys", "+x", "é", "a b", "{topic}", "..", "\x00"])
topics = st.lists(levels, min_size=1, max_size=5).map("/".join) | st.text(max_size=40)
filter_levels = st.sampled_from(["a", "b", "", "$sys", "+", "é", ".."])
filters = st.builds(
    lambda lv, hash_, share: (
        ("$share/g/" if share else "") + "/".join([*lv, *(["#"] if hash_ else [])])
    ),
    st.lists(filter_levels, min_size=0, max_size=4),
    st.booleans(),
    st.booleans(),
).filter(lambda f: f not in ("", "$share/g/"))


def oracle(filter: str, topic: str) -> bool:
    """MQTT 4.7 matching via a regular expression: an independent reference."""
    if filter.startswith("$share/"):
        filter = filter.split("/", 2)[2]
    if topic.startswith("$") and filter[:1] in ("+", "#"):
        return False
    lv = filter.split("/")
    tail = ""
    if lv[-1] == "#":
        lv = lv[:-1]
        tail = "(?:/.*)?" if lv else ".*"
    body = "/".join("[^/]*" if x == "+" else re.escape(x) for x in lv)
    return re.fullmatch(body + tail, topic, flags=re.DOTALL) is not None


# ------------------------------------------------------------------ targets


def check_decode(n: int) -> None:
    @fuzz(n)
    @given(payloads, topics, specs)
    def prop(payload: bytes, topic: str, spec: PayloadSpec) -> None:
        out = decode(payload, topic, spec, 1.0)
        assert len(out.readings) + len(out.rejects) >= 1
        for r in out.readings:
            assert r.value == r.value and abs(r.value) != float("inf")
            assert r.ts == r.ts and abs(r.ts) != float("inf")

    prop()


def check_topics(n: int) -> None:
    @fuzz(n)
    @given(filters, topics, topics)
    def prop(filter: str, topic: str, template_part: str) -> None:
        assert topic_matches(filter, topic) == oracle(filter, topic)
        template = "forecast/{topic}/" + template_part.replace("{topic}", "")
        out = prediction_topic(template, topic)
        # plain replacement: braces or format specs in the topic are never interpreted
        assert out == "forecast/" + topic + "/" + template_part.replace("{topic}", "")

    prop()


def check_mqtt_callback(n: int) -> None:
    got: list[str] = []
    errors: list[str] = []
    transport = Transport(
        MQTTConfig(), None, ["#"], lambda t, p, m, q: got.append(t), on_error=errors.append
    )

    @fuzz(n)
    @given(st.binary(min_size=1, max_size=100))
    def prop(raw_topic: bytes) -> None:
        got.clear()
        errors.clear()
        msg = paho.MQTTMessage(mid=1, topic=raw_topic)
        msg.payload = b"1"
        transport._handle_message(None, None, msg)  # the callback paho's thread runs
        try:
            text = raw_topic.decode("utf-8")
        except UnicodeDecodeError:
            assert errors == ["bad_topic"] and got == []
        else:
            assert got == [text] and errors == []

    prop()


def _daemon(tmp: Path) -> Daemon:
    cfg = Config.model_validate(
        {
            "daemon": {"state_dir": str(tmp), "queue_size": 1, "on_full": "drop_newest"},
            "metrics": {"enabled": False},
            "routes": [
                {
                    "name": "water",
                    "subscribe": ["sensors/+/flow", "$share/g/plant/#"],
                    "bundle": str(MODEL),
                },
                {"name": "other", "subscribe": ["a/x/#"], "bundle": str(MODEL)},
            ],
        }
    )
    d = Daemon(cfg)
    d.setup()  # loads the bundles; the MQTT transport is built but never started
    return d


def check_routing(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = _daemon(Path(tmp))
        # The MQTT thread's entry point ignores messages until run() starts accepting; open it
        # the way run() does, without a broker.
        d.intake.accepting = True

        @fuzz(n)
        @given(topics, payloads)
        def prop(topic: str, payload: bytes) -> None:
            route = d.routes.route_for(topic)
            want = next(
                (r.name for r in d.routes if any(oracle(f, topic) for f in r.cfg.subscribe)), None
            )
            assert (route.name if route else None) == want
            d.intake.on_message(topic, payload, 1, 0)

        prop()
        text = _metrics_text(d)
        assert "sensors/" not in text.replace("subscribe", "")  # no stream id as a label


def _metrics_text(d: Daemon) -> str:
    from prometheus_client import generate_latest

    return generate_latest(d.registry).decode()


def check_snapshot_files(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        good = Path(tmp) / "good.npz"
        write_snapshot(good, "s")
        blob = good.read_bytes()
        target = Path(tmp) / "water.npz"

        @fuzz(n)
        @given(
            st.integers(0, len(blob)),
            st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)), max_size=8),
            st.binary(max_size=16),
        )
        def prop(cut: int, flips: list[tuple[int, int]], junk: bytes) -> None:
            data = bytearray(blob[:cut] + junk + blob[cut:]) if junk else bytearray(blob)
            for i, x in flips:
                if i < len(data):
                    data[i] ^= x
            if not junk and not flips:
                data = data[:cut]
            target.write_bytes(bytes(data))
            try:
                StateStore.restore(target, SHA, SHAPES, 100)
            except SnapshotError:
                pass

        prop()


TARGETS = [check_decode, check_topics, check_mqtt_callback, check_routing, check_snapshot_files]


@pytest.mark.parametrize("target", TARGETS, ids=lambda f: f.__name__)
def test_fuzz_sample(target: Callable[[int], None]) -> None:
    target(DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=lambda f: f.__name__)
def test_fuzz_10000(target: Callable[[int], None]) -> None:
    target(max(SLOW_EXAMPLES, DEFAULT_EXAMPLES))
