"""Partitioned serving on NATS JetStream (``transport.kind = "nats"``).

Modules, one concept each: :mod:`.partitions` (pure: hash and server mapping), :mod:`.leases`
(who owns which partition: KV leases with a TTL), :mod:`.snapshots` (a partition's states in the
object store), :mod:`.source` (resume rule, pull requests, delivery facts of a message),
:mod:`.connection` (the client and the streams and buckets a fleet shares), :mod:`.takeover`
(restoring a partition and starting its consumer), :mod:`.partition` (one served partition:
deliveries in, decoded readings out), :mod:`.answering` (a partition's batches stepped,
confirmed and acknowledged in order), :mod:`.publish` (predictions out: JetStream PubAcks or a
core flush before the acknowledgement), :mod:`.metrics` (the transport's metrics) and
:mod:`.worker` (the process: the lease, serve and snapshot loops). Nothing here imports nats-py
at module level: a machine with only mosquitto serves MQTT without it.
"""
