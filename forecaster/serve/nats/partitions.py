"""Partitions: which of N partitions a stream lives in, and the server mapping that says so.

Pure (no nats-py). nats-server's subject mapping ``{{partition(N,i,...)}}`` hashes the
concatenated wildcard tokens with FNV-1a (32 bit) modulo N; :func:`partition_of` computes the same
number here, so a client, a test or an operator can tell where a stream lives without asking the
server. MQTT topics become NATS subjects with ``/`` → ``.`` (nats-server's MQTT listener does the
same), and a mapped reading arrives as ``part.<k>.<the original subject>``.

Only filters whose wildcards are ``+`` (one level) can be partitioned: a mapping references
single-token wildcards only. Changing N moves (almost) every stream to another partition, so N is
chosen once per deployment (a multiple of the largest process count you expect).
"""

from __future__ import annotations

PREFIX = "part"
FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193


def fnv1a32(data: bytes) -> int:
    """FNV-1a, 32 bit: nats-server's partition hash (``hash/fnv`` New32a)."""
    h = FNV_OFFSET
    for byte in data:
        h ^= byte
        h = (h * FNV_PRIME) & 0xFFFFFFFF
    return h


def topic_to_subject(topic: str) -> str:
    """An MQTT topic or filter as a NATS subject (``+`` → ``*``, ``#`` → ``>``)."""
    if "+" not in topic and "#" not in topic:
        return topic.replace("/", ".")  # a plain topic (every prediction): one call
    levels = topic.split("/")
    out = []
    for level in levels:
        out.append({"+": "*", "#": ">"}.get(level, level))
    return ".".join(out)


def subject_to_topic(subject: str) -> str:
    """A NATS subject as the MQTT topic a sensor published (the inverse for plain topics)."""
    return subject.replace(".", "/")


def check_partitionable(mqtt_filter: str) -> None:
    """Raise ValueError unless ``mqtt_filter`` can be partitioned by a server mapping."""
    levels = mqtt_filter.split("/")
    if mqtt_filter.startswith("$share/"):
        raise ValueError(f"{mqtt_filter!r}: shared subscriptions have no meaning with NATS")
    if "#" in levels:
        raise ValueError(
            f"{mqtt_filter!r}: a '#' filter cannot be partitioned (nats-server mappings hash "
            "single-level wildcards only); use '+' levels"
        )
    if "+" not in levels:
        raise ValueError(
            f"{mqtt_filter!r}: a filter without '+' is one stream per topic and cannot be "
            "spread over partitions; give the stream id a '+' level"
        )
    if any("." in level or "*" in level or ">" in level or not level for level in levels):
        raise ValueError(f"{mqtt_filter!r}: levels must be non-empty and free of '.', '*', '>'")


def wildcard_positions(mqtt_filter: str) -> list[int]:
    """1-based indexes of the filter's ``+`` levels among its wildcards (all of them)."""
    return list(range(1, mqtt_filter.split("/").count("+") + 1))


def mapping_for(mqtt_filter: str, partitions: int) -> tuple[str, str]:
    """The nats-server ``mappings`` entry (source, destination) for one MQTT filter.

    ``sensors/+/flow`` with 4 partitions →
    ``("sensors.*.flow", "part.{{partition(4,1)}}.sensors.{{wildcard(1)}}.flow")``.
    """
    check_partitionable(mqtt_filter)
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    wild = wildcard_positions(mqtt_filter)
    args = ",".join(str(i) for i in wild)
    out = []
    n = 0
    for level in mqtt_filter.split("/"):
        if level == "+":
            n += 1
            out.append(f"{{{{wildcard({n})}}}}")
        else:
            out.append(level)
    dest = f"{PREFIX}.{{{{partition({partitions},{args})}}}}." + ".".join(out)
    return topic_to_subject(mqtt_filter), dest


def mappings_for(filters: list[str], partitions: int) -> dict[str, str]:
    """Every filter's mapping, as a dict for the server config."""
    return dict(mapping_for(f, partitions) for f in filters)


def mappings_conf(mappings: dict[str, str]) -> str:
    """The ``mappings = {...}`` block of a nats-server config file."""
    body = "\n".join(f'  "{src}": "{dst}"' for src, dst in mappings.items())
    return "mappings = {\n" + body + "\n}\n"


def partition_of(topic: str, mqtt_filter: str, partitions: int) -> int:
    """The partition the server's mapping puts ``topic`` (matching ``mqtt_filter``) in."""
    levels = topic.split("/")
    flevels = mqtt_filter.split("/")
    if len(levels) != len(flevels):
        raise ValueError(f"{topic!r} does not match {mqtt_filter!r}")
    key = "".join(t for t, f in zip(levels, flevels, strict=True) if f == "+")
    return fnv1a32(key.encode("utf-8")) % partitions


def partition_subject(k: int) -> str:
    """The subjects of partition ``k`` (a consumer's filter)."""
    return f"{PREFIX}.{k}.>"


def split_subject(subject: str) -> tuple[int, str]:
    """``part.3.sensors.s1.flow`` → ``(3, "sensors/s1/flow")``; ValueError for anything else."""
    head, _, rest = subject.partition(".")
    num, _, tail = rest.partition(".")
    if head != PREFIX or not num.isdigit() or not tail:
        raise ValueError(f"not a partitioned subject: {subject!r}")
    return int(num), subject_to_topic(tail)
