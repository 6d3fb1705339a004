"""Every setting of a node, and every topic config, with its default: the one place bounds live.

A node's settings come from three layers, later ones winning: a TOML file, ``HEADWATER_*``
environment variables (``HEADWATER_MAX_MESSAGE_BYTES=2097152``), and command-line flags
(``--max-message-bytes 2097152``). Topic configs are per topic, set at creation or by
``AlterConfigs``; where a topic does not set one, the node's ``log_*`` default applies.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "NodeConfig",
    "ConfigError",
    "load_config",
    "TopicConfigSpec",
    "TOPIC_CONFIGS",
    "validate_topic_configs",
    "normalize_config_name",
    "effective_topic_config",
    "ENV_PREFIX",
    "REQUEST_OVERHEAD_BYTES",
    "TIMESTAMP_TYPES",
    "add_config_flags",
    "config_from_args",
    "SECRET_SETTINGS",
    "read_cluster_secret",
    "write_secret_file",
]

ENV_PREFIX = "HEADWATER_"
# Settings never shown (DescribeConfigs, logs, repr).
SECRET_SETTINGS = frozenset({"cluster_secret"})
# Room a request or answer needs around its record batches (headers, names, offsets).
REQUEST_OVERHEAD_BYTES = 64 * 1024
# Values of message_timestamp_type (Kafka's spelling).
TIMESTAMP_TYPES = ("CreateTime", "LogAppendTime")


class ConfigError(ValueError):
    """A setting is unknown or its value is out of range."""


def _setting(default: Any, doc: str, **options: Any) -> Any:
    """A NodeConfig field and its one-line description (``headwater node --help`` shows it)."""
    return field(default=default, metadata={"doc": doc}, **options)


@dataclass(frozen=True)
class NodeConfig:
    """Settings of one node. Every bound the node enforces has a name and a default here.

    Each field's ``metadata["doc"]`` says what it means; the ``headwater node`` flags show it.
    """

    node_id: int = _setting(1, "this node's id, unique in the cluster")
    host: str = _setting("127.0.0.1", "address clients and peers use; the node binds it")
    port: int = _setting(9192, "client (gRPC) port")
    advertised_host: str = _setting("", "host other nodes' clients are told (empty: host)")
    rack: str = _setting("", "rack of this node, shown by cluster describe")
    data_dir: str = _setting("./data", "where the node's logs (RocksDB) and Raft journal live")
    metrics_port: int = _setting(0, "Prometheus text on http://host:metrics_port/metrics; 0 disables it")
    log_level: str = _setting("INFO", "logging level: DEBUG, INFO, WARNING or ERROR")

    # --- request and record bounds
    max_message_bytes: int = _setting(
        1024 * 1024,
        "largest record batch a producer may send, after compression (Kafka: message.max.bytes)",
    )
    max_request_bytes: int = _setting(64 * 1024 * 1024, "largest gRPC message the node accepts or sends")
    fetch_max_bytes: int = _setting(50 * 1024 * 1024, "most bytes of records in one Fetch answer")
    max_partition_fetch_bytes: int = _setting(
        10 * 1024 * 1024, "most bytes of records of one partition in one Fetch answer"
    )
    fetch_max_wait_ms: int = _setting(30_000, "longest a Fetch may wait (long poll) for records")
    max_fetch_waiters: int = _setting(
        10_000, "parked long-poll fetches across the node (past it, a fetch answers at once)"
    )
    max_produce_requests: int = _setting(
        1_000,
        "Produce requests handled at once (a unary one past it is refused, a ProduceStream waits)",
    )
    max_subscribe_streams: int = _setting(1_000, "concurrent Subscribe streams")
    max_subscribe_streams_per_connection: int = _setting(
        100, "concurrent Subscribe streams of one client connection (its share of max_subscribe_streams)"
    )
    read_buffer_bytes: int = _setting(
        256 * 1024 * 1024,
        "bytes read from the logs that Subscribe streams and Fetch answers may hold together before "
        "they have gone out; past it readers wait their turn",
    )
    read_buffer_bytes_per_connection: int = _setting(
        32 * 1024 * 1024, "one client connection's share of read_buffer_bytes"
    )
    subscribe_max_bytes: int = _setting(
        10 * 1024 * 1024,
        "largest answer of a Subscribe stream (a larger max_bytes is capped to it)",
    )
    subscribe_stall_timeout_ms: int = _setting(
        60_000, "a Subscribe stream whose reader accepts no data for this long is closed"
    )
    max_partitions_per_topic: int = _setting(10_000, "most partitions one topic may have")
    max_topics: int = _setting(100_000, "most topics in the cluster")
    max_partitions: int = _setting(100_000, "most partitions in the cluster, over all topics")
    max_partitions_per_request: int = _setting(
        10_000, "most partitions one CreateTopics request may create, over all its topics"
    )
    default_num_partitions: int = _setting(1, "partitions of a topic created without a count")
    default_replication_factor: int = _setting(
        1, "replicas of a topic created without a factor (capped by the number of registered nodes)"
    )
    min_insync_replicas: int = _setting(
        1,
        "default in-sync replicas an acks=all write needs (a topic may set its own); capped by the "
        "partition's replica count where the topic does not set it",
    )
    replica_lag_time_max_ms: int = _setting(
        10_000,
        "a follower that has not caught up to its leader's log end for this long leaves the ISR",
    )
    replica_fetch_wait_max_ms: int = _setting(
        500, "longest a follower's fetch waits (long poll) at its leader for new records"
    )
    replica_fetch_max_bytes: int = _setting(
        8 * 1024 * 1024, "most bytes of records a follower asks for in one fetch from a leader"
    )
    max_decompressed_bytes: int = _setting(
        64 * 1024 * 1024,
        "largest records payload a batch may inflate to when the node checks or decodes it; also the "
        "most that all the batches of one Produce request may inflate to together",
    )
    max_batch_records: int = _setting(
        131_072, "most records one batch may hold (RECORD_TOO_LARGE above it; the producer splits it)"
    )

    # --- log defaults, used where a topic does not set its own
    log_retention_ms: int = _setting(
        7 * 24 * 3600 * 1000, "default age after which records are deleted (-1: no limit)"
    )
    log_retention_bytes: int = _setting(
        -1, "default size of a partition above which old records go (-1: none)"
    )
    retention_check_interval_ms: int = _setting(5_000, "how often the retention task runs")
    log_flush_policy: str = _setting(
        "none",
        "none: the OS flushes (Kafka's default; safety comes from replication); "
        "fsync: sync every write before it is acknowledged",
    )
    log_message_timestamp_type: str = _setting(
        "CreateTime",
        "whose clock stamps records: CreateTime (the producer's) or LogAppendTime (the leader's)",
    )
    log_message_timestamp_before_max_ms: int = _setting(
        -1,
        "under CreateTime, how far (ms) a record's timestamp may lie before the leader's clock (-1: no "
        "bound; a timestamp <= 0 is always refused)",
    )
    log_message_timestamp_after_max_ms: int = _setting(
        3_600_000,
        "under CreateTime, how far (ms) a record's timestamp may lie after the leader's clock (-1: no bound)",
    )

    # --- connections (see "Limits and hardening" in the README)
    handshake_timeout_ms: int = _setting(
        5_000, "a client connection must send the HTTP/2 preface and settings within this, or is closed"
    )
    keepalive_time_ms: int = _setting(
        30_000, "a connection quiet this long is pinged (closed when the ping goes unanswered)"
    )
    keepalive_timeout_ms: int = _setting(10_000, "how long a keepalive ping may go unanswered")
    max_connection_idle_ms: int = _setting(
        300_000, "a connection with no call for this long is told to go away (clients reconnect)"
    )
    max_connections: int = _setting(
        0, "client connections at once (0: the descriptor limit less a reserve); past it one is closed"
    )
    metrics_max_connections: int = _setting(32, "metrics connections served at once")
    metrics_timeout_ms: int = _setting(
        5_000, "time a metrics connection has to send its request and take the answer"
    )
    log_repeat_interval_ms: int = _setting(
        10_000, "a warning a flood can cause is logged once per this interval and kind, with a count"
    )

    # --- shutdown
    shutdown_grace_s: float = _setting(
        10.0, "how long a stopping node waits to hand over its leaderships, then lets requests finish"
    )

    # --- the metadata quorum (see raft/ and node/cluster.py)
    voters: str = _setting(
        "",
        "Raft voters, 1@host:port,2@host:port,3@host:port (Raft addresses; the same on every node); "
        "empty: this node alone is the quorum, on host:raft_port",
    )
    raft_port: int = _setting(0, "Raft port of a node that is the quorum alone; 0 picks a free port at start")
    controller_addresses: str = _setting(
        "",
        "client (gRPC) host:port of the voters, comma separated: how a node finds the active "
        "controller; a node that is not a voter needs it",
    )
    # Required with several voters. A flag shows in the process list, so the file or the
    # environment variable is preferred; a lone node without one generates it in its data dir.
    cluster_secret: str = _setting(
        "",
        "the secret that authenticates and encrypts Raft traffic; prefer cluster_secret_file or "
        "the environment: other users can read a flag in the process list",
        repr=False,
    )
    cluster_secret_file: str = _setting(
        "", "file holding the cluster secret, readable by the node's user alone"
    )
    cluster_id: str = _setting("", "cluster id shown by Metadata (empty: derived from the voters)")
    # The active controller fences a node that misses heartbeats for session_timeout_ms.
    heartbeat_interval_ms: int = _setting(500, "how often a node renews its lease with the active controller")
    session_timeout_ms: int = _setting(3_000, "a node that has not renewed its lease for this long is fenced")
    controller_call_timeout_ms: int = _setting(
        5_000,
        "longest one call to the active controller waits for its answer before it is sent again "
        "(a forwarded topic change is resent with its request id, so it is applied once)",
    )

    def advertised(self) -> tuple[str, int]:
        return (self.advertised_host or self.host, self.port)


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}


def _coerce(name: str, raw: Any) -> Any:
    f = _FIELDS[name]
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            return str(raw).lower() in ("1", "true", "yes", "on")
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name}: {raw!r} is not a valid {kind}") from None


def _validate(cfg: NodeConfig) -> NodeConfig:
    positive = [
        "max_message_bytes",
        "max_request_bytes",
        "fetch_max_bytes",
        "max_partition_fetch_bytes",
        "max_fetch_waiters",
        "max_produce_requests",
        "max_subscribe_streams",
        "max_subscribe_streams_per_connection",
        "read_buffer_bytes",
        "read_buffer_bytes_per_connection",
        "subscribe_stall_timeout_ms",
        "subscribe_max_bytes",
        "max_partitions_per_topic",
        "max_topics",
        "max_partitions",
        "max_partitions_per_request",
        "controller_call_timeout_ms",
        "default_num_partitions",
        "default_replication_factor",
        "min_insync_replicas",
        "replica_lag_time_max_ms",
        "replica_fetch_wait_max_ms",
        "replica_fetch_max_bytes",
        "max_decompressed_bytes",
        "max_batch_records",
        "retention_check_interval_ms",
        "heartbeat_interval_ms",
        "handshake_timeout_ms",
        "keepalive_time_ms",
        "keepalive_timeout_ms",
        "max_connection_idle_ms",
        "metrics_max_connections",
        "metrics_timeout_ms",
    ]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"setting {name} must be > 0, got {getattr(cfg, name)}")
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"setting port must be in 1..65535, got {cfg.port}")
    if not 0 <= cfg.metrics_port < 65536:
        raise ConfigError(f"setting metrics_port must be in 0..65535, got {cfg.metrics_port}")
    if cfg.max_message_bytes + REQUEST_OVERHEAD_BYTES > cfg.max_request_bytes:
        raise ConfigError("max_request_bytes must exceed max_message_bytes by at least 64 KiB")
    # A fetch answer holds up to fetch_max_bytes, plus at most one batch past it (so a consumer
    # always progresses), and must still fit in one gRPC message.
    if cfg.fetch_max_bytes + cfg.max_message_bytes + REQUEST_OVERHEAD_BYTES > cfg.max_request_bytes:
        raise ConfigError(
            "max_request_bytes must exceed fetch_max_bytes + max_message_bytes by at least 64 KiB"
        )
    if cfg.read_buffer_bytes_per_connection > cfg.read_buffer_bytes:
        raise ConfigError("read_buffer_bytes_per_connection must not exceed read_buffer_bytes")
    if cfg.read_buffer_bytes_per_connection < cfg.max_message_bytes:
        raise ConfigError("read_buffer_bytes_per_connection must be at least max_message_bytes")
    if cfg.max_subscribe_streams_per_connection > cfg.max_subscribe_streams:
        raise ConfigError("max_subscribe_streams_per_connection must not exceed max_subscribe_streams")
    if cfg.log_flush_policy not in ("none", "fsync"):
        raise ConfigError(f"setting log_flush_policy must be none or fsync, got {cfg.log_flush_policy!r}")
    if cfg.log_message_timestamp_type not in TIMESTAMP_TYPES:
        raise ConfigError(
            f"setting log_message_timestamp_type must be {' or '.join(TIMESTAMP_TYPES)}, "
            f"got {cfg.log_message_timestamp_type!r}"
        )
    for name in ("log_message_timestamp_before_max_ms", "log_message_timestamp_after_max_ms"):
        if getattr(cfg, name) < -1:
            raise ConfigError(f"setting {name} must be -1 (no bound) or >= 0, got {getattr(cfg, name)}")
    if cfg.session_timeout_ms <= cfg.heartbeat_interval_ms:
        raise ConfigError("setting session_timeout_ms must be larger than heartbeat_interval_ms")
    if not 0 <= cfg.raft_port < 65536:
        raise ConfigError(f"setting raft_port must be in 0..65535, got {cfg.raft_port}")
    if cfg.voters:
        from headwater.raft.quorum import parse_voters  # here: the quorum module imports this one

        try:
            voters = parse_voters(cfg.voters)
        except ValueError as e:
            raise ConfigError(f"setting voters: {e}") from None
        if len(voters) > 1 and not (cfg.cluster_secret or cfg.cluster_secret_file):
            raise ConfigError(
                "several voters need a cluster secret: set cluster_secret_file or HEADWATER_CLUSTER_SECRET"
            )
    if cfg.max_connections < 0:
        raise ConfigError(f"setting max_connections must be >= 0, got {cfg.max_connections}")
    if cfg.log_repeat_interval_ms < 0:
        raise ConfigError(f"setting log_repeat_interval_ms must be >= 0, got {cfg.log_repeat_interval_ms}")
    if cfg.fetch_max_wait_ms < 0:
        raise ConfigError("setting fetch_max_wait_ms must be >= 0")
    return cfg


def read_cluster_secret(cfg: NodeConfig) -> str:
    """The cluster secret from ``cluster_secret`` or ``cluster_secret_file`` ("" when neither is set).

    The message of an error names the file, never its content."""
    if cfg.cluster_secret:
        return cfg.cluster_secret
    if not cfg.cluster_secret_file:
        return ""
    try:
        with open(cfg.cluster_secret_file, encoding="utf-8") as fh:
            secret = fh.read().strip()
    except OSError as e:
        raise ConfigError(
            f"cannot read cluster_secret_file {cfg.cluster_secret_file}: {e.strerror}"
        ) from None
    if not secret:
        raise ConfigError(f"cluster_secret_file {cfg.cluster_secret_file} is empty")
    return secret


def write_secret_file(path: str) -> str:
    """Write a new random cluster secret to ``path``, readable by its owner alone; returns it."""
    import secrets

    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
    return secret


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """File, then ``HEADWATER_*`` environment, then explicit overrides (flags); later wins."""
    values: dict[str, Any] = {}
    if path:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        node_section = data.get("node", data)
        for key, raw in node_section.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[name] = _coerce(name, raw)
    env = os.environ if env is None else env
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in _FIELDS:
            values[name] = _coerce(name, raw)
    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        name = name.replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _coerce(name, raw)
    return _validate(NodeConfig(**values))


# ------------------------------------------------------------------ topic configs


@dataclass(frozen=True)
class TopicConfigSpec:
    """One topic config: its parser, which also validates, and where its default comes from."""

    name: str
    parse: Callable[[str], Any]
    # Name of the NodeConfig field that gives the default, or the literal default.
    node_default: str = ""
    default: Any = None
    doc: str = ""
    aliases: tuple[str, ...] = field(default=())


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            v = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{raw!r} is not an integer") from None
        if v < lo:
            raise ConfigError(f"{v} is below the minimum {lo}")
        return v

    return parse


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ConfigError(f"{raw!r} is not one of {', '.join(choices)}")
        return raw

    return parse


TOPIC_CONFIGS: dict[str, TopicConfigSpec] = {
    s.name: s
    for s in [
        TopicConfigSpec(
            "retention_ms",
            _int_at_least(-1),
            node_default="log_retention_ms",
            doc="Delete batches older than this; -1 keeps them forever.",
        ),
        TopicConfigSpec(
            "retention_bytes",
            _int_at_least(-1),
            node_default="log_retention_bytes",
            doc="Delete the oldest batches while a partition is larger; -1: no limit.",
        ),
        TopicConfigSpec(
            "max_message_bytes",
            _int_at_least(1),
            node_default="max_message_bytes",
            doc="Largest batch a producer may send to this topic.",
        ),
        # Only "delete" for now: log compaction is not built yet, and no topic may claim it.
        TopicConfigSpec(
            "cleanup_policy",
            _one_of("delete"),
            default="delete",
            doc="delete: retention by time and size.",
        ),
        TopicConfigSpec(
            "min_insync_replicas",
            _int_at_least(1),
            node_default="min_insync_replicas",
            doc="acks=all writes are refused with fewer in-sync replicas.",
        ),
        TopicConfigSpec(
            "flush_policy",
            _one_of("none", "fsync"),
            node_default="log_flush_policy",
            doc="fsync: sync each write to disk before acknowledging it.",
        ),
        TopicConfigSpec(
            "message_timestamp_type",
            _one_of(*TIMESTAMP_TYPES),
            node_default="log_message_timestamp_type",
            doc="Whose clock stamps records: CreateTime (the producer's) or LogAppendTime (the leader's).",
        ),
        TopicConfigSpec(
            "message_timestamp_before_max_ms",
            _int_at_least(-1),
            node_default="log_message_timestamp_before_max_ms",
            doc="CreateTime: refuse a record timestamp more than this before the leader's clock; "
            "-1: no bound. Timestamps <= 0 are always refused.",
        ),
        TopicConfigSpec(
            "message_timestamp_after_max_ms",
            _int_at_least(-1),
            node_default="log_message_timestamp_after_max_ms",
            doc="CreateTime: refuse a record timestamp more than this after the leader's clock; "
            "-1: no bound.",
        ),
        TopicConfigSpec(
            "unclean_leader_election_enable",
            _one_of("true", "false"),
            default="false",
            doc="Allow an out-of-sync replica to become leader (may lose data).",
        ),
    ]
}


def normalize_config_name(name: str) -> str:
    """Accept Kafka's dotted spelling (``retention.ms``) as well as ``retention_ms``."""
    return name.strip().replace(".", "_").replace("-", "_")


