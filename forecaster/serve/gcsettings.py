"""Garbage-collector settings for the serving process: no full collections in the hot path.

Why: the daemon allocates a few short-lived objects per reading (decoded items, predictions,
tuples), nearly all freed by reference counting, while it keeps hundreds of thousands of
long-lived ones (the recent-predictions cache, paho's and prometheus_client's structures, the
loaded models). With CPython's default thresholds (700, 10, 10) the short-lived allocations
trigger a generation-0 collection every 700 objects and, every hundred of those, a full one
that walks every long-lived object: about 50 ms with a filled cache on this project's 2-core
machines, a pause that every reading waiting behind it pays.

So, when ``forecaster serve`` starts its daemon: collect, freeze what exists (moved to a
permanent generation that collections skip), and collect the young generation every 5,000
allocations instead of 700, so each young collection stays short and full ones (which follow
every hundred young ones) come seven times less often.

The hot path must not feed the collector either. Two sources did, found with a ``gc.callbacks``
log of every collection in a benchmarked daemon: paho left a reference cycle per received
message (fixed in :mod:`forecaster.serve.matcher`), and the recent-predictions cache held one
tracked object per entry while it filled (now plain tuples, untracked after one pass). With
both, a 50,000-allocation young generation took 13-73 ms to collect; without them, and at 5,000,
collections took at most 12 ms in the same run (single readings at half the sustained rate,
after the saturation trials). Memory cost: cyclic garbage, which the hot path hardly makes, waits
a little longer. Objects frozen here and dropped later (a bundle replaced by a reload) are freed
by reference counting as usual; only reference cycles among them stay, a one-off per reload.
"""

from __future__ import annotations

import gc

#: Allocations between young-generation collections (CPython's default is 700).
GEN0_THRESHOLD = 5_000


def settle() -> None:
    """Collect once, freeze the survivors, and raise the young generation's threshold."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
