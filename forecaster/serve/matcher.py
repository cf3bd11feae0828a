"""paho's topic-filter matcher without a reference cycle per incoming message.

paho looks up per-filter callbacks (``message_callback_add``) for every message it receives, in
``MQTTMatcher.iter_match``. That method builds a recursive closure that refers to itself, so each
call leaves a small reference cycle (a function, three cells, a tuple and a list) that reference
counting cannot free: only the garbage collector can. At a few thousand messages a second that
is tens of thousands of cyclic objects between two young-generation collections, and measured
here with ``daemon.gc_tuning`` on, each such collection took 13-73 ms: a stall that every
reading in flight waits behind, and most of the single-reading p99 latency.

:class:`AcyclicMatcher` keeps paho's trie and its matching rules (``+`` matches one level, ``#``
the rest, wildcards do not match a leading ``$`` level) and walks it with a module-level
function, so nothing it builds outlives the call. The daemon never adds per-filter callbacks, so
in practice the trie is empty and a message costs one dictionary check.

The swap relies on paho's private ``_on_message_filtered`` attribute (paho-mqtt 2.x, pinned
below 3 in pyproject.toml); ``tests/unit/test_matcher.py`` fails if it disappears.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.matcher import MQTTMatcher


class AcyclicMatcher(MQTTMatcher):
    """:class:`MQTTMatcher` whose :meth:`iter_match` leaves no garbage behind."""

    def iter_match(self, topic: str) -> Iterator[Any]:
        root = self._root
        if not root._children:
            return iter(())
        out: list[Any] = []
        _collect(root, topic.split("/"), 0, not topic.startswith("$"), out)
        return iter(out)


def _collect(node: Any, parts: list[str], i: int, normal: bool, out: list[Any]) -> None:
    """Append the values of the filters under ``node`` matching ``parts[i:]``, in paho's order."""
    children = node._children
    if i == len(parts):
        if node._content is not None:
            out.append(node._content)
    else:
        exact = children.get(parts[i])
        if exact is not None:
            _collect(exact, parts, i + 1, normal, out)
        if "+" in children and (normal or i > 0):
            _collect(children["+"], parts, i + 1, normal, out)
    if "#" in children and (normal or i > 0):
        content = children["#"]._content
        if content is not None:
            out.append(content)


def install(client: paho.Client) -> None:
    """Give ``client`` an :class:`AcyclicMatcher` (before any ``message_callback_add``)."""
    client._on_message_filtered = AcyclicMatcher()  # paho's private attribute, see module doc
