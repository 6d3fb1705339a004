"""The client's exceptions: one tree rooted at ``HeadwaterError``.

Every exception carries the proto ``ErrorCode`` it stands for (``code``) and whether retrying the
same request can succeed (``retriable``). The producer retries retriable errors by itself until
``delivery_timeout_ms``; the consumer retries them in the background; what reaches the caller is
final for that request. ::

    HeadwaterError(message, code, retriable)
    +-- HeadwaterTimeoutError             a client-side wait ran out (retriable)
    |   +-- RequestTimedOutError          the node's timeout, or a gRPC deadline (REQUEST_TIMED_OUT)
    |   +-- BufferFullError               ``Producer.send`` found no room in ``buffer_memory_bytes``
    +-- NodeNotAvailableError             the node cannot be reached: gRPC UNAVAILABLE (retriable)
    +-- InvalidRequestError               a malformed request: gRPC INVALID_ARGUMENT (not retriable)
    +-- ClientClosedError                 the producer, consumer or admin client was closed
    +-- NoOffsetForPartitionError         no position and ``auto_offset_reset="none"``
    +-- one subclass per ``ErrorCode``: UnknownTopicOrPartitionError, NotLeaderOrFollowerError,
        LeaderNotAvailableError, OffsetOutOfRangeError, RecordTooLargeError, CorruptMessageError,
        TopicAlreadyExistsError, InvalidTopicError, InvalidPartitionsError, InvalidConfigError,
        NotEnoughReplicasError, StorageError, FencedLeaderEpochError, ... (see ``ERROR_BY_CODE``)

Retriable codes follow Kafka's ``RetriableException`` subclasses, with one deviation: a
``CORRUPT_MESSAGE`` is final, since gRPC's transport already checks the bytes in flight.
``error_for_code`` turns a response's code into an exception; ``error_for_rpc`` does the same for
a ``grpc.RpcError`` that failed a whole request.
"""

from __future__ import annotations

import grpc

from headwater.v1 import errors_pb2 as _codes

__all__ = [
    "HeadwaterError",
    "HeadwaterTimeoutError",
    "BufferFullError",
    "ClientClosedError",
    "NoOffsetForPartitionError",
    "UnknownServerError",
    "OffsetOutOfRangeError",
    "CorruptMessageError",
    "UnknownTopicOrPartitionError",
    "InvalidFetchSizeError",
    "LeaderNotAvailableError",
    "NotLeaderOrFollowerError",
    "RequestTimedOutError",
    "NodeNotAvailableError",
    "ReplicaNotAvailableError",
    "RecordTooLargeError",
    "RecordListTooLargeError",
    "InvalidTopicError",
    "NotEnoughReplicasError",
    "NotEnoughReplicasAfterAppendError",
    "InvalidRequiredAcksError",
    "InvalidTimestampError",
    "TopicAlreadyExistsError",
    "InvalidPartitionsError",
    "InvalidReplicationFactorError",
    "InvalidReplicaAssignmentError",
    "InvalidConfigError",
    "NotControllerError",
    "InvalidRequestError",
    "PolicyViolationError",
    "OutOfOrderSequenceError",
    "DuplicateSequenceError",
    "InvalidProducerEpochError",
    "UnknownProducerIdError",
    "StorageError",
    "FencedLeaderEpochError",
    "UnknownLeaderEpochError",
    "StaleBrokerEpochError",
    "OffsetNotAvailableError",
    "UnknownTopicIdError",
    "InconsistentTopicIdError",
    "InvalidUpdateVersionError",
    "IneligibleReplicaError",
    "CoordinatorNotAvailableError",
    "NotCoordinatorError",
    "CoordinatorLoadInProgressError",
    "GroupIdNotFoundError",
    "UnknownMemberIdError",
    "FencedMemberEpochError",
    "UnreleasedInstanceIdError",
    "GroupMaxSizeReachedError",
    "UnstableOffsetCommitError",
    "ThrottlingQuotaExceededError",
    "ResourceNotFoundError",
    "ERROR_BY_CODE",
    "RETRIABLE_CODES",
    "error_for_code",
    "error_for_rpc",
]


class HeadwaterError(Exception):
    """Base of every client error: ``code`` is the proto ErrorCode, ``retriable`` says if a retry can help.

    Subclasses fix ``code`` and ``retriable`` as class attributes; the constructor may override them.
    """

    code: int = _codes.ERROR_CODE_UNKNOWN_SERVER_ERROR
    retriable: bool = False

    def __init__(self, message: str = "", code: int | None = None, retriable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retriable is not None:
            self.retriable = retriable

    @property
    def code_name(self) -> str:
        """The ErrorCode's proto name without its prefix, e.g. ``NOT_LEADER_OR_FOLLOWER``."""
        try:
            return str(_codes.ErrorCode.Name(self.code)).removeprefix("ERROR_CODE_")
        except ValueError:
            return str(self.code)

    def __str__(self) -> str:
        return f"[{self.code_name}] {self.message}" if self.message else f"[{self.code_name}]"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code}, retriable={self.retriable})"


