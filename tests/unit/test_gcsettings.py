"""The serving process's garbage-collector settings (forecaster/serve/gcsettings.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from forecaster.serve import gcsettings


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_settle_freezes_what_exists_and_raises_the_young_threshold(restored: None) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    _, gen1, gen2 = gc.get_threshold()
    gcsettings.settle()
    assert gc.get_freeze_count() > 1000  # the imported modules at least
    assert gc.get_threshold() == (gcsettings.GEN0_THRESHOLD, gen1, gen2)


def test_a_frozen_object_dropped_later_is_still_freed(restored: None) -> None:
    """Reference counting still frees frozen objects (a bundle replaced by a reload)."""
    import weakref

    class Thing:
        pass

    thing = Thing()
    ref = weakref.ref(thing)
    gcsettings.settle()
    del thing
    assert ref() is None
