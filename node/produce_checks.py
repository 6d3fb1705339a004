"""What a leader checks in a producer's batch before it stores any batch of a request.

A pure core: a batch, the rules of its topic and the leader's clock in; an error code and a message
out. No I/O, no clock read here (the broker passes ``now_ms``). The rules are the contract's, written
in ``records.proto``: sizes, CRC and header, records that agree with the header, producer-id fields
(ids are allocated from 1; 0 and -1 mean none), and the timestamps of a CreateTime topic (> 0, and
within ``message_timestamp_before_max_ms`` / ``message_timestamp_after_max_ms`` of the leader's
clock, Kafka's KIP-937). A refused batch is never stored, and the message says which rule and which
value refused it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from headwater.v1 import batch as batch_codec
from headwater.v1 import errors_pb2, records_pb2

__all__ = [
    "ProduceRules",
    "check_batch",
    "check_header",
    "check_payload",
    "producer_id_problem",
    "timestamp_problem",
]

E = errors_pb2
_OK: tuple[errors_pb2.ErrorCode, str] = (E.ERROR_CODE_NONE, "")
# The values a batch without a producer id may carry in producer_id, producer_epoch and base_sequence:
# -1 as the contract says, and 0, proto3's default, what a caller that leaves them out sends.
_NONE_VALUES = (0, -1)


@dataclass(frozen=True, slots=True)
class ProduceRules:
    """The bounds one topic puts on a producer's batches (from its effective config)."""

    max_message_bytes: int
    max_decompressed_bytes: int
    # Most records one batch may hold (the node's max_batch_records).
    max_batch_records: int = 1 << 31
    # LogAppendTime: the leader stamps the batch with its clock; the producer's timestamps are not checked.
    log_append_time: bool = False
    # CreateTime bounds, in ms around the leader's clock; -1: no bound.
    timestamp_before_max_ms: int = -1
    timestamp_after_max_ms: int = -1

    @classmethod
    def of_topic(
        cls, topic_config: Mapping[str, Any], max_decompressed_bytes: int, max_batch_records: int = 1 << 31
    ) -> ProduceRules:
        """The rules of a topic's effective config (``headwater.config.effective_topic_config``)."""
        return cls(
            max_message_bytes=topic_config["max_message_bytes"],
            max_decompressed_bytes=max_decompressed_bytes,
            max_batch_records=max_batch_records,
            log_append_time=topic_config["message_timestamp_type"] == "LogAppendTime",
            timestamp_before_max_ms=topic_config["message_timestamp_before_max_ms"],
            timestamp_after_max_ms=topic_config["message_timestamp_after_max_ms"],
        )


def producer_id_problem(producer_id: int, producer_epoch: int, base_sequence: int) -> str:
    """Why a batch's producer fields break the contract, naming the value expected, or ""
    (records.proto, Producer ids)."""
    if producer_id < -1:
        return f"producer_id is {producer_id}, expected >= 1 (an allocated id), or 0 or -1 for none"
    if not batch_codec.has_producer_id(producer_id):
        for name, value in (("producer_epoch", producer_epoch), ("base_sequence", base_sequence)):
            if value not in _NONE_VALUES:
                return (
                    f"{name} is {value}, expected 0 or -1 without a producer id "
                    f"(producer_id is {producer_id})"
                )
        return ""
    for name, value in (("producer_epoch", producer_epoch), ("base_sequence", base_sequence)):
        if value < 0:
            return f"{name} is {value}, expected >= 0 with producer_id {producer_id}"
    return ""


def timestamp_problem(min_timestamp_ms: int, max_timestamp_ms: int, now_ms: int, rules: ProduceRules) -> str:
    """Why a CreateTime batch's record timestamps are refused, or "" (records.proto, Timestamps).

    ``min_timestamp_ms`` and ``max_timestamp_ms`` are the smallest and largest record timestamps of
    the batch; ``now_ms`` is the leader's clock.
    """
    if rules.log_append_time:
        return ""  # the leader's clock replaces them
    if min_timestamp_ms <= 0:
        return (
            f"record timestamp {min_timestamp_ms} is not a time, expected > 0 (ms since the Unix epoch): "
            "with message_timestamp_type=CreateTime every record needs its create time, "
            "first_timestamp_ms + timestamp_delta_ms (a producer that leaves first_timestamp_ms unset "
            "sends 0, which time-based retention would delete at once)"
        )
    before = rules.timestamp_before_max_ms
    if before >= 0 and now_ms - min_timestamp_ms > before:
        return (
            f"record timestamp {min_timestamp_ms} is {now_ms - min_timestamp_ms} ms before the leader's "
            f"clock ({now_ms}), expected at most message_timestamp_before_max_ms={before} ms before it"
        )
    after = rules.timestamp_after_max_ms
    if after >= 0 and max_timestamp_ms - now_ms > after:
        return (
            f"record timestamp {max_timestamp_ms} is {max_timestamp_ms - now_ms} ms after the leader's "
            f"clock ({now_ms}), expected at most message_timestamp_after_max_ms={after} ms after it"
        )
    return ""