class HeadwaterTimeoutError(HeadwaterError):
    """A client-side wait ran out: metadata, a flush, a delivery timeout, a blocked send."""

    code = _codes.ERROR_CODE_REQUEST_TIMED_OUT
    retriable = True


class BufferFullError(HeadwaterTimeoutError):
    """``send`` found no room in ``buffer_memory_bytes`` (at once, or within ``max_block_ms``)."""


class ClientClosedError(HeadwaterError):
    """The producer, consumer or admin client was closed before the operation could finish."""

    retriable = False


class UnknownServerError(HeadwaterError):
    """The node failed in a way it could not classify."""

    code = _codes.ERROR_CODE_UNKNOWN_SERVER_ERROR
    retriable = False


class OffsetOutOfRangeError(HeadwaterError):
    """The fetch offset is below the log start or past the log end."""

    code = _codes.ERROR_CODE_OFFSET_OUT_OF_RANGE
    retriable = False


class CorruptMessageError(HeadwaterError):
    """A batch failed its CRC or could not be decoded. Not retried: gRPC runs over a checked transport,
    so resending the same bytes cannot help."""

    code = _codes.ERROR_CODE_CORRUPT_MESSAGE
    retriable = False


class UnknownTopicOrPartitionError(HeadwaterError):
    """The topic or partition does not exist (yet, or on this node)."""

    code = _codes.ERROR_CODE_UNKNOWN_TOPIC_OR_PARTITION
    retriable = True


class InvalidFetchSizeError(HeadwaterError):
    """A fetch asked for a negative or zero size."""

    code = _codes.ERROR_CODE_INVALID_FETCH_SIZE
    retriable = False


class LeaderNotAvailableError(HeadwaterError):
    """The partition has no leader right now (an election is under way)."""

    code = _codes.ERROR_CODE_LEADER_NOT_AVAILABLE
    retriable = True


class NotLeaderOrFollowerError(HeadwaterError):
    """The node is not the partition's leader: the client's metadata is stale."""

    code = _codes.ERROR_CODE_NOT_LEADER_OR_FOLLOWER
    retriable = True


class RequestTimedOutError(HeadwaterTimeoutError):
    """The request did not complete in time (on the node, or as a gRPC deadline)."""

    code = _codes.ERROR_CODE_REQUEST_TIMED_OUT
    retriable = True


class NodeNotAvailableError(HeadwaterError):
    """The node cannot be reached (gRPC UNAVAILABLE) or is not serving."""

    code = _codes.ERROR_CODE_NODE_NOT_AVAILABLE
    retriable = True


class ReplicaNotAvailableError(HeadwaterError):
    """A replica the request needs is not available."""

    code = _codes.ERROR_CODE_REPLICA_NOT_AVAILABLE
    retriable = True


class RecordTooLargeError(HeadwaterError):
    """A record or batch is larger than the topic or client allows."""

    code = _codes.ERROR_CODE_RECORD_TOO_LARGE
    retriable = False


class RecordListTooLargeError(HeadwaterError):
    """A request holds more record bytes than the node accepts."""

    code = _codes.ERROR_CODE_RECORD_LIST_TOO_LARGE
    retriable = False


class InvalidTopicError(HeadwaterError):
    """The topic name breaks the naming rules, or the topic cannot be used this way."""

    code = _codes.ERROR_CODE_INVALID_TOPIC
    retriable = False


class NotEnoughReplicasError(HeadwaterError):
    """Fewer in-sync replicas than min_insync_replicas: nothing was appended."""

    code = _codes.ERROR_CODE_NOT_ENOUGH_REPLICAS
    retriable = True


class NotEnoughReplicasAfterAppendError(HeadwaterError):
    """Appended on the leader, but the in-sync set shrank before enough replicas had it."""

    code = _codes.ERROR_CODE_NOT_ENOUGH_REPLICAS_AFTER_APPEND
    retriable = True


class InvalidRequiredAcksError(HeadwaterError):
    """acks is not 0, 1 or -1."""

    code = _codes.ERROR_CODE_INVALID_REQUIRED_ACKS
    retriable = False


class InvalidTimestampError(HeadwaterError):
    """A record timestamp is outside the range the topic accepts."""

    code = _codes.ERROR_CODE_INVALID_TIMESTAMP
    retriable = False