def validate_topic_configs(configs: Mapping[str, str]) -> dict[str, str]:
    """Normalised, validated copy of a topic's configs; raises ConfigError naming the bad one."""
    out: dict[str, str] = {}
    for raw_name, raw_value in configs.items():
        name = normalize_config_name(raw_name)
        spec = TOPIC_CONFIGS.get(name)
        if spec is None:
            raise ConfigError(f"unknown topic config {raw_name!r}")
        try:
            spec.parse(str(raw_value))
        except ConfigError as e:
            raise ConfigError(f"topic config {name}: {e}") from None
        out[name] = str(raw_value)
    return out


def effective_topic_config(topic_configs: Mapping[str, str], node: NodeConfig) -> dict[str, Any]:
    """Every topic config, parsed: the topic's own value where set, else the node's default."""
    out: dict[str, Any] = {}
    for name, spec in TOPIC_CONFIGS.items():
        if name in topic_configs:
            out[name] = spec.parse(topic_configs[name])
        elif spec.node_default:
            out[name] = getattr(node, spec.node_default)
        else:
            out[name] = spec.default
    return out


# ------------------------------------------------------------------ command-line flags


def add_config_flags(parser: Any) -> None:
    """Add ``--config FILE`` and one flag per NodeConfig field (``--max-message-bytes``) to argparse."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file of node settings; flags and the environment win over it"
    )
    for f in dataclasses.fields(NodeConfig):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        doc = str(f.metadata["doc"]).replace("%", "%%")  # argparse formats help with %
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=kind.upper(),
            help=f"{doc} (default {f.default!r}; env {ENV_PREFIX}{f.name.upper()})",
        )


def config_from_args(args: Any, env: Mapping[str, str] | None = None) -> NodeConfig:
    """NodeConfig from parsed flags (those given win), the environment and the ``--config`` file."""
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(NodeConfig)}
    return load_config(getattr(args, "config", None), env, overrides)
