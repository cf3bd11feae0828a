"""The recent-predictions cache (``serve/recent.py``) against an ordered dict kept exact on every
put: the same answers, entries, order and length, whichever of its lazy paths a put takes."""

from __future__ import annotations

import gc
import random
from collections import OrderedDict

import numpy as np
import pytest

from forecaster.serve.codec import Prediction
from forecaster.serve.recent import Columns, RecentPredictions

Key = tuple[str, float]


class Reference:
    """What the cache must hold: each put moves its key to the newest end, oldest evicted."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[Key, Prediction] = OrderedDict()

    def put_many(self, preds: list[Prediction]) -> None:
        for p in preds:
            self.entries[(p.stream, p.ts)] = p
            self.entries.move_to_end((p.stream, p.ts))
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)


def agree(cache: RecentPredictions, want: Reference, where: str) -> None:
    assert len(cache) == len(want.entries), where
    ids, arrays = cache.to_arrays()  # read without making the dict exact
    assert list(zip(ids, arrays["recent_ts"].tolist(), strict=True)) == list(want.entries), where
    kept = list(want.entries.values())
    assert arrays["recent_value"].tolist() == [p.value for p in kept], where
    assert arrays["recent_flags"].tolist() == [int(p.warm) for p in kept], where
    assert [(key, cache.get(*key)) for key in cache.keys()] == list(want.entries.items()), where


def test_recent_predictions_keep_classifier_fields() -> None:
    cache = RecentPredictions(3)
    p = Prediction("s", 1.0, 0.75, True, 0.75, True)
    cache.put(p)
    assert cache.get("s", 1.0) == p
    ids, arrays = cache.to_arrays()
    assert ids == ["s"] and arrays["recent_value"].tolist() == [0.75]
    with pytest.raises(ValueError):
        RecentPredictions(-1)


def test_recent_predictions_leave_the_garbage_collector_nothing_to_track() -> None:
    """A filled cache must not be walked by every collection (pauses in the hot path): neither
    its entries nor the chunks that wait for the dict."""
    cache = RecentPredictions(100)
    for i in range(100):
        cache.put(Prediction(f"s{i}", float(i), 1.5, True, lower=1.0, upper=2.0))
    cache.put_many([Prediction(f"t{i}", 1.0, 1.5, True) for i in range(30)])
    gc.collect()
    gc.collect()  # a chunk's tuple is let go the collection after its column tuples are
    assert cache._pending and not any(gc.is_tracked(chunk) for chunk in cache._pending)
    before = cache.to_arrays()
    assert cache._pending  # a snapshot reads the chunks where they are
    cache.get("s0", 0.0)  # a lookup makes the dict exact
    assert not cache._pending
    after = cache.to_arrays()
    assert before[0] == after[0] and all(
        np.array_equal(before[1][k], after[1][k], equal_nan=True) for k in before[1]
    )
    gc.collect()
    entries = [obj for item in cache._map.items() for obj in item]
    assert entries and not any(gc.is_tracked(obj) for obj in entries)
    assert cache.get("s77", 77.0) == Prediction("s77", 77.0, 1.5, True, lower=1.0, upper=2.0)


@pytest.mark.parametrize("compact_at", [1024, 4])
def test_put_many_leaves_the_cache_as_puts_one_by_one_would(seed: int, compact_at: int) -> None:
    """Keys already cached or repeated within one call move to the newest end, as a put of
    each in turn into an ordered dict would move them; the oldest go beyond the capacity.
    ``compact_at`` 4: the deque of keys is rebuilt without its stale copies very often."""
    rng = random.Random(seed)
    cache = RecentPredictions(12)
    cache.COMPACT_AT = compact_at
    want = Reference(cache.capacity)
    for k in range(300):
        batch = [
            Prediction(rng.choice("abc"), float(rng.randint(0, 8)), float(k), rng.random() < 0.5)
            for _ in range(rng.randint(0, 9))
        ]
        if len(batch) == 1 and k % 2:
            cache.put(batch[0])
        else:
            cache.put_many(batch)
        want.put_many(batch)
        where = f"seed={seed} call={k}"
        agree(cache, want, where)
        probe = [(rng.choice("abcd"), float(rng.randint(0, 9))) for _ in range(3)]
        assert cache.holds_any([s for s, _ in probe], [t for _, t in probe]) == any(
            key in want.entries for key in probe
        ), where


@pytest.mark.parametrize("capacity", [1, 7, 40])
def test_lazy_puts_answer_as_an_exact_cache_would(seed: int, capacity: int) -> None:
    """Mostly new keys (the lazy path: chunks, trimming, the per-stream bound and its
    rebuild), with resends, old readings, one stream's runs and keys given by the caller mixed
    in; probed at random moments, which make the cache exact there and then."""
    rng = random.Random(seed)
    cache = RecentPredictions(capacity)
    cache.NEWEST_SLACK = 3  # rebuild the per-stream bound often
    want = Reference(capacity)
    clock: dict[str, float] = {}
    names = [f"s{i}" for i in range(25)]
    for k in range(600):
        kind = rng.random()
        batch: list[Prediction] = []
        if kind < 0.5:  # gateway batch: distinct streams, each a newer reading
            for s in rng.sample(names, rng.randint(1, 12)):
                clock[s] = clock.get(s, 0.0) + rng.choice((0.5, 1.0, 3.0))
                batch.append(Prediction(s, clock[s], float(k), rng.random() < 0.5))
        elif kind < 0.7:  # one stream's run
            s = rng.choice(names)
            for _ in range(rng.randint(2, 6)):
                clock[s] = clock.get(s, 0.0) + 1.0
                batch.append(Prediction(s, clock[s], float(k), True))
        elif kind < 0.85:  # several streams, each rising, interleaved (the waves' order)
            for s in rng.choices(names[:5], k=rng.randint(2, 8)):
                clock[s] = clock.get(s, 0.0) + 1.0
                batch.append(Prediction(s, clock[s], float(k), False))
        elif kind < 0.93:  # old keys again: resends, a replay's puts
            for _ in range(rng.randint(1, 4)):
                s = rng.choice(names)
                t = float(rng.randint(0, int(clock.get(s, 0.0)) + 1))
                batch.append(Prediction(s, t, float(k), False))
        else:  # new keys, one of them twice or out of order in the call (one stream, or two)
            pair = rng.sample(names, 2)
            for s in pair:
                clock[s] = clock.get(s, 0.0) + 2.0
            s = pair[0]
            batch = [Prediction(s, clock[s], float(k), True)]
            batch.append(Prediction(s, clock[s] - rng.choice((0.0, 1.0)), float(k), True))
            if rng.random() < 0.5:
                batch.insert(1, Prediction(pair[1], clock[pair[1]], float(k), True))
        if rng.random() < 0.3:  # as the engine puts a batch: keys and snapshot columns given
            nan = float("nan")
            columns = Columns(
                np.array([p.value for p in batch]),
                np.array([p.warm for p in batch]),
                np.array([nan if p.lower is None else p.lower for p in batch]),
                np.array([nan if p.upper is None else p.upper for p in batch]),
            )
            streams, ts = [p.stream for p in batch], [p.ts for p in batch]
            # the engine's promise: distinct keys, and none could be cached (checked just now)
            new = kind < 0.5 and not cache.could_hold(streams, ts)
            cache.put_many(batch, streams, ts, columns, new=new)
        else:
            cache.put_many(batch)
        want.put_many(batch)
        where = f"seed={seed} capacity={capacity} call={k}"
        assert len(cache) == len(want.entries), where
        if rng.random() < 0.2:
            probe = [(rng.choice(names), float(rng.randint(0, 40))) for _ in range(4)]
            streams, ts = [s for s, _ in probe], [t for _, t in probe]
            held = any(key in want.entries for key in probe)
            assert cache.holds_any(streams, ts) == held, where
            assert not held or cache.could_hold(streams, ts), where
        if rng.random() < 0.05:
            agree(cache, want, where)
    agree(cache, want, f"seed={seed} capacity={capacity} end")


def test_new_readings_leave_the_dict_alone_until_one_could_be_cached() -> None:
    """The point of the laziness: gateway batches of new readings build no keys, and the
    per-stream bound stays within the streams the cache holds."""
    cache = RecentPredictions(1000)
    for k in range(50):
        batch = [Prediction(f"s{(k * 100 + i) % 3000}", float(k), 0.0, True) for i in range(100)]
        assert not cache.holds_any([p.stream for p in batch], [p.ts for p in batch])
        cache.put_many(batch)
    assert not cache._map and len(cache) == 1000
    assert len(cache._newest) <= 2 * 1000 + cache.NEWEST_SLACK
    assert cache.holds_any(["s2999"], [49.0]) is False  # never put: its bound says so
    assert not cache._map  # ... without the dict
    assert cache.holds_any(["s1900"], [49.0])  # could be, and is: now exact
    assert len(cache._map) == 1000 and not cache._pending
    assert not cache.holds_any(["s1999"], [48.0])  # could be (s1999 has ts 49), is not
    assert cache.get("s1000", 40.0) is not None and cache.get("s900", 39.0) is None
