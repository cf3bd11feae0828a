"""The NATS transport's own Prometheus metrics (names documented in docs/reliability.md and
on the fleet dashboard), beside the daemon's usual ones in :mod:`forecaster.serve.metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class NatsMetrics:
    """The per-partition metrics (names on the board and in docs/reliability.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "forecaster_nats_connected", "1 while connected to a NATS server", registry=registry
        )
        self.owned = Gauge(
            "forecaster_nats_partitions_owned", "Partitions this process serves", registry=registry
        )
        self.owned_by = Gauge(
            "forecaster_nats_partition_owned",
            "1 if this process serves the partition",
            ["partition"],
            registry=registry,
        )
        self.takeovers = Counter(
            "forecaster_nats_takeovers",
            "Partitions taken (restored from snapshot and stream)",
            registry=registry,
        )
        self.released = Counter(
            "forecaster_nats_partitions_released",
            "Partitions handed back cleanly (rebalance or stop)",
            registry=registry,
        )
        self.lost = Counter(
            "forecaster_nats_partitions_lost",
            "Partitions dropped because the lease could not be renewed in time (fencing)",
            registry=registry,
        )
        self.renew_failures = Counter(
            "forecaster_nats_lease_renew_failures",
            "Lease renewals that failed",
            registry=registry,
        )
        self.replayed = Counter(
            "forecaster_nats_replayed_readings",
            "Readings stepped without publishing after a takeover (already answered before)",
            ["partition"],
            registry=registry,
        )
        self.lag = Gauge(
            "forecaster_nats_consumer_lag",
            "Readings in the partition's stream not yet delivered to us",
            ["partition"],
            registry=registry,
        )
        self.members = Gauge(
            "forecaster_nats_live_members", "Live forecaster processes seen", registry=registry
        )
