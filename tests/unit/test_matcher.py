"""paho's topic matcher without per-message reference cycles (``forecaster.serve.matcher``)."""

from __future__ import annotations

import gc
import random
from collections.abc import Iterator
from contextlib import contextmanager

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.matcher import MQTTMatcher

from forecaster.serve import matcher

LEVELS = ["a", "b", "$SYS", "+", "#", ""]


def _filter(rng: random.Random) -> str:
    parts = [rng.choice(LEVELS) for _ in range(rng.randint(1, 4))]
    if "#" in parts:  # '#' only as the last level, as brokers require
        parts = parts[: parts.index("#") + 1]
    return "/".join(parts)


def _topic(rng: random.Random) -> str:
    return "/".join(rng.choice(["a", "b", "$SYS", "c", ""]) for _ in range(rng.randint(1, 5)))


def test_matches_what_paho_matches_in_the_same_order(rng: random.Random, seed: int) -> None:
    for _ in range(200):
        ours, theirs = matcher.AcyclicMatcher(), MQTTMatcher()
        for i in range(rng.randint(0, 6)):
            f = _filter(rng)
            ours[f] = theirs[f] = (f, i)
        for _ in range(20):
            t = _topic(rng)
            assert list(ours.iter_match(t)) == list(theirs.iter_match(t)), f"{t!r} (seed {seed})"


@contextmanager
def _no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _cyclic_garbage_after_messages(client: paho.Client, n: int) -> int:
    """Unreachable objects the collector finds after ``client`` handled ``n`` messages."""
    client.on_message = lambda *_a: None
    with _no_collector():
        for mid in range(1, n + 1):
            client._handle_on_message(paho.MQTTMessage(mid, b"sensors/s1/flow"))
        return gc.collect()


def test_a_received_message_leaves_no_cycle_for_the_collector() -> None:
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    matcher.install(client)
    assert _cyclic_garbage_after_messages(client, 500) == 0
    # The filtered callbacks still work (and still leave nothing behind).
    got: list[str] = []
    client.message_callback_add("sensors/+/flow", lambda _c, _u, m: got.append(m.topic))
    assert _cyclic_garbage_after_messages(client, 10) == 0
    assert got == ["sensors/s1/flow"] * 10


def test_paho_attribute_still_exists() -> None:
    """The swap rides on paho's private ``_on_message_filtered``: fail loudly if it goes away."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    assert isinstance(client._on_message_filtered, MQTTMatcher)
