"""The ``headwater`` command end to end: each test runs the real CLI as a subprocess against a node."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeProcess, free_port


def hw(
    *args: str,
    bootstrap: str | None = None,
    input: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m headwater ARGS`` with HEADWATER_BOOTSTRAP set; returns the finished process."""
    env = {k: v for k, v in os.environ.items() if k != "HEADWATER_BOOTSTRAP"}
    if bootstrap is not None:
        env["HEADWATER_BOOTSTRAP"] = bootstrap
    return subprocess.run(
        [sys.executable, "-m", "headwater", *args],
        input=input,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def fails(p: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert a clean failure: non-zero exit, no traceback, one error line naming each fragment."""
    assert p.returncode != 0, f"expected a failure\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("headwater: error:")]
    assert len(errors) == 1, p.stderr
    for f in fragments:
        assert f.lower() in errors[0].lower(), errors[0]
    return errors[0]


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def create(node: NodeProcess, name: str, partitions: int = 1, *extra: str) -> None:
    ok(hw("topic", "create", name, "--partitions", str(partitions), *extra, bootstrap=node.bootstrap))


# ------------------------------------------------------------------ without a node


def test_help_lists_every_command_and_imports_no_client_or_node_code() -> None:
    p = ok(hw("--help"))
    for command in ("node", "local", "topic", "produce", "consume", "perf"):
        assert command in p.stdout
    # What ``import headwater`` itself loads is the package's business; building the parser must add
    # nothing heavy on top of it.
    probe = (
        "import sys, headwater; before = set(sys.modules); import headwater.cli as c; c.build_parser(); "
        "print(sorted(m for m in set(sys.modules) - before "
        "if m.split('.')[0] in ('grpc', 'rich') or m.startswith(('headwater.node', 'headwater.client'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "[]"


def test_node_help_has_a_flag_per_setting() -> None:
    p = ok(hw("node", "--help"))
    for flag in ("--config", "--port", "--data-dir", "--max-message-bytes", "--log-retention-ms"):
        assert flag in p.stdout


# Options left out of --help on purpose, by (command path, option). Keep this small and say why.
HIDDEN_OPTIONS = {
    # A test hook: shortens Kafka's 5-second report interval.
    ("headwater perf produce", "--report-interval-s"),
}


def _parsers(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def _says_its_default(action: argparse.Action) -> bool:
    """Whether an action's default is worth stating: a value, not absence or a flag's False."""
    return action.default not in (None, False, [], argparse.SUPPRESS) and not action.required


def test_help_describes_every_command_option_and_argument_with_its_default() -> None:
    from headwater.cli import build_parser

    missing = []
    hidden = set()
    for path, parser in _parsers(build_parser(), "headwater"):
        for action in parser._actions:
            name = action.option_strings[0] if action.option_strings else action.dest
            if isinstance(action, argparse._SubParsersAction):
                described = {choice.dest: choice.help for choice in action._choices_actions}
                for sub in action.choices:
                    if not described.get(sub):
                        missing.append(f"{path} {sub}")
                continue
            if action.help == argparse.SUPPRESS:
                hidden.add((path, name))
                continue
            if not action.help or not action.help.strip():
                missing.append(f"{path} {name}")
            elif _says_its_default(action) and "default" not in action.help:
                missing.append(f"{path} {name} (its default, {action.default!r})")
    assert missing == []
    assert hidden == HIDDEN_OPTIONS


def test_node_flags_say_what_each_setting_means() -> None:
    from headwater.cli import build_parser
    from headwater.config import NodeConfig

    node = dict(_parsers(build_parser(), "headwater"))["headwater node"]
    helps = {a.dest: a.help or "" for a in node._actions}
    for f in dataclasses.fields(NodeConfig):
        # The setting's own words come before the default and the environment variable.
        assert not helps[f.name].startswith("(default"), f.name
        assert str(f.metadata["doc"]) in helps[f.name].replace("%%", "%")


def test_cli_producer_defaults_are_the_producers() -> None:
    from headwater.cli import PRODUCER_BATCH_SIZE_BYTES, PRODUCER_LINGER_MS
    from headwater.client import Producer

    parameters = inspect.signature(Producer).parameters
    assert parameters["linger_ms"].default == PRODUCER_LINGER_MS
    assert parameters["batch_size_bytes"].default == PRODUCER_BATCH_SIZE_BYTES


def test_readme_names_every_option_of_produce_consume_and_perf() -> None:
    from headwater.cli import build_parser

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    parsers = dict(_parsers(build_parser(), "headwater"))
    common = {"--help", "--bootstrap"}  # stated once for every command
    for path in (
        "headwater produce",
        "headwater consume",
        "headwater perf produce",
        "headwater perf consume",
    ):
        for action in parsers[path]._actions:
            if action.help == argparse.SUPPRESS or not action.option_strings:
                continue
            long = max(action.option_strings, key=len)
            if long not in common:
                assert long in readme, f"README does not mention {path} {long}"


def test_unreachable_bootstrap_is_one_clear_line() -> None:
    port = free_port()  # nothing listens there
    for args in (
        ("topic", "list"),
        ("consume", "t", "--max-messages", "1"),
        ("perf", "consume", "t", "-n", "1"),
    ):
        fails(hw(*args, bootstrap=f"127.0.0.1:{port}", timeout=30), "cannot reach", f"127.0.0.1:{port}")
    fails(hw("topic", "list", "--bootstrap", "nonsense", timeout=30), "HOST:PORT")


# ------------------------------------------------------------------ topics


def test_topic_create_list_describe_alter_delete(node: NodeProcess) -> None:
    b = node.bootstrap
    p = ok(
        hw("topic", "create", "orders", "--partitions", "3", "--config", "retention.ms=60000", bootstrap=b)
    )
    assert "orders" in p.stdout
    create(node, "audit", 1)

    assert ok(hw("topic", "list", bootstrap=b)).stdout.split() == ["audit", "orders"]
    listed = json.loads(ok(hw("topic", "list", "--format", "json", bootstrap=b)).stdout)
    assert {t["name"]: t["partitions"] for t in listed} == {"audit": 1, "orders": 3}

    described = json.loads(ok(hw("topic", "describe", "orders", "--format", "json", bootstrap=b)).stdout)
    assert [t["name"] for t in described] == ["orders"]
    parts = described[0]["partitions"]
    assert [p["partition"] for p in parts] == [0, 1, 2]
    for part in parts:
        assert part["leader"] == 1 and part["replicas"] == [1] and part["isr"] == [1]
        assert part["leader_epoch"] >= 0
        assert part["log_start_offset"] == 0 and part["log_end_offset"] == 0
    # Plain (not a terminal): a header and one tab-separated line per partition.
    lines = ok(hw("topic", "describe", "orders", bootstrap=b)).stdout.splitlines()
    assert lines[0].split("\t")[:3] == ["topic", "partition", "leader"]
    assert [line.split("\t")[:2] for line in lines[1:]] == [["orders", "0"], ["orders", "1"], ["orders", "2"]]

    configs = json.loads(ok(hw("topic", "describe-config", "orders", "--format", "json", bootstrap=b)).stdout)
    assert configs["retention_ms"] == {"value": "60000", "source": "topic"}
    ok(
        hw("topic", "alter-config", "orders", "--set", "retention_ms=120000",
           "--set", "retention_bytes=1048576", bootstrap=b)
    )  # fmt: skip
    configs = json.loads(ok(hw("topic", "describe-config", "orders", "--format", "json", bootstrap=b)).stdout)
    assert configs["retention_ms"]["value"] == "120000"
    assert configs["retention_bytes"] == {"value": "1048576", "source": "topic"}
    ok(hw("topic", "alter-config", "orders", "--delete", "retention_bytes", bootstrap=b))
    configs = json.loads(ok(hw("topic", "describe-config", "orders", "--format", "json", bootstrap=b)).stdout)
    assert configs["retention_bytes"]["source"] != "topic"
    assert configs["retention_ms"]["value"] == "120000"
    fails(hw("topic", "alter-config", "orders", "--set", "no_such_config=1", bootstrap=b), "no_such_config")
    fails(hw("topic", "alter-config", "orders", bootstrap=b), "nothing to change")

    fails(hw("topic", "create", "orders", bootstrap=b), "TOPIC_ALREADY_EXISTS")
    ok(hw("topic", "create", "orders", "--if-not-exists", bootstrap=b))

    ok(hw("topic", "delete", "orders", "audit", bootstrap=b))
    assert ok(hw("topic", "list", bootstrap=b)).stdout.split() == []
    fails(hw("topic", "describe", "orders", bootstrap=b), "UNKNOWN_TOPIC_OR_PARTITION")
    fails(hw("topic", "delete", "orders", bootstrap=b), "UNKNOWN_TOPIC_OR_PARTITION")


def test_bad_topic_input_is_refused_clearly(node: NodeProcess) -> None:
    b = node.bootstrap
    fails(hw("topic", "create", "bad name!", bootstrap=b), "INVALID_TOPIC")
    fails(hw("topic", "create", "..", bootstrap=b), "INVALID_TOPIC")
    fails(hw("topic", "create", "x" * 250, bootstrap=b), "INVALID_TOPIC")
    fails(hw("topic", "create", "zero", "--partitions", "0", bootstrap=b), "INVALID_PARTITIONS")
    fails(hw("topic", "create", "negative", "--partitions", "-3", bootstrap=b), "INVALID_PARTITIONS")
    fails(hw("topic", "create", "conf", "--config", "retention_ms=soon", bootstrap=b), "retention_ms")
    assert ok(hw("topic", "list", bootstrap=b)).stdout.split() == []


# ------------------------------------------------------------------ produce and consume


def test_produce_keyed_lines_then_consume_them_as_json(node: NodeProcess) -> None:
    from headwater.client import partition_for_key

    b = node.bootstrap
    create(node, "orders", 3)
    keys = [f"user-{i % 7}" for i in range(40)]
    lines = [f"{k}:order-{i}:with-a-colon" for i, k in enumerate(keys)]
    produced = ok(hw("produce", "orders", "--key-separator", ":", input="\n".join(lines) + "\n", bootstrap=b))
    assert "Produced 40 records" in produced.stderr

    p = ok(hw("consume", "orders", "--from-beginning", "--max-messages", "40", "--format", "json",
              "--timeout-ms", "20000", bootstrap=b))  # fmt: skip
    records = json_lines(p.stdout)
    assert len(records) == 40
    assert "Processed a total of 40 messages" in p.stderr
    assert sorted((r["key"], r["value"]) for r in records) == sorted(
        (k, f"order-{i}:with-a-colon") for i, k in enumerate(keys)
    )
    by_partition: dict[int, list[dict[str, Any]]] = defaultdict(list)
    partition_of_key: dict[str, set[int]] = defaultdict(set)
    for r in records:
        assert r["topic"] == "orders" and r["headers"] == [] and r["timestamp_ms"] > 0
        by_partition[r["partition"]].append(r)
        partition_of_key[r["key"]].add(r["partition"])
    # Equal keys share a partition, and it is the one Kafka's murmur2 partitioner picks.
    for key, partitions in partition_of_key.items():
        assert partitions == {partition_for_key(key.encode(), 3)}
    # Each partition holds its records at dense offsets from 0, in the order they were produced.
    for part_records in by_partition.values():
        assert [r["offset"] for r in part_records] == list(range(len(part_records)))
        produced_order = [int(r["value"].split(":")[0].split("-")[1]) for r in part_records]
        assert produced_order == sorted(produced_order)
    # The summary names the last offset of each partition.
    for partition, part_records in by_partition.items():
        assert f"partition {partition} up to offset {len(part_records) - 1}" in produced.stderr
    text = ok(hw("consume", "orders", "--from-beginning", "--max-messages", "40", "--print-key",
                 "--print-offset", "--timeout-ms", "20000", bootstrap=b)).stdout.splitlines()  # fmt: skip
    assert len(text) == 40
    partition_offset, key, value = text[0].split("\t")
    assert key.startswith("user-") and value.startswith("order-") and ":" in partition_offset


def test_produce_summary_and_unkeyed_lines(node: NodeProcess) -> None:
    b = node.bootstrap
    create(node, "log", 1)
    p = ok(hw("produce", "log", "--acks", "1", input="first\n\nthird\r\nno newline at end", bootstrap=b))
    assert "Produced 4 records to log: partition 0 up to offset 3" in p.stderr
    p = ok(hw("consume", "log", "--from-beginning", "--max-messages", "4", "--format", "json",
              "--timeout-ms", "20000", bootstrap=b))  # fmt: skip
    assert [(r["key"], r["value"]) for r in json_lines(p.stdout)] == [
        (None, "first"), (None, ""), (None, "third"), (None, "no newline at end"),
    ]  # fmt: skip
    fails(hw("produce", "log", "--key-separator", "=", input="a=1\nb\n", bootstrap=b), "line 2", "separator")
    fails(hw("produce", "log", "--partition", "5", input="x\n", bootstrap=b), "no partition 5")


def test_consume_replays_from_an_offset_and_from_a_timestamp(node: NodeProcess) -> None:
    b = node.bootstrap
    create(node, "events", 1)
    ok(hw("produce", "events", input="".join(f"early-{i}\n" for i in range(5)), bootstrap=b))
    time.sleep(0.05)
    boundary_ms = int(time.time() * 1000)
    time.sleep(0.05)
    ok(hw("produce", "events", input="".join(f"late-{i}\n" for i in range(3)), bootstrap=b))

    def values(*args: str) -> list[str]:
        p = ok(hw("consume", "events", "--format", "json", "--timeout-ms", "3000", *args, bootstrap=b))
        return [r["value"] for r in json_lines(p.stdout)]

    assert values("--partition", "0", "--offset", "3", "--max-messages", "2") == ["early-3", "early-4"]
    assert values("--offset", "6") == ["late-1", "late-2"]
    assert values("--from-timestamp", str(boundary_ms)) == ["late-0", "late-1", "late-2"]
    iso = datetime.fromtimestamp(boundary_ms / 1000, tz=UTC).isoformat()
    assert values("--from-timestamp", iso) == ["late-0", "late-1", "late-2"]
    assert values("--from-timestamp", str(int(time.time() * 1000) + 60_000)) == []
    # Without a start option a consumer starts at the end, as Kafka's console consumer does.
    p = ok(hw("consume", "events", "--timeout-ms", "1500", bootstrap=b))
    assert p.stdout == "" and "Processed a total of 0 messages" in p.stderr


def test_consume_bad_input_is_refused_clearly(node: NodeProcess) -> None:
    b = node.bootstrap
    create(node, "events", 2)
    fails(hw("consume", "events", "--partition", "2", "--max-messages", "1", bootstrap=b), "no partition 2")
    fails(hw("consume", "events", "--from-timestamp", "yesterday", bootstrap=b), "--from-timestamp")
    p = hw("consume", "events", "--offset", "-1", bootstrap=b)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_consume_writes_any_bytes_exactly_as_base64_or_hex_and_never_replaces_them(node: NodeProcess) -> None:
    from headwater.client import Producer

    b = node.bootstrap
    create(node, "raw", 1)
    key, value, header = b"\xff\x00\xfe", b"\x00\xff\xfe\n\tv", b"\xfe\xff"
    with Producer(bootstrap=b) as producer:
        producer.send("raw", "plain text", key="k", partition=0).result(30)
        producer.send("raw", value, key=key, headers=[("h", header), ("none", None)], partition=0).result(30)

    def consume(*args: str) -> subprocess.CompletedProcess[str]:
        return hw("consume", "raw", "--from-beginning", "--max-messages", "2", "--timeout-ms", "20000",
                  *args, bootstrap=b)  # fmt: skip

    decoders = {"base64": base64.b64decode, "hex": bytes.fromhex}
    for encoding, decode in decoders.items():
        first, second = json_lines(ok(consume("--format", "json", "--encoding", encoding)).stdout)
        assert first["encoding"] == second["encoding"] == encoding
        assert (decode(first["key"]), decode(first["value"])) == (b"k", b"plain text")
        assert (decode(second["key"]), decode(second["value"])) == (key, value)
        assert second["headers"][0][0] == "h" and decode(second["headers"][0][1]) == header
        assert second["headers"][1] == ["none", None]

    # utf-8 (the default) is exact or an error naming the way out, never U+FFFD.
    p = consume("--format", "json")
    fails(p, "key of raw partition 0 offset 1 is not valid UTF-8", "--encoding base64")
    (first,) = json_lines(p.stdout)  # the record before it is written
    assert (first["encoding"], first["key"], first["value"]) == ("utf-8", "k", "plain text")
    assert "Processed a total of 1 messages" in p.stderr

    # Text: hex or base64 per field, headers on request; utf-8 writes the bytes unchanged.
    lines = ok(consume("--print-headers", "--print-key", "--encoding", "hex")).stdout.splitlines()
    assert lines == [
        f"NO_HEADERS\t{b'k'.hex()}\t{b'plain text'.hex()}",
        f"h:feff,none:null\t{key.hex()}\t{value.hex()}",
    ]
    env = {**os.environ, "HEADWATER_BOOTSTRAP": b}
    raw = subprocess.run(
        [sys.executable, "-m", "headwater", "consume", "raw", "--from-beginning", "--max-messages", "2",
         "--timeout-ms", "20000", "--print-key"],
        capture_output=True, env=env, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert raw == b"k\tplain text\n" + key + b"\t" + value + b"\n"


def test_commands_on_a_missing_topic_fail_at_once_saying_how_to_create_it(node: NodeProcess) -> None:
    # The producer alone would wait max_block_ms (60 s) for the topic to appear; the command asks
    # the cluster's metadata first.
    b = node.bootstrap
    for args, stdin in (
        (("produce", "nope"), "x\n"),
        (("consume", "nope", "--max-messages", "1"), None),
        (("perf", "produce", "nope", "-n", "10", "--record-size", "10"), None),
        (("perf", "consume", "nope", "-n", "10"), None),
    ):
        started = time.monotonic()
        p = hw(*args, input=stdin, bootstrap=b, timeout=30)
        error = fails(p, "topic 'nope' does not exist; create it with: headwater topic create nope")
        assert time.monotonic() - started < 10, (args, error)


# ------------------------------------------------------------------ perf


def test_perf_produce_then_consume_report_figures(node: NodeProcess) -> None:
    b = node.bootstrap
    create(node, "bench", 2)
    p = ok(hw("perf", "produce", "bench", "--num-records", "3000", "--record-size", "100", "--acks", "1",
              "--format", "json", bootstrap=b))  # fmt: skip
    figures = json.loads(p.stdout.strip().splitlines()[-1])
    assert figures["records"] == 3000 and figures["errors"] == 0 and figures["record_size"] == 100
    assert figures["records_per_s"] > 0 and figures["mb_per_s"] > 0
    assert figures["records_per_s"] == pytest.approx(3000 / figures["elapsed_s"], rel=0.01)
    lat = [figures[k] for k in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_p999_ms")]
    assert 0 < lat[0] <= lat[1] <= lat[2] <= lat[3] <= figures["latency_max_ms"]
    assert 0 < figures["latency_avg_ms"] <= figures["latency_max_ms"]

    p = ok(hw("perf", "produce", "bench", "-n", "500", "--record-size", "10", "--throughput", "1000",
              bootstrap=b))  # fmt: skip
    assert p.stdout.startswith("500 records sent") and "ms 99.9th." in p.stdout
    # --throughput 1000 paces 500 records over about half a second.
    assert float(p.stdout.split(" records/sec")[0].split(", ")[-1]) < 1300

    p = ok(hw("perf", "consume", "bench", "--num-records", "3500", "--format", "json", bootstrap=b))
    figures = json.loads(p.stdout)
    assert figures["records"] == 3500 and figures["bytes"] == 3000 * 100 + 500 * 10
    assert figures["records_per_s"] > 0 and figures["mb_per_s"] > 0
    p = ok(hw("perf", "consume", "bench", "--num-records", "3500", bootstrap=b))
    assert p.stdout.startswith("3500 records consumed") and "MB/sec" in p.stdout
    # Asking for more records than exist fails after the idle timeout, still printing the figures.
    p = hw("perf", "consume", "bench", "-n", "4000", "--timeout-ms", "1000", "--format", "json", bootstrap=b)
    assert json.loads(p.stdout)["records"] == 3500
    fails(p, "3500 of 4000")


# ------------------------------------------------------------------ running nodes


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive free ports on 127.0.0.1."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(20_000, 60_000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no run of free ports")


def test_local_up_serves_a_cluster_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port, metrics_port, raft_port = free_port_run(3), free_port_run(3), free_port_run(3)
    data_dir = tmp_path / "cluster"
    env = {k: v for k, v in os.environ.items() if k != "HEADWATER_BOOTSTRAP"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "headwater", "local", "up", "--data-dir", str(data_dir),
         "--port", str(port), "--metrics-port", str(metrics_port), "--raft-port", str(raft_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    state_path = data_dir / "local.json"
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not state_path.exists():
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "local.json did not appear"
            time.sleep(0.1)
        state = json.loads(state_path.read_text())
        pids = [n["pid"] for n in state["nodes"]]
        assert state["bootstrap"] == ",".join(f"127.0.0.1:{port + i}" for i in range(3))
        assert state["nodes"] == [
            {"node_id": i + 1, "pid": pids[i], "client": f"127.0.0.1:{port + i}",
             "raft": f"127.0.0.1:{raft_port + i}", "voter": True,
             "metrics": f"127.0.0.1:{metrics_port + i}", "log": str(data_dir / f"node-{i + 1}.log"),
             "data_dir": str(data_dir / f"node-{i + 1}"), "netns": None}
            for i in range(3)
        ]  # fmt: skip
        assert all(_pid_alive(pid) for pid in pids)
        # The secret is in a file only its owner reads, and on no command line.
        secret_file = data_dir / "cluster.secret"
        assert secret_file.stat().st_mode & 0o077 == 0
        # So are the data dir, local.json and the nodes' logs.
        assert data_dir.stat().st_mode & 0o777 == 0o700
        for private in [state_path, *data_dir.glob("node-*.log")]:
            assert private.stat().st_mode & 0o077 == 0, private
        secret = secret_file.read_text().strip()
        for pid in pids:
            assert secret not in Path(f"/proc/{pid}/cmdline").read_text()
        described = json.loads(
            ok(hw("cluster", "describe", "--format", "json", bootstrap=state["bootstrap"])).stdout
        )
        assert secret not in json.dumps(described)
        assert sorted(n["node_id"] for n in described["nodes"]) == [1, 2, 3]
        assert not any(n["fenced"] for n in described["nodes"])

        b = state["bootstrap"]
        ok(hw("topic", "create", "demo", "--partitions", "2", bootstrap=b))
        ok(hw("produce", "demo", "--key-separator", ":", input="k1:hello\nk2:world\n", bootstrap=b))
        p = ok(hw("consume", "demo", "--from-beginning", "--max-messages", "2", "--print-key",
                  "--timeout-ms", "20000", bootstrap=b))  # fmt: skip
        assert sorted(p.stdout.splitlines()) == ["k1\thello", "k2\tworld"]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert b"headwater_" in r.read()

        launcher.send_signal(signal.SIGINT)
        stdout, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in pids:
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == 0, stderr
    assert f"bootstrap: 127.0.0.1:{port}" in stdout and "try:" in stdout
    assert "Traceback" not in stderr
    assert not any(_pid_alive(pid) for pid in pids)
    assert _port_is_free(port) and _port_is_free(metrics_port)
    assert not state_path.exists()
    assert (data_dir / "node-1").is_dir() and (data_dir / "node-1.log").exists()


def test_local_up_says_so_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = hw("local", "up", "--data-dir", str(tmp_path), "--port", str(port), "--metrics-port", "0")
    fails(p, f"port {port}", "already in use")


def test_node_command_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "headwater", "node",
             "--port", str(port), "--data-dir", str(tmp_path / "d")],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        node = NodeProcess(tmp_path / "d", port, proc=proc)  # reuse the fixture's health wait
        node.log_path = log_path
        node.wait_serving(30)
        create(node, "t", 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    p = hw("node", "--port", "0", "--data-dir", str(tmp_path / "e"))
    fails_config = p.returncode != 0 and "port" in p.stderr and "Traceback" not in p.stderr
    assert fails_config, p.stderr
