"""The ``headwater`` command: run nodes and a local cluster, manage topics, describe the cluster and elect
leaders, produce, consume, measure.

Every client command takes ``--bootstrap HOST:PORT`` (several may be given, comma-separated); the
default comes from ``HEADWATER_BOOTSTRAP``, else ``127.0.0.1:9192``. Output is for people on a
terminal (rich tables, a progress bar) and plain when stdout is not a terminal: one item per line,
tab-separated columns with a header. ``--format json`` prints JSON instead. Errors print one line to
stderr and exit non-zero.

Client and node modules are imported inside the commands so that ``headwater --help`` stays fast.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["main", "build_parser", "CliError"]

DEFAULT_BOOTSTRAP = "127.0.0.1:9192"
DEFAULT_PORT = 9192
BOOTSTRAP_ENV = "HEADWATER_BOOTSTRAP"
# Exit codes: 1 for a failed operation, 2 for bad usage (argparse's own), 130 after Ctrl-C.
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_CONSUME_DESCRIPTION = """\
Print records of every partition of a topic (or one). Without a start option it starts at the
end, like Kafka's console consumer, and runs until Ctrl-C, --max-messages or --timeout-ms."""

_CONSUME_JSON_DOC = """\
--format json prints one object per record and line:
  {"topic": str, "partition": int, "offset": int, "timestamp_ms": int, "encoding": str,
   "key": str|null, "value": str|null, "headers": [[str, str|null], ...]}
Keys, values and header values are bytes, written as --encoding says ("encoding" repeats it):
  utf-8   the text they hold; a record that is not valid UTF-8 stops the command with an error
          (nothing is replaced or lost): read such a topic with base64 or hex
  base64  standard base64 (RFC 4648, with padding)
  hex     two lowercase hex digits per byte
A null key or header value is null; a null value is a tombstone. Header names are text.

Text output writes the bytes unchanged with utf-8, and encoded with base64 or hex (which
also keeps a tab or newline inside a value from breaking the line)."""

# How ``consume`` writes keys, values and header values.
ENCODINGS = ("utf-8", "base64", "hex")


