"""The perf tool's allocator setting takes effect in a fresh process (glibc) and is harmless elsewhere."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")
def test_keep_large_buffers_applies_in_a_fresh_process() -> None:
    code = (
        "from headwater._alloc import keep_large_buffers\n"
        "ok = keep_large_buffers()\n"
        "big = [bytes(4 << 20) for _ in range(4)]\n"  # the process keeps working with big buffers
        "print(ok, sum(map(len, big)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    applied, total = out.split()
    assert total == str(16 << 20)
    assert applied == "True"