def check_batch(
    batch: records_pb2.RecordBatch, rules: ProduceRules, now_ms: int
) -> tuple[errors_pb2.ErrorCode, str]:
    """``(ERROR_CODE_NONE, "")`` when the leader may store ``batch``, else the code and message that
    refuse it: ``check_header``, then ``check_payload``."""
    records = batch.records  # read once: each read of the field copies it
    code, why = check_header(batch, rules, records)
    if code != E.ERROR_CODE_NONE:
        return code, why
    code, why, _ = check_payload(batch, rules, now_ms, rules.max_decompressed_bytes, records)
    return code, why


def check_header(
    batch: records_pb2.RecordBatch, rules: ProduceRules, records: bytes | None = None
) -> tuple[errors_pb2.ErrorCode, str]:
    """The cheap checks, in time independent of what the payload inflates to: size, record count,
    header, CRC, timestamp type, producer fields. ``records`` as for ``batch_crc``."""
    size = batch.ByteSize()
    if size > rules.max_message_bytes:
        return (
            E.ERROR_CODE_RECORD_TOO_LARGE,
            f"batch is {size} bytes, expected at most max_message_bytes={rules.max_message_bytes} (the "
            "serialized RecordBatch, records compressed); nothing was stored",
        )
    count = batch.record_count
    if count > rules.max_batch_records:
        return (
            E.ERROR_CODE_RECORD_TOO_LARGE,
            f"record_count is {count}, expected at most max_batch_records={rules.max_batch_records}; "
            "nothing was stored: split the batch",
        )
    if count < 1:
        return (
            E.ERROR_CODE_CORRUPT_MESSAGE,
            f"record_count is {count}, expected at least 1 (a batch holds at least one record); "
            "nothing was stored",
        )
    if batch.last_offset_delta != count - 1:
        return (
            E.ERROR_CODE_CORRUPT_MESSAGE,
            f"last_offset_delta is {batch.last_offset_delta}, expected {count - 1} (record_count - 1); "
            "nothing was stored",
        )
    problem = batch_codec.crc_problem(batch, records)
    if problem:
        return E.ERROR_CODE_CORRUPT_MESSAGE, f"{problem}; nothing was stored"
    if batch.timestamp_type != batch_codec.CREATE_TIME:
        return (
            E.ERROR_CODE_INVALID_TIMESTAMP,
            f"timestamp_type is {batch.timestamp_type}, expected 0 (TIMESTAMP_TYPE_CREATE_TIME): the "
            "leader sets it, whatever the topic's message_timestamp_type; nothing was stored",
        )
    problem = producer_id_problem(batch.producer_id, batch.producer_epoch, batch.base_sequence)
    if problem:
        return E.ERROR_CODE_INVALID_REQUEST, f"{problem}; nothing was stored"
    return _OK


def check_payload(
    batch: records_pb2.RecordBatch,
    rules: ProduceRules,
    now_ms: int,
    max_inflated: int,
    records: bytes | None = None,
) -> tuple[errors_pb2.ErrorCode, str, int]:
    """The records against their header, then their timestamps; with the bytes the payload
    inflated to (``max_inflated + 1`` past ``max_inflated``). Run after ``check_header``: its cost
    is bounded by ``max_inflated`` and the header's record count."""
    # The leader stores what consumers will decode: records that disagree with their header (or a
    # payload that inflates past the bound) are refused, never stored.
    problem, inflated, min_timestamp_ms = batch_codec.check_records(batch, max_inflated, records)
    if problem:
        return E.ERROR_CODE_CORRUPT_MESSAGE, f"{problem}; nothing was stored", inflated
    problem = timestamp_problem(min_timestamp_ms, batch.max_timestamp_ms, now_ms, rules)
    if problem:
        return E.ERROR_CODE_INVALID_TIMESTAMP, f"{problem}; nothing was stored", inflated
    return E.ERROR_CODE_NONE, "", inflated
