"""The voter's Raft journal: entries survive a reopen, truncation and compaction; a full disk is
reported, not fatal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from headwater.raft import journal as journal_mod
from headwater.raft.journal import HEADROOM_BYTES, JournalError, SyncedJournal


def entries(j: SyncedJournal) -> list[tuple[bytes, int, int]]:
    return [j[i] for i in range(len(j))]


def test_entries_term_and_vote_survive_a_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "raft.wal")
    j = SyncedJournal(path)
    for i in range(1, 51):
        j.add(b"cmd-%d" % i, i, 1 + i // 20)
    j.setCurrentTerm(3, "127.0.0.1:9000")
    j.setRaftCommitIndex(40)
    j.onOneSecondTimer()
    want = entries(j)
    j._destroy()
    again = SyncedJournal(path)
    assert entries(again) == want
    assert again.getCurrentTerm() == 3 and again.getVotedForNodeId() == "127.0.0.1:9000"
    assert again.getRaftCommitIndex() == 40
    # Space past the end is reserved, so the next appends cannot meet a full disk.
    assert os.stat(path).st_size >= HEADROOM_BYTES
    again._destroy()


def test_truncation_and_compaction_persist(tmp_path: Path) -> None:
    path = str(tmp_path / "raft.wal")
    j = SyncedJournal(path)
    for i in range(1, 21):
        j.add(b"e%d" % i, i, 1)
    j.deleteEntriesFrom(15)  # a follower drops a conflicting suffix
    j.add(b"new-16", 16, 2)
    j.deleteEntriesTo(5)  # compaction after a snapshot
    want = entries(j)
    assert want[0] == (b"e6", 6, 1) and want[-1] == (b"new-16", 16, 2) and len(want) == 11
    j._destroy()
    assert entries(reopened := SyncedJournal(path)) == want
    reopened.clear()
    reopened.add(b"only", 100, 5)
    reopened._destroy()
    assert entries(SyncedJournal(path)) == [(b"only", 100, 5)]


def test_a_torn_last_entry_is_dropped_on_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "raft.wal")
    j = SyncedJournal(path)
    j.add(b"whole", 1, 1)
    end = j._end
    j.add(b"torn-entry", 2, 1)
    j._destroy()
    with open(path, "r+b") as fh:  # the trailing length of the second entry never made it
        fh.seek(end + 4 + 16 + len(b"torn-entry"))
        fh.write(b"\0\0\0\0")
    assert entries(SyncedJournal(path)) == [(b"whole", 1, 1)]


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "raft.wal"
    path.write_bytes(b"PYSYNCOBJ\0\0\0 something else")
    with pytest.raises(JournalError, match="not a journal"):
        SyncedJournal(str(path))


def test_no_space_to_reserve_turns_on_low_space_and_appends_still_land(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "raft.wal")
    j = SyncedJournal(path)
    assert not j.low_space

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_mod.SyncedJournal, "_fallocate", staticmethod(no_space))
    big = b"x" * (1024 * 1024)
    # Within the reserve the appends land; once the reserve runs short, low_space is on.
    for i in range(1, 4):
        j.add(big, i, 1)
    assert j.low_space
    want = entries(j)
    j._destroy()
    monkeypatch.undo()
    again = SyncedJournal(path)
    assert entries(again) == want and not again.low_space
    again._destroy()


def test_an_overlapping_append_keeps_matching_entries_and_a_conflict_truncates(tmp_path: Path) -> None:
    path = str(tmp_path / "raft.wal")
    j = SyncedJournal(path)
    for i in range(1, 11):
        j.add(b"e%d" % i, i, 1)
    before = entries(j)
    # A late append overlapping what the follower holds: pysyncobj asks to delete from its
    # prevLogIdx on, then re-adds the same entries, or fewer of them. Nothing acknowledged goes.
    j.deleteEntriesFrom(5)
    j.add(b"e6", 6, 1)
    j.setRaftCommitIndex(8)
    assert entries(j) == before
    j.deleteEntriesFrom(5)
    j.setRaftCommitIndex(8)
    assert entries(j) == before
    # A real conflict (same index, another term) drops the suffix from there.
    j.deleteEntriesFrom(5)
    j.add(b"e6", 6, 1)
    j.add(b"other-7", 7, 2)
    assert entries(j) == before[:6] + [(b"other-7", 7, 2)]
    j._destroy()
    assert entries(SyncedJournal(path)) == before[:6] + [(b"other-7", 7, 2)]


def test_loading_a_snapshot_keeps_the_entries_after_it(tmp_path: Path) -> None:
    """A crash between writing a dump and compacting: pysyncobj finds the journal does not start at
    the dump, clears it and adds the dump's last two entries. Entries after them stay."""
    path = str(tmp_path / "raft.wal")
    j = SyncedJournal(path)
    for i in range(1, 31):
        j.add(b"e%d" % i, i, 1)
    before = entries(j)
    j.clear()
    j.add(b"e9", 9, 1)
    j.add(b"e10", 10, 1)
    j.setRaftCommitIndex(30)
    assert entries(j) == before[8:]
    j._destroy()
    assert entries(again := SyncedJournal(path)) == before[8:]
    # A snapshot this journal holds no entry of replaces everything.
    again.clear()
    again.add(b"s3", 3, 2)
    again.add(b"s4", 4, 2)
    again._destroy()
    assert entries(SyncedJournal(path)) == [(b"s3", 3, 2), (b"s4", 4, 2)]


def test_a_clear_after_compaction_forgets_the_old_first_index(tmp_path: Path) -> None:
    path = str(tmp_path / "raft.wal")
    j = SyncedJournal(path)
    for i in range(1, 11):
        j.add(b"e%d" % i, i, 1)
    j.deleteEntriesTo(5)  # first index 6
    j.clear()
    for i in range(3, 8):
        j.add(b"n%d" % i, i, 2)
    j._destroy()
    assert [e[1] for e in entries(SyncedJournal(path))] == [3, 4, 5, 6, 7]


def test_a_torn_write_of_the_term_and_vote_leaves_the_previous_ones(tmp_path: Path) -> None:
    path = str(tmp_path / "raft.wal")
    j = SyncedJournal(path)
    j.setCurrentTerm(4, "a")
    j.setCurrentTerm(5, "b")
    j._destroy()
    meta = Path(path + ".meta")
    raw = bytearray(meta.read_bytes())
    half = len(raw) // 2
    # The last store went to one slot; tear it (its CRC no longer matches).
    slot = max((0, half), key=lambda off: int.from_bytes(raw[off + 8 : off + 16], "little"))
    raw[slot + 20] ^= 0xFF
    meta.write_bytes(bytes(raw))
    again = SyncedJournal(path)
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (4, "a")
