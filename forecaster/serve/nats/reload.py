"""SIGHUP under NATS: the routes' models and options re-read from the config file, between turns.

What it applies is what the MQTT daemon's reload applies (:meth:`forecaster.serve.routes.RouteSet.
reload`): each route's bundle (loaded once, off the event loop, then swapped into that route's
engine in every partition this process serves, by the same :func:`~forecaster.serve.routes.
swap_bundle`: states kept when the shapes agree, reset and counted when not) and its options.

What it refuses, whole (``forecaster_reloads_total{result="failed"}``, the running config kept):
an invalid file, and a change only a restart can apply. ``[transport]`` and ``[nats]`` shape the
connection, the streams, the partition mapping and the leases every member of the fleet must
agree on; routes added, removed or resubscribed change which readings a partition holds and what
its snapshot contains. Half applying any of those would leave this process disagreeing with the
rest of the fleet, so none of the file is applied and the log says "needs a restart".

Every worker reloads on its own: a partition that moves between workers serving different
models has its snapshot refused (another model's sha256) and is replayed from the stream's
start, so reload the whole fleet (``systemctl reload 'forecaster@*'``).
"""

from __future__ import annotations

from forecaster.errors import ForecasterError
from forecaster.model.bundle import Bundle
from forecaster.serve.config import Config, RouteConfig

#: ``[nats]`` keys a re-read file may not be compared on: ``--worker-id`` rewrites the member
#: name of the running config (see ``workers.apply_worker_id``), never the file's
_REWRITTEN = {"member"}


class RestartNeeded(ForecasterError):
    """The new file changes what a running worker cannot change."""


def restart_needed(old: Config, new: Config) -> list[str]:
    """What ``new`` changes that only a restart applies (empty: the reload may go on)."""
    why: list[str] = []
    if new.transport != old.transport:
        why.append("[transport]")
    if new.nats.model_dump(exclude=_REWRITTEN) != old.nats.model_dump(exclude=_REWRITTEN):
        why.append("[nats]")
    if [(rc.name, rc.subscribe) for rc in new.routes] != [
        (rc.name, rc.subscribe) for rc in old.routes
    ]:
        why.append("routes added, removed, reordered or resubscribed")
    return why


def check(old: Config, new: Config) -> None:
    """Raise :class:`RestartNeeded` naming what ``new`` changes that needs a restart."""
    why = restart_needed(old, new)
    if why:
        raise RestartNeeded(
            f"{', '.join(why)} changed; that needs a restart (stop the worker: its partitions "
            "move to the others, and back once it is started again)"
        )


def load_bundle(rc: RouteConfig, intra_op_threads: int) -> Bundle:
    """``rc``'s bundle, loaded and warmed up (run in a thread: it takes a while)."""
    bundle = Bundle.load(rc.bundle, intra_op_threads=intra_op_threads)
    bundle.warm_up()
    return bundle
