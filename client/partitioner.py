"""Which partition a record goes to: Kafka's default partitioner, bit for bit.

Keyed records go to ``(murmur2(key) & 0x7fffffff) % num_partitions``, the rule of Kafka's
``BuiltInPartitioner.partitionForKey``, so a key lands on the same partition number as it would with
any Kafka client. Keyless records are sticky (KIP-480): they all go to one partition until that
partition's batch is full or sent, then to another, which makes bigger batches than round robin.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from headwater.v1.partitioner import murmur2, partition_for_key

__all__ = ["murmur2", "partition_for_key", "StickyPartitioner"]


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
