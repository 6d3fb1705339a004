"""``LogStore``: the node's one RocksDB database, holding every partition log it replicates.

Column families: ``default`` holds the batches, ``meta`` the partition metadata and the node's catalog
namespace, ``timeindex`` the timestamp index (key layout in ``_keys.py``). Every write goes through the
WAL; ``sync`` is per call, so a ``kill -9`` of the process never loses a write that returned, and a
synced write also survives losing power.

When a write fails (typically: the disk is full), RocksDB keeps refusing writes even after space comes
back (it records a background error and, as rocksdict cannot call ``DB::Resume``, the only way out is
to reopen). The store then raises ``LogWriteError`` and remembers it; ``recover()`` reopens the
database, and the next write calls it by itself, so writes resume once space returns. Reads keep
working in between (from the failed instance, or a read-only instance if a reopen could not write).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from rocksdict import AccessType, ColumnFamily, DBCompressionType, Options, Rdict, WriteBatch, WriteOptions

from headwater.storage import _keys as K
from headwater.storage.errors import LogWriteError, StorageError
from headwater.storage.log import PartitionLog, scan

__all__ = ["LogStore"]

log = logging.getLogger("headwater.storage")

_META_CF = "meta"
_TIMEINDEX_CF = "timeindex"


@dataclass(slots=True)
class _Handles:
    """One open instance of the database. Never kept beyond one operation: ``recover()`` swaps it."""

    db: Rdict  # the default column family: batches
    meta: Rdict
    timeindex: Rdict
    meta_cf: ColumnFamily
    timeindex_cf: ColumnFamily
    writable: bool

    def close(self) -> None:
        # Every column-family object keeps RocksDB open: close them all, the default one last.
        for rd in (self.meta, self.timeindex, self.db):
            try:
                rd.close()
            except Exception as e:  # after a write error the final flush fails; the WAL has the data
                log.debug("closing RocksDB: %s", e)
        # A traceback keeps the frames of a failed call alive, and with them this object: drop the
        # references so that RocksDB really closes (and its LOCK is free for a reopen).
        for name in self.__slots__:
            setattr(self, name, None)


def _options() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    opts.set_keep_log_file_num(4)
    opts.set_max_log_file_size(16 << 20)
    # Batches are often compressed by their producer already, and compressing them again costs the
    # CPU the node's request path needs (measured: a third of the node's time under produce load).
    opts.set_compression_type(DBCompressionType.none())
    # Blob files (values outside the LSM tree) were tried: less compaction work, but reads of fresh
    # data a fifth slower, so batches stay in the tree.
    return opts


def _open(path: str, *, writable: bool = True) -> _Handles:
    cfs = {_META_CF: Options(raw_mode=True), _TIMEINDEX_CF: Options(raw_mode=True)}
    access = AccessType.read_write() if writable else AccessType.read_only()
    db = Rdict(path, _options(), column_families=cfs, access_type=access)
    return _Handles(
        db=db,
        meta=db.get_column_family(_META_CF),
        timeindex=db.get_column_family(_TIMEINDEX_CF),
        meta_cf=db.get_column_family_handle(_META_CF),
        timeindex_cf=db.get_column_family_handle(_TIMEINDEX_CF),
        writable=writable,
    )


class _Gate:
    """Shared/exclusive gate: operations share it; ``close`` and ``recover`` take it alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def try_shared(self) -> Iterator[bool]:
        """Like ``shared`` but never waits: yields False (holding nothing) while ``exclusive`` is held."""
        with self._cond:
            if self._exclusive:
                got = False
            else:
                self._active += 1
                got = True
        try:
            yield got
        finally:
            if got:
                with self._cond:
                    self._active -= 1
                    if self._active == 0:
                        self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._active:
                self._cond.wait()
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class LogStore:
    """One RocksDB database per node: every partition log plus a small catalog namespace.

    Thread-safe. Lock order: the store's gate, then the store's partition table, then a partition.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._gate = _Gate()
        self._table_lock = threading.Lock()
        self._partitions: dict[bytes, PartitionLog] = {}
        self._closed = False
        self._write_failed = False
        self._sync_opts = WriteOptions()
        self._sync_opts.sync = True
        self._async_opts = WriteOptions()
        self._handles: _Handles | None = _open(path)

    @property
    def path(self) -> str:
        return self._path

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the database (idempotent). Waits for operations in flight."""
        with self._gate.exclusive():
            if self._closed:
                return
            self._closed = True
            if self._handles is not None:
                self._handles.close()
                self._handles = None
            self._partitions.clear()

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recover(self) -> None:
        """Reopen the database after a failed write so writes can resume, and reload every open
        partition's state from it (a write that failed may still have reached the WAL whole; the
        database, not memory, says whether it did). Raises ``LogWriteError`` if the database cannot be
        opened for writing yet; reads keep working from a read-only instance and the next write
        tries again."""
        with self._gate.exclusive():
            if self._closed:
                raise StorageError("the log store is closed")
            if self._handles is not None:
                self._handles.close()
                self._handles = None
            try:
                handles = _open(self._path)
            except Exception as e:
                self._write_failed = True
                try:
                    self._handles = _open(self._path, writable=False)
                except Exception as e2:
                    log.warning("cannot reopen RocksDB even read-only: %s", e2)
                raise LogWriteError(f"cannot reopen the log store for writing: {e}") from e
            self._handles = handles
            self._write_failed = False
            for p in list(self._partitions.values()):
                p._reload(handles)

    # ------------------------------------------------------------------ partitions

    def open_partition(self, topic_id: bytes, partition: int) -> PartitionLog:
        """The log of ``(topic_id, partition)``, created empty if missing. Reopening is cheap: the state
        is a handful of keys in ``meta`` (no scan of the batches)."""
        pk = K.partition_key(topic_id, partition)
        with self._reading() as h, self._table_lock:
            existing = self._partitions.get(pk)
            if existing is not None:
                return existing
            p = PartitionLog(self, pk)
            if p._reload(h):
                self._partitions[pk] = p
                return p
        with self._writing() as h, self._table_lock:
            existing = self._partitions.get(pk)
            if existing is not None:
                return existing
            if not p._reload(h):
                # Not synced: an empty log lost in a crash is made again, empty, when the metadata
                # places it here, and any synced write after this one (an fsync append) syncs the
                # write-ahead log up to it. A node opening thousands of new replicas at once would
                # otherwise wait for thousands of syncs on its event loop.
                wb = WriteBatch(raw_mode=True)
                wb.put(K.state_key(pk), K.STATE.pack(0, 0, 0), h.meta_cf)
                self._write(h, wb, sync=False)
            self._partitions[pk] = p
            return p

    def list_partitions(self) -> list[tuple[bytes, int]]:
        """Every partition stored, as ``(topic_id, partition)``, sorted."""
        out = []
        with self._reading() as h:
            start = K.META_PARTITION
            while True:
                found = scan(h.meta, start, _prefix_end(K.META_PARTITION), limit=1)
                if not found:
                    break
                pk = found[0][0][1 : 1 + K.PK_LEN]
                if h.meta.get(K.state_key(pk)) is not None:
                    out.append(K.split_partition_key(pk))
                start = K.META_PARTITION + K.next_partition_key(pk)
        return out

    def delete_partition(self, topic_id: bytes, partition: int) -> None:
        """Delete a partition's batches, indexes and metadata (synced). A no-op if it does not exist;
        a ``PartitionLog`` of it raises ``StorageError`` afterwards."""
        pk = K.partition_key(topic_id, partition)
        end = K.next_partition_key(pk)
        with self._writing() as h, self._table_lock:
            p = self._partitions.get(pk)
            with p._lock if p is not None else contextlib.nullcontext():
                wb = WriteBatch(raw_mode=True)
                wb.delete_range(pk, end)
                wb.delete_range(K.META_PARTITION + pk, K.META_PARTITION + end, h.meta_cf)
                wb.delete_range(K.META_BATCH + pk, K.META_BATCH + end, h.meta_cf)
                wb.delete_range(pk, end, h.timeindex_cf)
                self._write(h, wb, sync=True)
                if p is not None:
                    p._deleted = True
                    del self._partitions[pk]

    def sync_wal(self) -> None:
        """Fsync the write-ahead log: every write that returned before this call, synced or not, now
        survives losing power (RocksDB's FlushWAL(sync=true)).

        This is group commit for ``flush_policy=fsync``: append with ``sync=False``, then call this
        once for everything appended meanwhile, and only then acknowledge those appends. One sync
        costs about as much as one synced append, so N appends pay one sync instead of N. Raises
        ``LogWriteError`` if the sync fails: then nothing appended since the last successful sync may
        be acknowledged as synced.
        """
        with self._writing() as h:
            if not h.writable:
                raise LogWriteError("the log store is read-only until recover() succeeds")
            try:
                h.db.flush_wal(True)
            except Exception as e:
                self._write_failed = True
                raise LogWriteError(f"RocksDB could not sync its write-ahead log: {e}") from e

    def rocksdb_property(self, name: str) -> int | None:
        """RocksDB's integer property ``name`` (e.g. ``rocksdb.live-sst-files-size``) summed over the
        column families, or None while the database is closed or being reopened. Never waits for a
        ``recover()``: the metrics read this on the node's event loop."""
        with self._gate.try_shared() as got:
            h = self._handles
            if not got or self._closed or h is None:
                return None
            total = 0
            for rd in (h.db, h.meta, h.timeindex):
                value = rd.property_int_value(name)
                if value is None:
                    return None
                total += int(value)
            return total

    # ------------------------------------------------------------------ the node's catalog namespace

    def put_meta(self, key: bytes, value: bytes) -> None:
        """Store a catalog entry (synced before returning)."""
        with self._writing() as h:
            wb = WriteBatch(raw_mode=True)
            wb.put(K.META_CATALOG + key, value, h.meta_cf)
            self._write(h, wb, sync=True)

    def get_meta(self, key: bytes) -> bytes | None:
        with self._reading() as h:
            value: bytes | None = h.meta.get(K.META_CATALOG + key)
            return value

    def delete_meta(self, key: bytes) -> None:
        """Delete a catalog entry (synced; a no-op if missing)."""
        with self._writing() as h:
            wb = WriteBatch(raw_mode=True)
            wb.delete(K.META_CATALOG + key, h.meta_cf)
            self._write(h, wb, sync=True)

    def iter_meta(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Catalog entries whose key starts with ``prefix``, in key order (read at the call)."""
        full = K.META_CATALOG + prefix
        with self._reading() as h:
            items = scan(h.meta, full, _prefix_end(full))
        return iter([(k[1:], v) for k, v in items])

    # ------------------------------------------------------------------ for PartitionLog

    @contextlib.contextmanager
    def _reading(self) -> Iterator[_Handles]:
        with self._gate.shared():
            if self._closed:
                raise StorageError("the log store is closed")
            if self._handles is None:
                raise StorageError("the log store's database is unavailable; recover() reopens it")
            yield self._handles

    @contextlib.contextmanager
    def _writing(self) -> Iterator[_Handles]:
        if self._write_failed and not self._closed:
            self.recover()  # raises LogWriteError while the disk is still full
        with self._reading() as h:
            yield h

    def _write(self, h: _Handles, wb: WriteBatch, *, sync: bool) -> None:
        """Apply one WriteBatch atomically (WAL always on); ``LogWriteError`` if RocksDB refuses it."""
        if not h.writable:
            raise LogWriteError("the log store is read-only until recover() succeeds")
        try:
            h.db.write(wb, self._sync_opts if sync else self._async_opts)
        except Exception as e:
            self._write_failed = True
            raise LogWriteError(f"RocksDB write failed: {e}") from e


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    assert stripped, "every key space here starts with a tag byte below 0xff"
    return stripped[:-1] + bytes([stripped[-1] + 1])
