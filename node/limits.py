"""What a node sets up in its own process before it serves: descriptors, file modes, connection caps.

Every connection holds a file descriptor, and so does every open log segment, the Raft port and the
metrics port. A node raises its soft descriptor limit to the hard one (a limit the administrator
set is respected, never exceeded), and keeps a reserve of descriptors out of reach of client
connections, so that a flood of connections cannot stop it from opening its own files.

Records are private: the node creates files readable by its own user only (umask 077) and keeps its
data dir at mode 0700, tightening one it owns that was left open by an older version.
"""

from __future__ import annotations

import logging
import os
import stat

__all__ = [
    "FILE_UMASK",
    "DATA_DIR_MODE",
    "DESCRIPTOR_RESERVE",
    "raise_descriptor_limit",
    "connection_cap",
    "restrict_new_files",
    "secure_data_dir",
]

log = logging.getLogger("headwater.node")

# New files 0600, new folders 0700.
FILE_UMASK = 0o077
DATA_DIR_MODE = 0o700
# Descriptors kept from client connections when max_connections is derived (log segments, the
# store's files, Raft peers, the metrics port, relayed Subscribe channels).
DESCRIPTOR_RESERVE = 1024


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; returns the soft limit now in
    force (-1 where the platform has no such limit)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        # Linux refuses an infinite descriptor limit; its ceiling is fs.nr_open.
        target = _nr_open() or soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("descriptor limit raised from %d to %d (the hard limit)", soft, target)
            soft = target
        except (ValueError, OSError) as e:
            log.warning("descriptor limit stays at %d: raising it to %d failed: %s", soft, target, e)
    else:
        log.info("descriptor limit is %d", soft)
    return int(soft) if soft != resource.RLIM_INFINITY else -1


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return 0


def connection_cap(max_connections: int, descriptor_limit: int) -> int:
    """Client connections allowed at once: ``max_connections`` when set, else the descriptor limit
    less a reserve (at most a quarter of the limit, so a small limit still serves clients). 0 means
    no cap (no known descriptor limit)."""
    if max_connections > 0:
        return max_connections
    if descriptor_limit <= 0:
        return 0
    reserve = min(DESCRIPTOR_RESERVE, descriptor_limit // 4)
    return max(1, descriptor_limit - reserve)


def restrict_new_files() -> int:
    """Make every file and folder this process creates from now on private to its user; returns
    the previous umask. Applies to the log store, the Raft journal and dump, and secrets alike."""
    return os.umask(FILE_UMASK)


def secure_data_dir(path: str) -> None:
    """Create ``path`` at mode 0700, or tighten an existing one this user owns to 0700 (logged).
    A folder owned by another user is left as it is: its owner decides."""
    os.makedirs(path, mode=DATA_DIR_MODE, exist_ok=True)
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 == 0:
        return
    if st.st_uid != os.geteuid():
        log.warning(
            "data dir %s has mode %o and belongs to another user; records may be readable", path, mode
        )
        return
    os.chmod(path, mode & ~0o077 | 0o700)
    log.info("data dir %s had mode %o; now 0700 so that only this user reads its records", path, mode)
