"""py-spy for the benchmarks: sample a process, and read its samples back as self time per function."""

from __future__ import annotations

import collections
import subprocess
from pathlib import Path

__all__ = ["spy", "profile_summary"]


def spy(pid: int, path: str) -> subprocess.Popen[bytes]:
    """Sample ``pid`` into ``path`` (py-spy's raw collapsed stacks) until sent SIGINT."""
    return subprocess.Popen(
        ["py-spy", "record", "--format", "raw", "-o", path, "--pid", str(pid), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_summary(raw_path: str, top: int = 12) -> list[tuple[float, str]]:
    """Self time per function, in percent of the samples, the largest first ([] without samples)."""
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        lines = Path(raw_path).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        self_time[stack.split(";")[-1]] += int(count)
        total += int(count)
    return [(100.0 * n / total, frame) for frame, n in self_time.most_common(top)] if total else []
