"""Which partition a record goes to: Kafka's default partitioner, bit for bit.

Keyed records go to ``(murmur2(key) & 0x7fffffff) % num_partitions``, the rule of Kafka's
``BuiltInPartitioner.partitionForKey``, so a key lands on the same partition number as it would with
any Kafka client. Keyless records are sticky (KIP-480): they all go to one partition until that
partition's batch is full or sent, then to another, which makes bigger batches than round robin.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["murmur2", "partition_for_key", "StickyPartitioner"]

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_SEED = 0x9747B28C


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2``: 32-bit MurmurHash2 with seed 0x9747b28c, as a signed int."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    n4 = length & ~3
    for i in range(0, n4, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[n4 + 2] << 16
    if rest >= 2:
        h ^= data[n4 + 1] << 8
    if rest >= 1:
        h ^= data[n4]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for_key(key: bytes, num_partitions: int) -> int:
    """The partition of a keyed record, exactly as Kafka's default partitioner picks it."""
    if num_partitions <= 0:
        raise ValueError(f"num_partitions must be positive, got {num_partitions}")
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


class StickyPartitioner:
    """The sticky choice for keyless records, per topic (KIP-480).

    ``partition`` returns the topic's current sticky partition; ``on_batch_done`` is called when a
    partition's open batch is closed (full) or drained (sent) and moves the topic to another
    partition, chosen at random among those with a leader (``available``) when there are any.
    Not thread safe: the producer calls it under its accumulator lock.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        # topic -> (sticky partition, partition count, partitions with a leader)
        self._current: dict[str, tuple[int, int, Sequence[int]]] = {}

    def partition(self, topic: str, num_partitions: int, available: Sequence[int] = ()) -> int:
        cur = self._current.get(topic)
        if cur is not None and cur[1] == num_partitions and cur[2] is available:
            return cur[0]
        if cur is None or cur[0] >= num_partitions:
            p = self._pick(num_partitions, available, previous=-1)
        else:
            p = cur[0]
        self._current[topic] = (p, num_partitions, available)
        return p

    def on_batch_done(self, topic: str, partition: int) -> None:
        """Move the topic on if ``partition`` was its sticky partition."""
        cur = self._current.get(topic)
        if cur is not None and cur[0] == partition:
            self._current[topic] = (self._pick(cur[1], cur[2], previous=partition), cur[1], cur[2])

    def _pick(self, num_partitions: int, available: Sequence[int], previous: int) -> int:
        choices: Sequence[int] = available if available else range(num_partitions)
        if len(choices) == 1:
            return choices[0]
        i = self._rng.randrange(len(choices))
        if choices[i] == previous:  # never stay put when there is a choice
            i = (i + 1) % len(choices)
        return choices[i]