class TopicAlreadyExistsError(HeadwaterError):
    """A topic with this name exists."""

    code = _codes.ERROR_CODE_TOPIC_ALREADY_EXISTS
    retriable = False


class InvalidPartitionsError(HeadwaterError):
    """The partition count is zero, negative or above the node's bound."""

    code = _codes.ERROR_CODE_INVALID_PARTITIONS
    retriable = False


class InvalidReplicationFactorError(HeadwaterError):
    """The replication factor is invalid or larger than the number of nodes."""

    code = _codes.ERROR_CODE_INVALID_REPLICATION_FACTOR
    retriable = False


class InvalidReplicaAssignmentError(HeadwaterError):
    """A manual replica assignment is invalid."""

    code = _codes.ERROR_CODE_INVALID_REPLICA_ASSIGNMENT
    retriable = False


class InvalidConfigError(HeadwaterError):
    """A config name is unknown or its value is out of range."""

    code = _codes.ERROR_CODE_INVALID_CONFIG
    retriable = False


class NotControllerError(HeadwaterError):
    """The node is not the active controller."""

    code = _codes.ERROR_CODE_NOT_CONTROLLER
    retriable = True


class InvalidRequestError(HeadwaterError):
    """The request is malformed (also gRPC INVALID_ARGUMENT)."""

    code = _codes.ERROR_CODE_INVALID_REQUEST
    retriable = False


class PolicyViolationError(HeadwaterError):
    """The request breaks a cluster policy."""

    code = _codes.ERROR_CODE_POLICY_VIOLATION
    retriable = False


class OutOfOrderSequenceError(HeadwaterError):
    """An idempotent producer's sequence number is out of order."""

    code = _codes.ERROR_CODE_OUT_OF_ORDER_SEQUENCE
    retriable = False


class DuplicateSequenceError(HeadwaterError):
    """An idempotent producer's batch was already written."""

    code = _codes.ERROR_CODE_DUPLICATE_SEQUENCE
    retriable = False


class InvalidProducerEpochError(HeadwaterError):
    """The producer epoch is stale: a newer producer with the same id exists."""

    code = _codes.ERROR_CODE_INVALID_PRODUCER_EPOCH
    retriable = False


class UnknownProducerIdError(HeadwaterError):
    """The node has no state for this producer id."""

    code = _codes.ERROR_CODE_UNKNOWN_PRODUCER_ID
    retriable = False


class StorageError(HeadwaterError):
    """The node could not read or write its log (a full or failed disk)."""

    code = _codes.ERROR_CODE_STORAGE_ERROR
    retriable = True


class FencedLeaderEpochError(HeadwaterError):
    """The request's leader epoch is older than the partition's."""

    code = _codes.ERROR_CODE_FENCED_LEADER_EPOCH
    retriable = True


class UnknownLeaderEpochError(HeadwaterError):
    """The request's leader epoch is newer than the node knows."""

    code = _codes.ERROR_CODE_UNKNOWN_LEADER_EPOCH
    retriable = True


class StaleBrokerEpochError(HeadwaterError):
    """The node's broker epoch is stale (it restarted)."""

    code = _codes.ERROR_CODE_STALE_BROKER_EPOCH
    retriable = False


class OffsetNotAvailableError(HeadwaterError):
    """The offset is not available yet (a leader change is in progress)."""

    code = _codes.ERROR_CODE_OFFSET_NOT_AVAILABLE
    retriable = True


class UnknownTopicIdError(HeadwaterError):
    """The topic id is unknown."""

    code = _codes.ERROR_CODE_UNKNOWN_TOPIC_ID
    retriable = True


class InconsistentTopicIdError(HeadwaterError):
    """The topic id does not match the topic name."""

    code = _codes.ERROR_CODE_INCONSISTENT_TOPIC_ID
    retriable = True


class InvalidUpdateVersionError(HeadwaterError):
    """A partition change carried a stale partition epoch."""

    code = _codes.ERROR_CODE_INVALID_UPDATE_VERSION
    retriable = False


class IneligibleReplicaError(HeadwaterError):
    """A replica cannot join the in-sync set."""

    code = _codes.ERROR_CODE_INELIGIBLE_REPLICA
    retriable = False


class CoordinatorNotAvailableError(HeadwaterError):
    """The group coordinator is not available."""

    code = _codes.ERROR_CODE_COORDINATOR_NOT_AVAILABLE
    retriable = True


class NotCoordinatorError(HeadwaterError):
    """The node is not this group's coordinator."""

    code = _codes.ERROR_CODE_NOT_COORDINATOR
    retriable = True


class CoordinatorLoadInProgressError(HeadwaterError):
    """The group coordinator is still loading its state."""

    code = _codes.ERROR_CODE_COORDINATOR_LOAD_IN_PROGRESS
    retriable = True


