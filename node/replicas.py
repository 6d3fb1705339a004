"""The replica lifecycle: this node's partition replicas kept in step with the metadata image.

Each image the node applies becomes, per partition placed here, a replica opened (its log created
or recovered), a role and epochs taken (leader or follower, ``Partition.follow``), or a replica
closed and, once the node has caught up with the metadata, its data removed (a deleted topic).
After each image ``on_roles`` hears every replica with its role (the follower's fetchers start and
stop from it, ``fetcher.py``); request handling stays in ``broker.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from headwater.config import NodeConfig
from headwater.node.partition import Partition
from headwater.raft.metadata import ClusterMetadata, PartitionRecord
from headwater.storage import LogStore, StorageError

__all__ = ["Replicas"]

log = logging.getLogger("headwater.node")
Key = tuple[str, int]


class Replicas:
    """This node's replicas by ``(topic, partition)``, opened, moved and dropped as images say."""

    def __init__(
        self, config: NodeConfig, store: LogStore, *, now_ms: Callable[[], int] | None = None
    ) -> None:
        self.config = config
        self.store = store
        # The clock of replica states (follower lag, ISR changes): monotonic milliseconds.
        self.now_ms = now_ms or (lambda: int(time.monotonic() * 1000))
        # This node's broker epoch (from its registration; -1 before): a leader's ISR changes
        # carry it.
        self.broker_epoch: Callable[[], int] = lambda: -1
        # Told of a leader replica whose ISR may grow (a follower out of it fetched): ``isr.py``.
        self.isr_check: Callable[[Partition], None] = lambda p: None
        self.by_key: dict[Key, Partition] = {}
        # Set once the image has reached the metadata the controller had when this node registered:
        # only then may a replica missing from the image be a deleted one (and its data removed).
        self.caught_up = False
        # A replica failed to open (e.g. a full disk): apply the image again later.
        self.needs_reconcile = False
        # Data on disk that the first caught-up image does not place here was swept.
        self._orphans_swept = False
        # Told after each image every replica with its role and leader (the follower's fetchers).
        self.on_roles: Callable[[Iterable[Partition]], None] | None = None

    def apply(self, image: ClusterMetadata, previous: ClusterMetadata, *, caught_up: bool) -> None:
        """Open the replicas ``image`` places here, set each one's role and epochs, and (once caught
        up) remove the data of replicas it no longer has. ``previous`` is the image served before."""
        self.caught_up = self.caught_up or caught_up
        me = self.config.node_id
        wanted: dict[Key, tuple[bytes, PartitionRecord]] = {}
        for tid, t in image.topics.items():
            for index, rec in enumerate(t.partitions):
                if me in rec.replicas:
                    wanted[(t.name, index)] = (tid, rec)
        for key, held in list(self.by_key.items()):
            w = wanted.get(key)
            if w is None or w[0] != held.topic_id:
                self.drop(key, held, delete_data=self.caught_up)
        self.needs_reconcile = False
        unopened = 0
        for key, (tid, rec) in wanted.items():
            p = self.by_key.get(key)
            if p is None:
                try:
                    plog = self.store.open_partition(tid, key[1])
                except StorageError as e:
                    if not unopened:
                        log.warning("cannot open %s-%d yet (tried again later): %s", key[0], key[1], e)
                    unopened += 1
                    self.needs_reconcile = True
                    continue
                p = self.by_key[key] = Partition(key[0], tid, key[1], plog, node_id=me)
            if rec.leader == me and p.leader_id != me:
                before = previous.partition(tid, key[1])
                if before is not None and me not in before.isr:
                    log.warning(
                        "UNCLEAN leader election: node %d leads %s-%d without having been in sync "
                        "(ISR was %s); records acknowledged by the previous leader may be lost",
                        me,
                        key[0],
                        key[1],
                        list(before.isr),
                    )
            p.follow(
                rec.leader,
                rec.leader_epoch,
                rec.partition_epoch,
                rec.replicas,
                rec.isr,
                broker_epoch=self.broker_epoch(),
                now_ms=self.now_ms(),
            )
        if unopened > 1:
            log.warning("%d replicas could not be opened yet", unopened)
        if self.caught_up and not self._orphans_swept and not unopened:
            self._orphans_swept = True
            self._drop_orphans({(tid, key[1]) for key, (tid, _) in wanted.items()})
        if self.on_roles is not None:
            self.on_roles(list(self.by_key.values()))

    def drop(self, key: Key, p: Partition, *, delete_data: bool) -> None:
        """Close a replica: its acks=all waiters fail, its parked readers wake (and find it gone),
        and with ``delete_data`` its log is removed."""
        del self.by_key[key]
        p.close()
        if delete_data:
            log.info("removing replica %s-%d (topic %s)", key[0], key[1], p.topic_id.hex())
            try:
                self.store.delete_partition(p.topic_id, p.index)
            except StorageError as e:  # the start-up sweep of orphans removes it later
                log.warning("removing %s-%d failed: %s", key[0], key[1], e)

    def _drop_orphans(self, live: set[tuple[bytes, int]]) -> None:
        """Data of replicas the caught-up image does not place here (deleted or moved meanwhile)."""
        for topic_id, index in self.store.list_partitions():
            if (topic_id, index) not in live:
                log.info("removing data of deleted topic %s partition %d", topic_id.hex(), index)
                try:
                    self.store.delete_partition(topic_id, index)
                except StorageError as e:
                    log.warning("removing orphan %s-%d failed: %s", topic_id.hex(), index, e)

    def close(self) -> None:
        """The node is stopping: acks=all waits end, parked readers wake."""
        for p in self.by_key.values():
            p.close()
