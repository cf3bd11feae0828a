"""paho's record of a published message, without a condition variable per message.

Every ``publish`` makes an ``MQTTMessageInfo``, and its constructor makes a
``threading.Condition`` for ``wait_for_publish``; the acknowledgement then notifies it under its
lock. The daemon never waits on one (the ``AckBook`` settles readings from the publish
callback), yet profiles of single-reading messages put about a twelfth of the inference
worker's time under the GIL in making them, and as much of the publisher thread's in notifying
them. :class:`MessageInfo` makes the condition only when a thread asks to wait (or to read
``is_published``), and the acknowledgement notifies only one that exists, so a caller that does
wait sees paho's behaviour.

:func:`install` puts it in place of paho's class for the whole process (``MQTTMessage`` and
``publish`` make their records through the module's name). It relies on paho's private
``_published``, ``_condition``, ``_iterpos`` and ``_set_as_published`` (paho-mqtt 2.x, pinned
below 3 in pyproject.toml); ``tests/unit/test_pubinfo.py`` fails if they disappear.
"""

from __future__ import annotations

import threading

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

__all__ = ["MessageInfo", "install"]

#: Serialises making a record's condition with the acknowledgement looking for it.
_MAKE = threading.Lock()


class MessageInfo(paho.MQTTMessageInfo):
    """paho's ``MQTTMessageInfo`` whose condition is made for the first thread that waits."""

    __slots__ = ()

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self._published = False
        self._condition = None  # type: ignore[assignment]  # made on demand, see _waitable
        self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _waitable(self) -> None:
        with _MAKE:
            if self._condition is None:
                self._condition = threading.Condition()

    def _set_as_published(self) -> None:
        self._published = True
        with _MAKE:
            condition = self._condition
        if condition is not None:  # a thread waits, or may: wake it as paho would
            with condition:
                condition.notify_all()

    def wait_for_publish(self, timeout: float | None = None) -> None:
        self._waitable()
        super().wait_for_publish(timeout)

    def is_published(self) -> bool:
        self._waitable()
        return super().is_published()


def install() -> None:
    """Make every paho publish record a :class:`MessageInfo` (idempotent)."""
    paho.MQTTMessageInfo = MessageInfo  # type: ignore[misc]