class GroupIdNotFoundError(HeadwaterError):
    """The group does not exist."""

    code = _codes.ERROR_CODE_GROUP_ID_NOT_FOUND
    retriable = False


class UnknownMemberIdError(HeadwaterError):
    """The group does not know this member."""

    code = _codes.ERROR_CODE_UNKNOWN_MEMBER_ID
    retriable = False


class FencedMemberEpochError(HeadwaterError):
    """The member epoch is stale."""

    code = _codes.ERROR_CODE_FENCED_MEMBER_EPOCH
    retriable = False


class UnreleasedInstanceIdError(HeadwaterError):
    """The static member's instance id is still in use."""

    code = _codes.ERROR_CODE_UNRELEASED_INSTANCE_ID
    retriable = False


class GroupMaxSizeReachedError(HeadwaterError):
    """The group is full."""

    code = _codes.ERROR_CODE_GROUP_MAX_SIZE_REACHED
    retriable = False


class UnstableOffsetCommitError(HeadwaterError):
    """There are pending offset commits for the partition."""

    code = _codes.ERROR_CODE_UNSTABLE_OFFSET_COMMIT
    retriable = True


class ThrottlingQuotaExceededError(HeadwaterError):
    """A quota was exceeded; retry after a backoff."""

    code = _codes.ERROR_CODE_THROTTLING_QUOTA_EXCEEDED
    retriable = True


class ResourceNotFoundError(HeadwaterError):
    """The config resource does not exist."""

    code = _codes.ERROR_CODE_RESOURCE_NOT_FOUND
    retriable = False


class NoOffsetForPartitionError(HeadwaterError):
    """A partition has no position and ``auto_offset_reset`` is ``"none"``: call ``seek`` first."""

    code = _codes.ERROR_CODE_OFFSET_OUT_OF_RANGE
    retriable = False


ERROR_BY_CODE: dict[int, type[HeadwaterError]] = {
    cls.code: cls
    for cls in (
        UnknownServerError,
        OffsetOutOfRangeError,
        CorruptMessageError,
        UnknownTopicOrPartitionError,
        InvalidFetchSizeError,
        LeaderNotAvailableError,
        NotLeaderOrFollowerError,
        RequestTimedOutError,
        NodeNotAvailableError,
        ReplicaNotAvailableError,
        RecordTooLargeError,
        RecordListTooLargeError,
        InvalidTopicError,
        NotEnoughReplicasError,
        NotEnoughReplicasAfterAppendError,
        InvalidRequiredAcksError,
        InvalidTimestampError,
        TopicAlreadyExistsError,
        InvalidPartitionsError,
        InvalidReplicationFactorError,
        InvalidReplicaAssignmentError,
        InvalidConfigError,
        NotControllerError,
        InvalidRequestError,
        PolicyViolationError,
        OutOfOrderSequenceError,
        DuplicateSequenceError,
        InvalidProducerEpochError,
        UnknownProducerIdError,
        StorageError,
        FencedLeaderEpochError,
        UnknownLeaderEpochError,
        StaleBrokerEpochError,
        OffsetNotAvailableError,
        UnknownTopicIdError,
        InconsistentTopicIdError,
        InvalidUpdateVersionError,
        IneligibleReplicaError,
        CoordinatorNotAvailableError,
        NotCoordinatorError,
        CoordinatorLoadInProgressError,
        GroupIdNotFoundError,
        UnknownMemberIdError,
        FencedMemberEpochError,
        UnreleasedInstanceIdError,
        GroupMaxSizeReachedError,
        UnstableOffsetCommitError,
        ThrottlingQuotaExceededError,
        ResourceNotFoundError,
    )
}

RETRIABLE_CODES: frozenset[int] = frozenset(code for code, cls in ERROR_BY_CODE.items() if cls.retriable)


def error_for_code(code: int, message: str = "") -> HeadwaterError:
    """The exception for a response's ErrorCode; an unknown code becomes a non-retriable error."""
    cls = ERROR_BY_CODE.get(code)
    if cls is None:
        return UnknownServerError(message or f"unknown error code {code}", code=code)
    return cls(message)


def error_for_rpc(exc: grpc.RpcError, what: str = "request") -> HeadwaterError:
    """The exception for a gRPC failure of a whole request."""
    status = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    message = f"{what} failed: {details}"
    if status == grpc.StatusCode.UNAVAILABLE:
        return NodeNotAvailableError(message)
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RequestTimedOutError(message)
    if status == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(message)
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RecordListTooLargeError(message)
    if status == grpc.StatusCode.CANCELLED:
        return ClientClosedError(message)
    name = status.name if status is not None else "UNKNOWN"
    return UnknownServerError(f"{what} failed with gRPC {name}: {details}")
