"""Partitioned serving on NATS JetStream (``transport.kind = "nats"``).

Modules, one concept each: :mod:`.partitions` (pure: hash and server mapping), :mod:`.leases`
(who owns which partition: KV leases with a TTL), :mod:`.snapshots` (a partition's states in the
object store), :mod:`.source` (pull requests and the replay bookkeeping of one partition),
:mod:`.worker` (the process: connect, claim, serve, hand over). Nothing here imports nats-py at
module level: a machine with only mosquitto serves MQTT without it.
"""