class CliError(Exception):
    """A failure to report as one line on stderr; ``exit_code`` is the process exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------ parser


def _add_bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap",
        "-b",
        metavar="HOST:PORT",
        default=os.environ.get(BOOTSTRAP_ENV) or DEFAULT_BOOTSTRAP,
        help=f"node(s) to connect to, comma-separated (env {BOOTSTRAP_ENV}; default %(default)s)",
    )


def _add_format(
    p: argparse.ArgumentParser,
    text: str = "a table on a terminal, tab-separated lines otherwise",
    json: str = "machine-readable",
) -> None:
    p.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help=f"text: {text}; json: {json} (default %(default)s)",
    )


def _positive_int(raw: str) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _non_negative_int(raw: str) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _key_value(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {raw!r}")
    return name.strip(), value


_PERF_TEXT = "Kafka's perf tool lines"
_PERF_JSON = "the final figures as one object, periodic lines to stderr"
_ACKS = ("all", "1", "0", "-1")
_COMPRESSION = ("none", "zstd", "lz4", "gzip")
# The Producer's own defaults, shown by --help; a test keeps them equal to the Producer's signature
# (the client is not imported to build the parser, so that --help stays fast).
PRODUCER_LINGER_MS = 5
PRODUCER_BATCH_SIZE_BYTES = 256 * 1024


def _add_producer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--acks",
        choices=_ACKS,
        default="all",
        help="all (= -1): every in-sync replica has the record; 1: the leader has it; 0: do not wait "
        "(default %(default)s)",
    )
    p.add_argument(
        "--compression",
        choices=_COMPRESSION,
        default="none",
        help="compression of record batches (default %(default)s)",
    )
    p.add_argument(
        "--linger-ms",
        type=_non_negative_int,
        default=PRODUCER_LINGER_MS,
        metavar="MS",
        help="how long a batch waits for more records before it is sent (default %(default)s)",
    )
    p.add_argument(
        "--batch-size-bytes",
        type=_positive_int,
        default=PRODUCER_BATCH_SIZE_BYTES,
        metavar="BYTES",
        help="largest batch of records per partition, before compression (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headwater",
        description="Headwater: a replicated, partitioned, durable event log.",
        epilog="Run 'headwater COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help="one of:")

    # --- node
    p = sub.add_parser("node", help="run a node in this process", description="Run a Headwater node.")
    from headwater.config import add_config_flags

    add_config_flags(p)
    p.set_defaults(func=cmd_node)

    # --- local
    p = sub.add_parser("local", help="run a local cluster on loopback")
    local_sub = p.add_subparsers(dest="local_command", metavar="ACTION", required=True, help="one of:")
    p = local_sub.add_parser(
        "up",
        help="start a local cluster and wait; Ctrl-C stops it",
        description="Start a local cluster as child processes on 127.0.0.1, print its bootstrap "
        "address, and wait. Ctrl-C or SIGTERM stops every node cleanly.",
    )
    p.add_argument(
        "--nodes",
        type=_positive_int,
        default=3,
        help="number of nodes (default %(default)s); 1, 3 or 5 of them are metadata voters",
    )
    p.add_argument("--data-dir", default="./headwater-data", help="data directory (default %(default)s)")
    p.add_argument(
        "--port", type=_positive_int, default=DEFAULT_PORT, help="first client port (default %(default)s)"
    )
    p.add_argument(
        "--metrics-port",
        type=_non_negative_int,
        default=None,
        help="first Prometheus metrics port (default: port + 100; 0 disables metrics)",
    )
    p.add_argument(
        "--raft-port",
        type=_non_negative_int,
        default=None,
        help="first Raft port of the voters (default: port + 200)",
    )
    p.add_argument(
        "--replication-factor",
        type=_positive_int,
        default=3,
        help="default replicas of a new topic (default %(default)s; capped by the number of nodes)",
    )
    p.add_argument(
        "--min-insync-replicas",
        type=_positive_int,
        default=2,
        help="default in-sync replicas an acks=all write needs (default %(default)s; capped by a "
        "topic's replica count)",
    )
    p.add_argument(
        "--start-timeout-s",
        type=float,
        default=60.0,
        metavar="S",
        help="how long to wait for every node to serve (default %(default)s)",
    )
    p.set_defaults(func=cmd_local_up)

    # --- topic
    p = sub.add_parser("topic", help="create, list, describe, configure and delete topics")
    topic_sub = p.add_subparsers(dest="topic_command", metavar="ACTION", required=True, help="one of:")

    p = topic_sub.add_parser("create", help="create a topic")
    p.add_argument("name", help="the topic's name: up to 249 letters, digits, '.', '_' and '-'")
    p.add_argument(
        "--partitions",
        "-p",
        type=int,
        default=-1,
        help="number of partitions (default: the node's default_num_partitions)",
    )
    p.add_argument(
        "--replication-factor",
        "-r",
        type=int,
        default=-1,
        help="replicas of each partition (default: the node's default_replication_factor)",
    )
    p.add_argument(
        "--config",
        "-c",
        action="append",
        type=_key_value,
        default=[],
        metavar="NAME=VALUE",
        help="topic config, e.g. retention.ms=60000 (repeatable)",
    )
    p.add_argument("--if-not-exists", action="store_true", help="succeed if the topic exists already")
    _add_bootstrap(p)
    p.set_defaults(func=cmd_topic_create)

    p = topic_sub.add_parser("list", help="list topics")
    _add_bootstrap(p)
    _add_format(p)
    p.set_defaults(func=cmd_topic_list)

    p = topic_sub.add_parser("describe", help="partitions of topics: leader, epochs, replicas, ISR, offsets")
    p.add_argument("names", nargs="*", metavar="NAME", help="topics to describe (default: every topic)")
    p.add_argument(
        "--no-offsets",
        action="store_true",
        help="skip the offsets and replica lag (asked of every leader; default: shown)",
    )
    p.add_argument(
        "--under-replicated",
        action="store_true",
        help="only partitions whose ISR is smaller than their replica set (default: all)",
    )
    p.add_argument(
        "--under-min-isr",
        action="store_true",
        help="only partitions whose ISR is smaller than min_insync_replicas: acks=all is refused "
        "there (default: all)",
    )
    _add_bootstrap(p)
    _add_format(p)
    p.set_defaults(func=cmd_topic_describe)

    p = topic_sub.add_parser("delete", help="delete topics")
    p.add_argument("names", nargs="+", metavar="NAME", help="topics to delete")
    _add_bootstrap(p)
    p.set_defaults(func=cmd_topic_delete)

    p = topic_sub.add_parser("alter-config", help="set or delete a topic's configs")
    p.add_argument("name", help="the topic")
    p.add_argument(
        "--set",
        "-s",
        action="append",
        type=_key_value,
        default=[],
        metavar="NAME=VALUE",
        help="set a config, e.g. retention_ms=3600000 (repeatable)",
    )
    p.add_argument(
        "--delete",
        "-d",
        action="append",
        default=[],
        metavar="NAME",
        help="delete a config: the node's default applies again (repeatable)",
    )
    _add_bootstrap(p)
    p.set_defaults(func=cmd_topic_alter_config)

    p = topic_sub.add_parser("describe-config", help="a topic's configs and where each comes from")
    p.add_argument("name", help="the topic")
    _add_bootstrap(p)
    _add_format(p)
    p.set_defaults(func=cmd_topic_describe_config)

    # --- cluster
    p = sub.add_parser("cluster", help="describe the cluster and elect partition leaders")
    cluster_sub = p.add_subparsers(dest="cluster_command", metavar="ACTION", required=True, help="one of:")

    p = cluster_sub.add_parser(
        "describe",
        help="nodes, the active controller and the metadata quorum's state",
        description="List the registered nodes (fenced or not, broker epoch, which one is the active "
        "controller), then the Raft term, commit index, metadata offset and voters of the voter that "
        "answered. Text output is two tables: nodes, then the quorum as name/value rows (separated by "
        "an empty line when stdout is not a terminal).",
    )
    _add_bootstrap(p)
    _add_format(p)
    p.set_defaults(func=cmd_cluster_describe)

    p = cluster_sub.add_parser(
        "elect-leaders",
        help="elect partition leaders through the active controller",
        description="Without --preferred: give each partition that has no leader the first unfenced "
        "in-sync replica. With --preferred: move leadership back to each partition's first replica "
        "when it is in sync and unfenced. Without --topic: every partition that needs it. Exits "
        "non-zero when any partition's election failed.",
    )
    p.add_argument("--preferred", action="store_true", help="elect the preferred (first) replica")
    p.add_argument("--topic", "-t", metavar="TOPIC", help="only this topic's partitions")
    p.add_argument(
        "--partition", "-p", type=_non_negative_int, metavar="P", help="only this partition (needs --topic)"
    )
    _add_bootstrap(p)
    _add_format(p)
    p.set_defaults(func=cmd_cluster_elect_leaders)

    # --- produce
    p = sub.add_parser(
        "produce",
        help="send stdin lines as records",
        description="Send one record per stdin line. With --key-separator, the text before the "
        "first separator is the key (a line without it is an error, as in Kafka's console producer). "
        "A summary goes to stderr at the end.",
    )
    p.add_argument("topic", help="the topic to send to; it must exist")
    p.add_argument(
        "--key-separator",
        metavar="SEP",
        help="split each line into KEY SEP VALUE (default: no key, the line is the value)",
    )
    p.add_argument(
        "--partition",
        type=_non_negative_int,
        metavar="P",
        help="send every record to this partition (default: by key, keyless records sticky)",
    )
    _add_producer_options(p)
    _add_bootstrap(p)
    p.set_defaults(func=cmd_produce)

    # --- consume
    p = sub.add_parser(
        "consume",
        help="print records of a topic",
        description=_CONSUME_DESCRIPTION,
        epilog=_CONSUME_JSON_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("topic", help="the topic to read")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true", help="start at the log start")
    start.add_argument(
        "--offset", type=_non_negative_int, metavar="O", help="start every assigned partition here"
    )
    start.add_argument(
        "--from-timestamp",
        metavar="MS|ISO8601",
        help="start at the first record at or after this time (ms since the epoch, or ISO 8601; "
        "without a zone, local time)",
    )
    p.add_argument(
        "--partition",
        type=_non_negative_int,
        metavar="P",
        help="read only this partition (default: every partition)",
    )
    p.add_argument(
        "--max-messages",
        type=_positive_int,
        metavar="N",
        help="exit after this many records (default: no limit)",
    )
    p.add_argument(
        "--timeout-ms",
        type=_positive_int,
        metavar="MS",
        help="exit after this long without a record (default: wait until Ctrl-C)",
    )
    p.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text: the value per line; json: one object per record, see below (default %(default)s)",
    )
    p.add_argument("--print-key", action="store_true", help="text: print KEY<TAB>VALUE")
    p.add_argument("--print-offset", action="store_true", help="text: print PARTITION:OFFSET<TAB> first")
    p.add_argument("--print-timestamp", action="store_true", help="text: print TIMESTAMP_MS<TAB> first")
    p.add_argument(
        "--print-headers",
        action="store_true",
        help="text: print NAME:VALUE,... (NO_HEADERS when none) before the key and value",
    )
    p.add_argument(
        "--encoding",
        choices=ENCODINGS,
        default="utf-8",
        help="how keys, values and header values are written, see below (default %(default)s)",
    )
    _add_bootstrap(p)
    p.set_defaults(func=cmd_consume)

    # --- chaos
    p = sub.add_parser("chaos", help="break a cluster on purpose and check what clients saw")
    chaos_sub = p.add_subparsers(dest="chaos_command", metavar="ACTION", required=True, help="one of:")
    p = chaos_sub.add_parser(
        "run",
        help="run producers and consumers under faults, then check the history",
        description="Starts its own cluster (or uses one given by --state), runs acks=all producers "
        "and consumers while nemeses kill, pause and cut nodes apart, heals every fault, reads "
        "every partition back and checks the history for lost, duplicated and reordered records. "
        "Exit code 0: valid; 1: an anomaly; 2: the run could not be made.",
    )
    p.add_argument(
        "--nodes", type=_positive_int, default=3, help="nodes of the cluster (default %(default)s)"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds of faults and load (default %(default)s)",
    )
    p.add_argument(
        "--nemesis",
        default="kill,pause,partition",
        help="faults to inject, comma separated: kill, pause, partition (default %(default)s; partition "
        "needs root for network namespaces and is left out, with a note, without it)",
    )
    p.add_argument(
        "--rate", type=float, default=500.0, help="records/s the producers offer (default %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the fault schedule and workload (default %(default)s)"
    )
    p.add_argument("--out", default="chaos-runs", help="directory for run reports (default %(default)s)")
    p.add_argument(
        "--partitions", type=_positive_int, default=4, help="partitions of the topic (default %(default)s)"
    )
    p.add_argument(
        "--consumers", type=_non_negative_int, default=2, help="consumer threads (default %(default)s)"
    )
    p.add_argument(
        "--fault-max-s",
        type=float,
        default=15.0,
        help="longest a fault lasts (default %(default)s; shortest 3)",
    )
    p.add_argument(
        "--state",
        default="",
        metavar="LOCAL_JSON",
        help="work on a running cluster: the local.json of 'headwater local up', which names the node "
        "processes to kill and pause (default: start a cluster of its own)",
    )
    p.add_argument(
        "--bootstrap",
        default="",
        help="with --state: the nodes to connect to (default: the bootstrap the state file names)",
    )
    p.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the cluster's data dir after the run (default: removed)",
    )
    p.set_defaults(func=cmd_chaos_run)
    p = chaos_sub.add_parser("check", help="check a saved run's history again and print the verdict")
    p.add_argument("run_dir", help="a run's directory (holding history.jsonl)")
    p.set_defaults(func=cmd_chaos_check)

    # --- perf
    p = sub.add_parser("perf", help="measure produce and consume throughput")
    perf_sub = p.add_subparsers(dest="perf_command", metavar="ACTION", required=True, help="one of:")
    p = perf_sub.add_parser(
        "produce",
        help="produce fixed-size records as fast as allowed",
        description="Like kafka-producer-perf-test: prints a line every 5 s and a final line with "
        "records/s, MB/s (MB = 2^20 bytes, as Kafka does) and latency percentiles. Latency is from "
        "send() to the record's acknowledgement.",
    )
    p.add_argument("topic", help="the topic to send to; it must exist")
    p.add_argument(
        "--num-records",
        "-n",
        type=_positive_int,
        required=True,
        metavar="N",
        help="records to send (required)",
    )
    p.add_argument(
        "--record-size",
        type=_positive_int,
        required=True,
        metavar="BYTES",
        help="size of each record's value (required)",
    )
    p.add_argument(
        "--throughput",
        type=int,
        default=-1,
        metavar="R",
        help="records/s cap; -1: unlimited (default %(default)s)",
    )
    _add_producer_options(p)
    # Hidden: tests shorten Kafka's 5-second report interval.
    p.add_argument("--report-interval-s", type=float, default=5.0, help=argparse.SUPPRESS)
    _add_bootstrap(p)
    _add_format(p, text=_PERF_TEXT, json=_PERF_JSON)
    p.set_defaults(func=cmd_perf_produce)

    p = perf_sub.add_parser(
        "consume",
        help="consume from the beginning and measure",
        description="Read NUM_RECORDS records from the beginning of every partition of TOPIC; print "
        "records/s and MB/s (MB = 2^20 bytes).",
    )
    p.add_argument("topic", help="the topic to read; it must exist")
    p.add_argument(
        "--num-records",
        "-n",
        type=_positive_int,
        required=True,
        metavar="N",
        help="records to read (required)",
    )
    p.add_argument(
        "--timeout-ms",
        type=_positive_int,
        default=10_000,
        help="give up after this long without a record (default %(default)s)",
    )
    _add_bootstrap(p)
    _add_format(p, text=_PERF_TEXT, json=_PERF_JSON)
    p.set_defaults(func=cmd_perf_consume)
    return parser


# ------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> int:
    """Run the ``headwater`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as e:
        _error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``| head``): not an error. Point stdout at devnull so the
        # interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:
        message = _describe_exception(e)
        if message is None:
            raise
        _error(message)
        return EXIT_FAILURE


def _error(message: str) -> None:
    print(f"headwater: error: {message}", file=sys.stderr)


def _describe_exception(e: BaseException) -> str | None:
    """One line for an expected failure (a Headwater error, an RPC failure, bad input); else None."""
    from headwater.config import ConfigError

    if isinstance(e, ConfigError):
        return str(e)
    import grpc

    from headwater.client import HeadwaterError

    if isinstance(e, HeadwaterError):
        text = str(e) or type(e).__name__
        name = _error_code_name(getattr(e, "code", None))
        if name and name not in text:
            text = f"{text} ({name})"
        return text
    if isinstance(e, grpc.RpcError):
        code = e.code() if isinstance(e, grpc.Call) else None
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        return f"{getattr(code, 'name', code)}: {details}"
    if isinstance(e, (TimeoutError, ConnectionError)):
        return str(e) or type(e).__name__
    if isinstance(e, (ValueError, TypeError)) and _raised_by_headwater(e):
        return str(e)
    return None


def _raised_by_headwater(e: BaseException) -> bool:
    """Whether an exception came from Headwater's own validation (not from a bug in this module)."""
    tb = e.__traceback__
    module = None
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        tb = tb.tb_next
    return bool(module) and str(module).startswith("headwater.") and module not in _OWN_MODULES


_OWN_MODULES = (__name__, "headwater._perf")


def _error_code_name(code: Any) -> str | None:
    if code is None:
        return None
    if isinstance(code, str):
        return code
    name = getattr(code, "name", None)
    if isinstance(name, str):
        return name
    try:
        from headwater.v1 import errors_pb2

        full = str(errors_pb2.ErrorCode.Name(int(code)))
    except (ValueError, TypeError, ImportError):
        return None
    return full.removeprefix("ERROR_CODE_")


# ------------------------------------------------------------------ helpers


def _parse_address(raw: str) -> tuple[str, int]:
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not host:
        raise CliError(f"bad address {raw!r}: expected HOST:PORT", EXIT_USAGE)
    try:
        port_n = int(port)
    except ValueError:
        raise CliError(f"bad address {raw!r}: port {port!r} is not a number", EXIT_USAGE) from None
    if not 0 < port_n < 65536:
        raise CliError(f"bad address {raw!r}: port out of range", EXIT_USAGE)
    return host.strip("[]"), port_n


def _check_reachable(bootstrap: str, timeout_s: float = 3.0) -> None:
    """Fail fast, with one clear line, when no bootstrap address accepts a connection."""
    addresses = [a for a in bootstrap.split(",") if a.strip()]
    if not addresses:
        raise CliError("no bootstrap address given", EXIT_USAGE)
    reasons = []
    for raw in addresses:
        host, port = _parse_address(raw)
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return
        except OSError as e:
            reasons.append(f"{raw.strip()} ({e.strerror or e})")
    raise CliError(
        f"cannot reach a Headwater node at {', '.join(reasons)}; start one with 'headwater local up' "
        f"or point --bootstrap / {BOOTSTRAP_ENV} at a running node"
    )


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, separators=(", ", ": ")) + "\n")
    sys.stdout.flush()


def _print_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> None:
    """A rich table on a terminal (headed by ``labels``, default ``columns``); else tab-separated lines
    headed by ``columns``. Only the first column may wrap."""
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    if _stdout_is_tty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for i, c in enumerate(labels or columns):
            table.add_column(c, overflow="fold", no_wrap=i > 0)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        out = ["\t".join(columns)]
        out.extend("\t".join(row) for row in rows)
        sys.stdout.write("\n".join(out) + "\n")
        sys.stdout.flush()


def _ids(values: Iterable[int]) -> str:
    return ",".join(str(v) for v in values)


def _acks_value(raw: str) -> Any:
    return "all" if raw in ("all", "-1") else int(raw)


def _mb(n_bytes: float) -> float:
    return n_bytes / (1024 * 1024)


def _topic_partitions(admin: Any, topic: str) -> list[int]:
    """The partition indexes of a topic, from one Metadata call.

    A topic that does not exist is a ``CliError`` saying how to create it. Commands that produce ask
    this first: the producer itself would wait ``max_block_ms`` (60 s) for the topic to appear, as
    Kafka's does, which a person at a terminal reads as a hang.
    """
    from headwater.client import UnknownTopicOrPartitionError

    try:
        descriptions = admin.describe_topics([topic])
    except UnknownTopicOrPartitionError:
        raise CliError(_no_such_topic(topic)) from None
    for d in descriptions:
        if d.name == topic:
            return sorted(p.partition for p in d.partitions)
    raise CliError(_no_such_topic(topic))


def _no_such_topic(topic: str) -> str:
    return f"topic {topic!r} does not exist; create it with: headwater topic create {topic}"


def _check_topic(bootstrap: str, topic: str) -> list[int]:
    """The partition indexes of ``topic``, asked of the cluster through a short-lived Admin."""
    admin = _admin(bootstrap)
    try:
        return _topic_partitions(admin, topic)
    finally:
        admin.close()


def _admin(bootstrap: str) -> Any:
    _check_reachable(bootstrap)
    from headwater.client import Admin

    return Admin(bootstrap=bootstrap)


# ------------------------------------------------------------------ node


def cmd_node(args: argparse.Namespace) -> int:
    from headwater.config import config_from_args

    config = config_from_args(args)
    from headwater.node.server import serve

    return int(serve(config))


# ------------------------------------------------------------------ topic


def cmd_topic_create(args: argparse.Namespace) -> int:
    from headwater.client import NewTopic

    config = dict(args.config)
    admin = _admin(args.bootstrap)
    try:
        new = NewTopic(
            args.name, partitions=args.partitions, replication_factor=args.replication_factor, config=config
        )
        try:
            _raise_first(admin.create_topics([new]))
        except Exception as e:
            if args.if_not_exists and _error_code_name(getattr(e, "code", None)) in (
                "TOPIC_ALREADY_EXISTS",
                "ERROR_CODE_TOPIC_ALREADY_EXISTS",
            ):
                print(f"Topic {args.name} exists already.")
                return 0
            raise
    finally:
        admin.close()
    print(f"Created topic {args.name}.")
    return 0


def _raise_first(result: Any) -> None:
    """Raise the first failure in an admin call's per-item result, whatever shape it has.

    A call may raise itself, or return ``{name: exception | future | None}``; both report here.
    """
    if isinstance(result, dict):
        for value in result.values():
            if isinstance(value, BaseException):
                raise value
            if hasattr(value, "result") and callable(value.result):
                value.result()


def cmd_topic_list(args: argparse.Namespace) -> int:
    admin = _admin(args.bootstrap)
    try:
        descriptions = sorted(admin.describe_topics(None), key=lambda d: d.name)
    finally:
        admin.close()
    if args.format == "json":
        _print_json(
            [
                {
                    "name": d.name,
                    "topic_id": str(d.topic_id) if d.topic_id else None,
                    "partitions": len(d.partitions),
                    "replication_factor": _replication_factor(d),
                }
                for d in descriptions
            ]
        )
    elif _stdout_is_tty():
        _print_table(
            ["topic", "partitions", "replicas", "topic id"],
            [[d.name, len(d.partitions), _replication_factor(d), d.topic_id or ""] for d in descriptions],
        )
    else:
        for d in descriptions:
            sys.stdout.write(d.name + "\n")
        sys.stdout.flush()
    return 0


def _replication_factor(description: Any) -> int:
    return max((len(p.replicas) for p in description.partitions), default=0)


def cmd_topic_describe(args: argparse.Namespace) -> int:
    admin = _admin(args.bootstrap)
    try:
        descriptions = sorted(admin.describe_topics(args.names or None), key=lambda d: d.name)
        min_isr = _min_insync(admin, descriptions) if args.under_min_isr else {}
        status: dict[tuple[str, int], Any] = {}
        if not args.no_offsets:
            status = {(r.topic, r.partition): r for r in admin.describe_replicas(args.names or None)}
    finally:
        admin.close()
    rows_of = [
        (d, p)
        for d in descriptions
        for p in d.partitions
        if (not args.under_replicated or len(p.isr) < len(p.replicas))
        and (not args.under_min_isr or len(p.isr) < _capped(min_isr[d.name], p))
    ]
    if args.format == "json":
        by_topic: dict[str, list[dict[str, Any]]] = {}
        for d, p in rows_of:
            entry: dict[str, Any] = {
                "partition": p.partition,
                "leader": p.leader,
                "leader_epoch": p.leader_epoch,
                "partition_epoch": p.partition_epoch,
                "replicas": list(p.replicas),
                "isr": list(p.isr),
                "offline_replicas": list(p.offline_replicas),
                "offline": p.offline,
            }
            r = status.get((d.name, p.partition))
            if r is not None:
                entry.update(
                    high_watermark=r.high_watermark,
                    log_start_offset=r.log_start_offset,
                    log_end_offset=r.log_end_offset,
                    replica_status=[
                        {
                            "node_id": x.node_id,
                            "log_end_offset": x.log_end_offset,
                            "lag_records": x.lag_records,
                            "caught_up_ms_ago": x.caught_up_ms_ago,
                            "in_isr": x.in_isr,
                        }
                        for x in r.replicas
                    ],
                )
            by_topic.setdefault(d.name, []).append(entry)
        _print_json(
            [
                {
                    "name": d.name,
                    "topic_id": str(d.topic_id) if d.topic_id else None,
                    "partitions": by_topic.get(d.name, []),
                }
                for d in descriptions
                if d.name in by_topic or not (args.under_replicated or args.under_min_isr)
            ]
        )
        return 0
    columns = ["topic", "partition", "leader", "leader_epoch", "partition_epoch", "replicas", "isr"]
    labels = ["topic", "part", "leader", "leader epoch", "part epoch", "replicas", "isr"]
    columns += ["offline_replicas", "status"]
    labels += ["offline replicas", "status"]
    if not args.no_offsets:
        columns += ["log_start_offset", "high_watermark", "log_end_offset", "replica_lag"]
        labels += ["start", "hw", "end", "lag (node:records)"]
    rows = []
    for d, p in rows_of:
        row: list[Any] = [
            d.name,
            p.partition,
            p.leader if p.leader >= 0 else "none",
            p.leader_epoch,
            p.partition_epoch,
            _ids(p.replicas),
            _ids(p.isr),
            _ids(p.offline_replicas),
            _partition_status(p),
        ]
        if not args.no_offsets:
            r = status.get((d.name, p.partition))
            if r is None:
                row += ["", "", "", ""]
            else:
                lag = ",".join(f"{x.node_id}:{x.lag_records}" for x in r.replicas if x.node_id != r.leader)
                row += [r.log_start_offset, r.high_watermark, r.log_end_offset, lag or "-"]
        rows.append(row)
    _print_table(columns, rows, labels=labels)
    return 0


def _min_insync(admin: Any, descriptions: Sequence[Any]) -> dict[str, tuple[int, bool]]:
    """Each topic's min_insync_replicas and whether the topic sets it (else the node default,
    capped by the replica count, applies)."""
    out: dict[str, tuple[int, bool]] = {}
    for d in descriptions:
        entry = admin.describe_configs(d.name, ["min_insync_replicas"]).get("min_insync_replicas")
        out[d.name] = (int(entry.value), entry.source == "topic") if entry is not None else (1, False)
    return out


def _capped(min_isr: tuple[int, bool], p: Any) -> int:
    value, own = min_isr
    return value if own else min(value, len(p.replicas))


def _partition_status(p: Any) -> str:
    """offline (no leader), under-replicated (fewer in-sync replicas than replicas) or ok."""
    if p.offline:
        return "offline"
    return "under-replicated" if len(p.isr) < len(p.replicas) else "ok"


def cmd_topic_delete(args: argparse.Namespace) -> int:
    admin = _admin(args.bootstrap)
    try:
        _raise_first(admin.delete_topics(list(args.names)))
    finally:
        admin.close()
    for name in args.names:
        print(f"Deleted topic {name}.")
    return 0


def cmd_topic_alter_config(args: argparse.Namespace) -> int:
    changes: dict[str, str | None] = dict(args.set)
    for name in args.delete:
        if name in changes:
            raise CliError(f"config {name} is both set and deleted", EXIT_USAGE)
        changes[name] = None
    if not changes:
        raise CliError("nothing to change: give --set NAME=VALUE and/or --delete NAME", EXIT_USAGE)
    admin = _admin(args.bootstrap)
    try:
        admin.alter_configs(args.name, changes)
    finally:
        admin.close()
    parts = [f"{k}={v}" if v is not None else f"{k} (deleted)" for k, v in changes.items()]
    print(f"Updated config of topic {args.name}: {', '.join(parts)}.")
    return 0


def cmd_topic_describe_config(args: argparse.Namespace) -> int:
    admin = _admin(args.bootstrap)
    try:
        entries = admin.describe_configs(args.name)
    finally:
        admin.close()
    items = sorted(entries.values(), key=lambda e: e.name)
    if args.format == "json":
        _print_json({e.name: {"value": e.value, "source": e.source} for e in items})
    else:
        _print_table(["name", "value", "source"], [[e.name, e.value, e.source] for e in items])
    return 0


# ------------------------------------------------------------------ cluster


def cmd_cluster_describe(args: argparse.Namespace) -> int:
    admin = _admin(args.bootstrap)
    try:
        d = admin.describe_cluster()
        partitions = [p for t in admin.describe_topics(None) for p in t.partitions]
    finally:
        admin.close()
    offline = sum(1 for p in partitions if p.offline)
    under_replicated = sum(1 for p in partitions if not p.offline and len(p.isr) < len(p.replicas))
    if args.format == "json":
        _print_json(
            {
                "cluster_id": d.cluster_id,
                "partitions": len(partitions),
                "under_replicated_partitions": under_replicated,
                "offline_partitions": offline,
                "controller_id": d.controller_id,
                "answered_by": d.answered_by,
                "raft_term": d.raft_term,
                "commit_index": d.commit_index,
                "metadata_offset": d.metadata_offset,
                "voters": {str(k): v for k, v in d.voters.items()},
                "nodes": [
                    {
                        "node_id": n.node_id,
                        "host": n.host,
                        "port": n.port,
                        "rack": n.rack or None,
                        "fenced": n.fenced,
                        "broker_epoch": n.broker_epoch,
                        "voter": n.node_id in d.voters,
                        "controller": n.node_id == d.controller_id,
                    }
                    for n in d.nodes
                ],
            }
        )
        return 0
    _print_table(
        ["node_id", "address", "rack", "state", "broker_epoch", "role"],
        [
            [
                n.node_id,
                n.address,
                n.rack,
                "fenced" if n.fenced else "unfenced",
                n.broker_epoch,
                _node_role(n.node_id, d.controller_id, d.voters),
            ]
            for n in d.nodes
        ],
        title="nodes",
        labels=["id", "address", "rack", "state", "broker epoch", "role"],
    )
    if not _stdout_is_tty():
        sys.stdout.write("\n")
    _print_table(
        ["name", "value"],
        [
            ["cluster_id", d.cluster_id or "unknown"],
            ["controller_id", d.controller_id if d.controller_id >= 0 else "none"],
            ["answered_by", d.answered_by],
            ["raft_term", d.raft_term],
            ["commit_index", d.commit_index],
            ["metadata_offset", d.metadata_offset],
            ["partitions", len(partitions)],
            ["under_replicated_partitions", under_replicated],
            ["offline_partitions", offline],
            ["voters", ",".join(f"{k}={v}" for k, v in d.voters.items())],
        ],
        title="metadata quorum",
    )
    return 0


def _node_role(node_id: int, controller_id: int, voters: dict[int, str]) -> str:
    if node_id == controller_id:
        return "active controller"
    return "voter" if node_id in voters else "broker"


def cmd_cluster_elect_leaders(args: argparse.Namespace) -> int:
    if args.partition is not None and args.topic is None:
        raise CliError("--partition needs --topic", EXIT_USAGE)
    admin = _admin(args.bootstrap)
    try:
        partitions: list[tuple[str, int]] | None = None
        if args.topic is not None:
            indexes = _topic_partitions(admin, args.topic)
            if args.partition is not None:
                if args.partition not in indexes:
                    raise CliError(_no_such_partition(args.topic, args.partition, indexes))
                indexes = [args.partition]
            partitions = [(args.topic, i) for i in indexes]
        results = admin.elect_leaders(partitions, preferred=args.preferred, raise_on_error=False)
    finally:
        admin.close()
    failed = [r for r in results.values() if r.error is not None]
    if args.format == "json":
        _print_json(
            [
                {
                    "topic": r.topic,
                    "partition": r.partition,
                    "leader": r.leader_id,
                    "leader_epoch": r.leader_epoch,
                    "error": None if r.error is None else _error_code_name(r.error.code),
                    "error_message": None if r.error is None else r.error.message,
                }
                for r in results.values()
            ]
        )
    elif not results:
        kind = "a preferred" if args.preferred else "an"
        print(f"No partition needed {kind} election.", file=sys.stderr)
    else:
        _print_table(
            ["topic", "partition", "leader", "leader_epoch", "result"],
            [
                [
                    r.topic,
                    r.partition,
                    r.leader_id if r.leader_id >= 0 else "none",
                    r.leader_epoch,
                    "ok" if r.error is None else _describe_exception(r.error),
                ]
                for r in results.values()
            ],
            labels=["topic", "part", "leader", "epoch", "result"],
        )
    if failed:
        first = _describe_exception(failed[0].error) if failed[0].error is not None else ""
        raise CliError(
            f"{len(failed)} of {len(results)} election(s) failed; "
            f"first: {failed[0].topic}-{failed[0].partition}: {first}"
        )
    return 0


# ------------------------------------------------------------------ produce


def cmd_produce(args: argparse.Namespace) -> int:
    partitions = _check_topic(args.bootstrap, args.topic)
    if args.partition is not None and args.partition not in partitions:
        raise CliError(_no_such_partition(args.topic, args.partition, partitions))

    from headwater.client import Producer

    options: dict[str, Any] = {
        "acks": _acks_value(args.acks),
        "compression": args.compression,
        "linger_ms": args.linger_ms,
        "batch_size_bytes": args.batch_size_bytes,
    }
    separator = args.key_separator.encode() if args.key_separator else None
    last_offsets: dict[int, int] = {}
    failures: list[BaseException] = []
    sent = 0

    def done(future: Any) -> None:
        error = future.exception()
        if error is not None:
            failures.append(error)
            return
        meta = future.result()
        if meta.offset > last_offsets.get(meta.partition, -1):
            last_offsets[meta.partition] = meta.offset
        elif meta.partition not in last_offsets:
            last_offsets[meta.partition] = meta.offset

    producer = Producer(bootstrap=args.bootstrap, **options)
    interrupted = False
    try:
        try:
            for line_no, line in enumerate(sys.stdin.buffer, start=1):
                if line.endswith(b"\n"):
                    line = line[:-1]
                    if line.endswith(b"\r"):
                        line = line[:-1]
                key = None
                if separator is not None:
                    key, sep, value = line.partition(separator)
                    if not sep:
                        raise CliError(
                            f"line {line_no} has no key separator {args.key_separator!r} "
                            f"({sent} records sent before it)"
                        )
                else:
                    value = line
                producer.send(args.topic, value, key=key, partition=args.partition).add_done_callback(done)
                sent += 1
                if failures:
                    break
        except KeyboardInterrupt:
            interrupted = True
        producer.flush()
    finally:
        producer.close()
    summary = ", ".join(f"partition {p} up to offset {o}" for p, o in sorted(last_offsets.items()))
    ok = sent - len(failures)
    print(
        f"Produced {ok} record{'s' if ok != 1 else ''} to {args.topic}"
        + (f": {summary}" if summary else "."),
        file=sys.stderr,
    )
    if failures:
        message = _describe_exception(failures[0]) or repr(failures[0])
        raise CliError(f"{len(failures)} record(s) failed: {message}")
    return EXIT_INTERRUPTED if interrupted else 0


def _no_such_partition(topic: str, partition: int, partitions: list[int]) -> str:
    return f"topic {topic} has no partition {partition} (it has {len(partitions)}: 0..{len(partitions) - 1})"


# ------------------------------------------------------------------ consume


def _parse_timestamp(raw: str) -> int:
    raw = raw.strip()
    if raw.lstrip("-").isdigit():
        ms = int(raw)
    else:
        from datetime import datetime

        try:
            dt = datetime.fromisoformat(raw)
        except ValueError:
            raise CliError(
                f"bad --from-timestamp {raw!r}: give ms since the epoch or ISO 8601 "
                "(e.g. 2024-05-01T12:00:00Z)",
                EXIT_USAGE,
            ) from None
        if dt.tzinfo is None:
            dt = dt.astimezone()  # local time, as a person typing a time means
        ms = int(dt.timestamp() * 1000)
    if ms < 0:
        raise CliError(f"bad --from-timestamp {raw!r}: before 1970", EXIT_USAGE)
    return ms


def _record_json(r: Any, encoding: str) -> str:
    """One record as a JSON line; raises CliError when utf-8 is asked for bytes that are not UTF-8."""

    def text(b: bytes | None, what: str) -> str | None:
        if b is None:
            return None
        if encoding == "base64":
            return base64.b64encode(b).decode("ascii")
        if encoding == "hex":
            return b.hex()
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            # Replacing the bytes would print a record that is not the one stored.
            raise CliError(
                f"the {what} of {r.topic} partition {r.partition} offset {r.offset} is not valid "
                "UTF-8; read it with --encoding base64 (or hex)"
            ) from None

    return json.dumps(
        {
            "topic": r.topic,
            "partition": r.partition,
            "offset": r.offset,
            "timestamp_ms": r.timestamp_ms,
            "encoding": encoding,
            "key": text(r.key, "key"),
            "value": text(r.value, "value"),
            "headers": [[k, text(v, f"header {k!r}")] for k, v in (r.headers or ())],
        },
        ensure_ascii=False,
    )


def cmd_consume(args: argparse.Namespace) -> int:
    start_ms = _parse_timestamp(args.from_timestamp) if args.from_timestamp is not None else None
    partitions = _check_topic(args.bootstrap, args.topic)
    if args.partition is not None:
        if args.partition not in partitions:
            raise CliError(_no_such_partition(args.topic, args.partition, partitions))
        partitions = [args.partition]

    from headwater.client import Consumer, TopicPartition

    tps = [TopicPartition(args.topic, p) for p in partitions]
    consumer = Consumer(bootstrap=args.bootstrap, auto_offset_reset="latest")
    counted = [0]  # records printed, kept up to date even when printing stops half way (``| head``)
    try:
        consumer.assign(tps)
        if args.from_beginning:
            consumer.seek_to_beginning(*tps)
        elif args.offset is not None:
            for tp in tps:
                consumer.seek(tp, args.offset)
        elif start_ms is not None:
            found = consumer.offsets_for_times({tp: start_ms for tp in tps})
            at_end = []
            for tp in tps:
                hit = found.get(tp)
                if hit is None:
                    at_end.append(tp)
                else:
                    consumer.seek(tp, hit.offset)
            if at_end:
                consumer.seek_to_end(*at_end)
        else:
            consumer.seek_to_end(*tps)
        _consume_loop(consumer, args, counted)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
        print(f"Processed a total of {counted[0]} messages", file=sys.stderr)
    return 0


def _consume_loop(consumer: Any, args: argparse.Namespace, counted: list[int]) -> None:
    out = sys.stdout.buffer
    as_json = args.format == "json"
    limit = args.max_messages
    idle_s = args.timeout_ms / 1000 if args.timeout_ms else None
    count = 0
    last_record = time.monotonic()
    while limit is None or count < limit:
        wait_s = 0.5
        if idle_s is not None:
            left = last_record + idle_s - time.monotonic()
            if left <= 0:
                break
            wait_s = min(wait_s, left)
        records = consumer.poll(wait_s)
        if not records:
            continue
        last_record = time.monotonic()
        if limit is not None:
            records = records[: limit - count]
        chunks = []
        try:
            for r in records:
                if as_json:
                    chunks.append(_record_json(r, args.encoding).encode("utf-8") + b"\n")
                else:
                    chunks.append(_record_text(r, args) + b"\n")
        finally:
            # The records before one that cannot be written still are, and are counted.
            out.write(b"".join(chunks))
            out.flush()
            count += len(chunks)
            counted[0] = count


def _record_text(r: Any, args: argparse.Namespace) -> bytes:
    encode = _TEXT_ENCODERS[args.encoding]

    def text(b: bytes | None) -> bytes:
        return b"null" if b is None else encode(b)

    fields = []
    if args.print_timestamp:
        fields.append(str(r.timestamp_ms).encode())
    if args.print_offset:
        fields.append(f"{r.partition}:{r.offset}".encode())
    if args.print_headers:
        headers = [k.encode() + b":" + text(v) for k, v in (r.headers or ())]
        fields.append(b",".join(headers) if headers else b"NO_HEADERS")
    if args.print_key:
        fields.append(text(r.key))
    fields.append(text(r.value))
    return b"\t".join(fields)


# Text output: utf-8 writes the bytes as they are (a terminal or a pipe takes them unchanged).
_TEXT_ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "utf-8": bytes,
    "base64": base64.b64encode,
    "hex": lambda b: b.hex().encode("ascii"),
}


# ------------------------------------------------------------------ local cluster


def cmd_local_up(args: argparse.Namespace) -> int:
    from headwater.launcher import LaunchError, LocalCluster, running_pids

    metrics_base = args.port + 100 if args.metrics_port is None else args.metrics_port
    raft_base = args.port + 200 if args.raft_port is None else args.raft_port
    if max(args.port, metrics_base, raft_base) + args.nodes > 65536:
        raise CliError("ports out of range: choose a lower --port / --metrics-port / --raft-port", EXIT_USAGE)
    cluster = LocalCluster(
        args.data_dir,
        args.nodes,
        port=args.port,
        metrics_port=metrics_base,
        raft_port=raft_base,
        settings={
            "default_replication_factor": str(args.replication_factor),
            "min_insync_replicas": str(args.min_insync_replicas),
        },
    )
    alive = running_pids(cluster.state_path)
    if alive:
        raise CliError(
            f"a local cluster is already running from {cluster.root} (pids {_ids(alive)}); stop it first"
        )
    busy = cluster.busy_ports()
    if busy:
        raise CliError(busy[0])
    from headwater.node.limits import restrict_new_files, secure_data_dir

    restrict_new_files()  # the nodes' logs, local.json and what the nodes write: this user's alone
    cluster.prepare()
    secure_data_dir(cluster.root)

    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop_signal.append(signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in handled}
    nodes = list(cluster.nodes.values())
    all_stopped = False
    try:
        try:
            cluster.start(args.start_timeout_s, lambda: bool(stop_signal))
        except LaunchError as e:
            raise CliError(str(e)) from None
        if not stop_signal:
            cluster.write_state()
            _print_local_banner(cluster.bootstrap, nodes, cluster.root)
        gone: set[int] = set()
        while not stop_signal:
            for n in nodes:
                if n.node_id not in gone and n.exit_code() is not None:
                    # The cluster carries on without it (its partitions move to other replicas).
                    gone.add(n.node_id)
                    print(
                        f"warning: {n.describe_exit()}; the other nodes keep running",
                        file=sys.stderr,
                        flush=True,
                    )
            if len(gone) == len(nodes):
                all_stopped = True
                break
            time.sleep(0.2)
    finally:
        if not all_stopped and stop_signal:
            print("Stopping the local cluster...", file=sys.stderr, flush=True)
        unclean = cluster.stop()
        cluster.remove_state()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if all_stopped:
        raise CliError("every node of the local cluster has stopped")
    if unclean:
        raise CliError("; ".join(n.describe_exit() for n in unclean))
    print("Local cluster stopped.", file=sys.stderr, flush=True)
    return 0


def _print_local_banner(bootstrap: str, nodes: Sequence[Any], data_dir: str) -> None:
    b = "" if bootstrap == DEFAULT_BOOTSTRAP else f" -b {bootstrap}"
    plural = "s" if len(nodes) != 1 else ""
    lines = [
        f"Headwater local cluster: {len(nodes)} node{plural}, data and logs in {data_dir}",
        f"bootstrap: {bootstrap}",
        f"try:  headwater topic create demo --partitions 3{b} && "
        f"printf 'k1:hello\\nk2:world\\n' | headwater produce demo --key-separator :{b}",
        f"      headwater consume demo --from-beginning --print-key --max-messages 2{b}",
        "Ctrl-C stops the cluster.",
    ]
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------ chaos


def cmd_chaos_run(args: argparse.Namespace) -> int:
    # The harness restarts nodes (fork and exec) while its clients' gRPC threads run: gRPC's fork
    # handlers cannot run then, and say so on every restart. Nothing in the child uses gRPC.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from headwater.chaos.nemesis import NEMESES
    from headwater.chaos.runner import RunConfig, run

    nemeses = tuple(n.strip() for n in args.nemesis.split(",") if n.strip())
    unknown = [n for n in nemeses if n not in NEMESES]
    if unknown:
        raise CliError(f"unknown nemesis {unknown[0]!r}: choose from {', '.join(NEMESES)}", EXIT_USAGE)
    if args.time_limit <= 0 or args.rate <= 0:
        raise CliError("--time-limit and --rate must be > 0", EXIT_USAGE)
    cfg = RunConfig(
        nodes=args.nodes,
        time_limit_s=args.time_limit,
        nemeses=nemeses,
        rate=args.rate,
        seed=args.seed,
        out=args.out,
        partitions=args.partitions,
        consumers=args.consumers,
        fault_max_s=max(3.0, args.fault_max_s),
        state=args.state,
        bootstrap=args.bootstrap,
        keep_data=args.keep_data,
    )
    return run(cfg)


def cmd_chaos_check(args: argparse.Namespace) -> int:
    from headwater.chaos.runner import recheck

    return recheck(args.run_dir)


# ------------------------------------------------------------------ perf


def cmd_perf_produce(args: argparse.Namespace) -> int:
    _check_topic(args.bootstrap, args.topic)
    from headwater import _perf

    return _perf.produce(args)


def cmd_perf_consume(args: argparse.Namespace) -> int:
    from headwater import _perf

    return _perf.consume(args)
