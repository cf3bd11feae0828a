"""paho's publish record without a condition per message (``forecaster.serve.pubinfo``): made
for nothing while nobody waits, and paho's behaviour for a thread that does."""

from __future__ import annotations

import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import MQTTErrorCode

from forecaster.harness import wait_until
from forecaster.serve import pubinfo
from forecaster.serve.pubinfo import MessageInfo


def test_installed_records_are_made_and_published_without_a_condition() -> None:
    pubinfo.install()
    message = paho.MQTTMessage(7, b"t")  # what publish() and received messages make
    info = message.info
    assert isinstance(info, MessageInfo) and info._condition is None
    assert (info.rc, info.mid) == tuple(info) == (MQTTErrorCode.MQTT_ERR_SUCCESS, 7)
    info._set_as_published()
    assert info._condition is None and info.is_published()


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_a_waiting_thread_is_woken_by_the_acknowledgement(timeout: float | None) -> None:
    info = MessageInfo(1)
    done = threading.Event()

    def wait() -> None:
        info.wait_for_publish(timeout)
        done.set()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    assert wait_until(lambda: info._condition is not None, 10)
    assert not info.is_published() and not done.is_set()
    info._set_as_published()
    assert done.wait(30) and info.is_published()


def test_waiting_after_the_acknowledgement_returns_at_once() -> None:
    info = MessageInfo(2)
    info._set_as_published()
    info.wait_for_publish(None)  # would block forever if the flag were lost
    assert info.is_published()


PAHOS = MessageInfo.__bases__[0]  # paho's own class, also once installed


def test_failed_records_raise_as_pahos_do() -> None:
    for cls in (MessageInfo, PAHOS):
        info = cls(3)
        info.rc = MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
        with pytest.raises(ValueError):
            info.wait_for_publish(1.0)
        with pytest.raises(ValueError):
            info.is_published()


def test_paho_internals_it_rides_on_still_exist() -> None:
    assert PAHOS.__module__ == "paho.mqtt.client"
    assert set(PAHOS.__slots__) >= {"_condition", "_published", "_iterpos"}
    assert callable(getattr(PAHOS, "_set_as_published", None))
