"""The Raft journal of a metadata voter: appended with ``pwrite`` into preallocated space, synced.

pysyncobj's own file journal maps its file into memory and never syncs it. On a full disk a write
into a mapped page the file system cannot back kills the process with SIGBUS, and an entry the voter
acknowledged may never reach the disk. This journal keeps the same interface (pysyncobj's
``Journal``) and:

- writes each entry with ``pwrite`` and ``fdatasync`` before pysyncobj goes on (a voter acknowledges
  an entry only once it is on disk);
- keeps ``HEADROOM_BYTES`` preallocated ahead of the end (``posix_fallocate``), so an append never
  meets a full disk. When the space ahead cannot be reserved, ``low_space`` turns on and the
  controller refuses new commands (STORAGE_ERROR) until space returns;
- keeps the term, vote and commit index in a small preallocated side file, synced on every change
  of term or vote (Raft's persistent state).

A follower truncates only on a real conflict (Raft's rule). pysyncobj's follower deletes every entry
after an append's ``prevLogIdx`` and re-adds what the message carries, even when they match; with
overlapping appends in flight that deleted entries it had acknowledged and applied (it logs a
CRITICAL line each time), and a message that carried fewer entries lost them. Here
``deleteEntriesFrom`` only marks the position; each following ``add`` of an entry with the same index
and term as the one already there keeps it, and the first one that differs truncates for real.

Layout: a 16-byte header (magic, version), then records ``len:u32 | idx:u64 | term:u64 | command |
len:u32``; a zero length ends the log (preallocated space reads as zeros). Compaction
(``deleteEntriesTo``) records the first live index in the side file and rewrites the file only when
it has grown large and the rewrite fits.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from typing import Any

from pysyncobj.journal import Journal

__all__ = ["SyncedJournal", "JournalError", "HEADROOM_BYTES"]

log = logging.getLogger("headwater.raft.journal")

MAGIC = b"HWRAFTJ1"
_HEADER = MAGIC + struct.pack("<Q", 1)
_LEN = struct.Struct("<I")
_IDX_TERM = struct.Struct("<QQ")
# Space kept reserved past the end of the log; one entry must fit in it.
HEADROOM_BYTES = 8 * 1024 * 1024
_CHUNK_BYTES = 4 * 1024 * 1024
_META_BYTES = 64 * 1024
# Rewrite the file on compaction once it is this much larger than its live entries.
_REWRITE_SLACK_BYTES = 64 * 1024 * 1024


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fail_stop(what: str, error: OSError) -> None:
    # Carrying on after a failed write or sync could acknowledge an entry that is not on disk,
    # which Raft's safety rests on: stop the voter (the node restarts and catches up).
    log.critical("the metadata journal cannot %s (%s); the voter stops", what, error)
    os._exit(75)


class JournalError(OSError):
    """The journal cannot be read or written."""


class SyncedJournal(Journal):  # type: ignore[misc]
    """See the module docstring. Used by pysyncobj on its tick thread; ``low_space`` may be read
    from any thread."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._meta_path = path + ".meta"
        self.low_space = False
        self._meta_dirty = False
        # Position deleteEntriesFrom marked; entries from it stay until an add conflicts with them.
        self._pending_from: int | None = None
        # clear() asked for: done only if the adds that follow do not match entries held here.
        self._pending_clear = False
        created = not (os.path.exists(path) and os.path.exists(self._meta_path))
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._meta_fd = os.open(self._meta_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._meta_seq = 0
        self._meta = self._read_meta()
        self._entries: list[tuple[bytes, int, int]] = []
        size = os.fstat(self._fd).st_size
        if size < len(_HEADER):  # new, or its header was being written: it holds no entry
            os.pwrite(self._fd, _HEADER, 0)
            os.fsync(self._fd)
            size = len(_HEADER)
        elif os.pread(self._fd, len(_HEADER), 0) != _HEADER:
            raise JournalError(f"{path} is not a journal this version can read")
        self._end = self._scan(size)
        self._allocated = size
        self._reserve()
        if os.fstat(self._meta_fd).st_size < _META_BYTES:
            self._fallocate(self._meta_fd, 0, _META_BYTES)
        if created:
            fsync_dir(os.path.dirname(os.path.abspath(path)))

    # ---------------------------------------------------------------- reading

    def _scan(self, size: int) -> int:
        first = int(self._meta.get("first_idx", 0))
        offset = len(_HEADER)
        while offset + _LEN.size <= size:
            (length,) = _LEN.unpack(os.pread(self._fd, _LEN.size, offset))
            if length < _IDX_TERM.size or offset + 2 * _LEN.size + length > size:
                break
            body = os.pread(self._fd, length + _LEN.size, offset + _LEN.size)
            if _LEN.unpack(body[length:])[0] != length:
                break  # a torn write: the entry was never acknowledged
            idx, term = _IDX_TERM.unpack(body[: _IDX_TERM.size])
            if idx >= first:
                self._entries.append((body[_IDX_TERM.size : length], idx, term))
            offset += length + 2 * _LEN.size
        return offset

    # The side file holds two slots; each store writes the slot the last one did not, so a torn
    # write leaves the previous term and vote readable. A slot: len:u32 | crc32:u32 | seq:u64 | json.
    _SLOT = struct.Struct("<IIQ")

    def _read_meta(self) -> dict[str, Any]:
        best: tuple[int, dict[str, Any]] | None = None
        half = _META_BYTES // 2
        for slot in (0, 1):
            raw = os.pread(self._meta_fd, half, slot * half)
            if len(raw) < self._SLOT.size:
                continue
            length, crc, seq = self._SLOT.unpack(raw[: self._SLOT.size])
            body = raw[self._SLOT.size : self._SLOT.size + length]
            if length == 0 or len(body) != length or zlib.crc32(body) != crc:
                continue
            try:
                meta = json.loads(body)
            except ValueError:
                continue
            if isinstance(meta, dict) and (best is None or seq > best[0]):
                best = (seq, meta)
        self._meta_seq = best[0] if best else 0
        return best[1] if best else {}

    # ---------------------------------------------------------------- space

    @staticmethod
    def _fallocate(fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)

    def _reserve(self) -> None:
        """Keep HEADROOM_BYTES allocated past the end; note when the disk cannot give it."""
        want = self._end + HEADROOM_BYTES
        if self._allocated >= want:
            self.low_space = False
            return
        try:
            grow = max(want - self._allocated, _CHUNK_BYTES)
            self._fallocate(self._fd, self._allocated, grow)
            self._allocated += grow
            self.low_space = False
        except OSError as e:
            if not self.low_space:
                log.error("the metadata journal cannot reserve space (%s): refusing new commands", e)
            self.low_space = True

    def _write(self, offset: int, data: bytes) -> None:
        if offset + len(data) + _LEN.size > self._allocated:
            self._reserve()
        if offset + len(data) + _LEN.size > self._allocated:
            # No reserved room left even for this entry: stop rather than acknowledge an entry that
            # is not on disk (Raft's safety rests on it) or die of SIGBUS halfway through.
            _fail_stop("reserve room for an entry", OSError(28, "no space left on device"))
        try:
            os.pwrite(self._fd, data, offset)
            os.fdatasync(self._fd)
        except OSError as e:
            _fail_stop("write an entry", e)

    # ---------------------------------------------------------------- Journal

    def add(self, command: bytes, idx: int, term: int) -> None:
        if self._pending_clear:
            self._pending_clear = False
            at = next((i for i, e in enumerate(self._entries) if e[1] == idx and e[2] == term), None)
            if at is not None:
                # The snapshot's entry is here (Raft's InstallSnapshot rule): keep what follows it.
                del self._entries[:at]
                self._meta["first_idx"] = idx
                self._store_meta()
                self._pending_from = 1
                return
            self._clear_now()
        pos = self._pending_from
        if pos is not None:
            if pos < len(self._entries) and self._entries[pos][1] == idx:
                if self._entries[pos][2] == term:
                    self._pending_from = pos + 1  # the same entry (Raft's log matching): keep it
                    return
                log.warning(
                    "raft log conflict at index %d: dropping %d entries", idx, len(self._entries) - pos
                )
                self._truncate(pos)
            self._pending_from = None
        body = _IDX_TERM.pack(idx, term) + bytes(command)
        record = _LEN.pack(len(body)) + body + _LEN.pack(len(body))
        # The zero length after the record ends the log until the next append overwrites it.
        self._write(self._end, record + _LEN.pack(0))
        self._end += len(record)
        self._entries.append((bytes(command), idx, term))
        if self._allocated - self._end < HEADROOM_BYTES:
            self._reserve()

    def clear(self) -> None:
        """pysyncobj clears the journal before adding a snapshot's last two entries, when it loads
        one that does not start the journal: after a crash between writing a dump and compacting,
        or when the leader sends its dump. Entries after the snapshot's that this journal holds are
        kept (Raft's InstallSnapshot rule 6), so the clear waits for those adds (see add)."""
        self._pending_from = None
        self._pending_clear = True

    def _clear_now(self) -> None:
        self._pending_clear = False
        self._pending_from = None
        self._entries = []
        self._end = len(_HEADER)
        self._write(self._end, _LEN.pack(0))
        self._meta["first_idx"] = 0
        self._store_meta()

    def _settle(self) -> None:
        if self._pending_clear:
            self._clear_now()

    def __getitem__(self, item: Any) -> Any:
        self._settle()
        return self._entries[item]

    def __len__(self) -> int:
        self._settle()
        return len(self._entries)

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802 (pysyncobj's name)
        """Mark: the entries from ``entryFrom`` go only if an add conflicts with them (see above)."""
        self._settle()
        self._pending_from = entryFrom if 0 <= entryFrom < len(self._entries) else None

    def _truncate(self, entryFrom: int) -> None:
        drop = self._entries[entryFrom:]
        del self._entries[entryFrom:]
        self._end -= sum(len(c) + _IDX_TERM.size + 2 * _LEN.size for c, _, _ in drop)
        self._write(self._end, _LEN.pack(0))

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802
        self._settle()
        self._pending_from = None
        if entryTo <= 0:
            return
        del self._entries[:entryTo]
        # The dump that replaces these entries was renamed into place: make that durable before
        # the journal forgets them.
        fsync_dir(os.path.dirname(os.path.abspath(self._path)))
        if self._entries:
            self._meta["first_idx"] = self._entries[0][1]
            self._store_meta()
        live = sum(len(c) + _IDX_TERM.size + 2 * _LEN.size for c, _, _ in self._entries)
        if self._end - live > _REWRITE_SLACK_BYTES:
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self._path + ".tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                parts = [_HEADER]
                for command, idx, term in self._entries:
                    body = _IDX_TERM.pack(idx, term) + command
                    parts += (_LEN.pack(len(body)), body, _LEN.pack(len(body)))
                data = b"".join(parts)
                self._fallocate(fd, 0, len(data) + HEADROOM_BYTES)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            except OSError:
                os.close(fd)
                raise
        except OSError as e:
            log.warning("journal compaction skipped: %s", e)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        os.replace(tmp, self._path)
        fsync_dir(os.path.dirname(os.path.abspath(self._path)))
        os.close(self._fd)
        self._fd = fd
        self._end = len(data)
        self._allocated = len(data) + HEADROOM_BYTES

    def _destroy(self) -> None:
        for fd in (self._fd, self._meta_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def _store_meta(self) -> None:
        body = json.dumps(self._meta).encode()
        half = _META_BYTES // 2
        if len(body) + self._SLOT.size > half:
            raise JournalError("journal meta is too large")
        self._meta_seq += 1
        record = self._SLOT.pack(len(body), zlib.crc32(body), self._meta_seq) + body
        try:
            os.pwrite(self._meta_fd, record, (self._meta_seq % 2) * half)
            os.fdatasync(self._meta_fd)
        except OSError as e:  # preallocated: only a failing disk gets here
            _fail_stop("store the Raft term and vote", e)

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802
        # pysyncobj calls this at the end of every append it handles: a mark left by an append
        # whose entries all matched ends here.
        self._settle()
        self._pending_from = None
        self._meta["commit"] = raftCommitIndex
        self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return int(self._meta.get("commit", 1))

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:  # noqa: N802
        self._meta["term"] = term
        self._meta["voted_for"] = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self) -> int:  # noqa: N802
        return int(self._meta.get("term", 0))

    def getVotedForNodeId(self) -> Any:  # noqa: N802
        return self._meta.get("voted_for")

    def onOneSecondTimer(self) -> None:  # noqa: N802
        if self._meta_dirty:
            self._store_meta()
            self._meta_dirty = False
        if self.low_space:
            self._reserve()
