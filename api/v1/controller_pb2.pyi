from headwater.v1 import client_pb2 as _client_pb2
from headwater.v1 import errors_pb2 as _errors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ControllerHint(_message.Message):
    __slots__ = ("controller_id", "controller_address")
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    controller_id: int
    controller_address: str
    def __init__(self, controller_id: _Optional[int] = ..., controller_address: _Optional[str] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("node_id", "incarnation_id", "host", "port", "rack", "raft_address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    RACK_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    incarnation_id: bytes
    host: str
    port: int
    rack: str
    raft_address: str
    def __init__(self, node_id: _Optional[int] = ..., incarnation_id: _Optional[bytes] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., rack: _Optional[str] = ..., raft_address: _Optional[str] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("error_code", "error_message", "broker_epoch", "controller")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BROKER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    error_code: _errors_pb2.ErrorCode
    error_message: str
    broker_epoch: int
    controller: ControllerHint
    def __init__(self, error_code: _Optional[_Union[_errors_pb2.ErrorCode, str]] = ..., error_message: _Optional[str] = ..., broker_epoch: _Optional[int] = ..., controller: _Optional[_Union[ControllerHint, _Mapping]] = ...) -> None: ...

class NodeHeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "broker_epoch", "want_fence", "want_shutdown")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BROKER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    WANT_FENCE_FIELD_NUMBER: _ClassVar[int]
    WANT_SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    broker_epoch: int
    want_fence: bool
    want_shutdown: bool
    def __init__(self, node_id: _Optional[int] = ..., broker_epoch: _Optional[int] = ..., want_fence: _Optional[bool] = ..., want_shutdown: _Optional[bool] = ...) -> None: ...

class NodeHeartbeatResponse(_message.Message):
    __slots__ = ("error_code", "error_message", "is_fenced", "shutdown_ready", "metadata_offset", "controller")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    IS_FENCED_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_READY_FIELD_NUMBER: _ClassVar[int]
    METADATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    error_code: _errors_pb2.ErrorCode
    error_message: str
    is_fenced: bool
    shutdown_ready: bool
    metadata_offset: int
    controller: ControllerHint
    def __init__(self, error_code: _Optional[_Union[_errors_pb2.ErrorCode, str]] = ..., error_message: _Optional[str] = ..., is_fenced: _Optional[bool] = ..., shutdown_ready: _Optional[bool] = ..., metadata_offset: _Optional[int] = ..., controller: _Optional[_Union[ControllerHint, _Mapping]] = ...) -> None: ...

class AlterPartitionRequest(_message.Message):
    __slots__ = ("topic_id", "partition", "leader_id", "broker_epoch", "leader_epoch", "partition_epoch", "new_isr", "request_id")
    TOPIC_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    BROKER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEADER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PARTITION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    NEW_ISR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    topic_id: bytes
    partition: int
    leader_id: int
    broker_epoch: int
    leader_epoch: int
    partition_epoch: int
    new_isr: _containers.RepeatedScalarFieldContainer[int]
    request_id: str
    def __init__(self, topic_id: _Optional[bytes] = ..., partition: _Optional[int] = ..., leader_id: _Optional[int] = ..., broker_epoch: _Optional[int] = ..., leader_epoch: _Optional[int] = ..., partition_epoch: _Optional[int] = ..., new_isr: _Optional[_Iterable[int]] = ..., request_id: _Optional[str] = ...) -> None: ...

class AlterPartitionResponse(_message.Message):
    __slots__ = ("error_code", "error_message", "leader_id", "leader_epoch", "partition_epoch", "isr", "controller")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PARTITION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ISR_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    error_code: _errors_pb2.ErrorCode
    error_message: str
    leader_id: int
    leader_epoch: int
    partition_epoch: int
    isr: _containers.RepeatedScalarFieldContainer[int]
    controller: ControllerHint
    def __init__(self, error_code: _Optional[_Union[_errors_pb2.ErrorCode, str]] = ..., error_message: _Optional[str] = ..., leader_id: _Optional[int] = ..., leader_epoch: _Optional[int] = ..., partition_epoch: _Optional[int] = ..., isr: _Optional[_Iterable[int]] = ..., controller: _Optional[_Union[ControllerHint, _Mapping]] = ...) -> None: ...

class TopicPartition(_message.Message):
    __slots__ = ("topic_id", "partition")
    TOPIC_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    topic_id: bytes
    partition: int
    def __init__(self, topic_id: _Optional[bytes] = ..., partition: _Optional[int] = ...) -> None: ...

class ElectLeadersRequest(_message.Message):
    __slots__ = ("partitions", "preferred")
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_FIELD_NUMBER: _ClassVar[int]
    partitions: _containers.RepeatedCompositeFieldContainer[TopicPartition]
    preferred: bool
    def __init__(self, partitions: _Optional[_Iterable[_Union[TopicPartition, _Mapping]]] = ..., preferred: _Optional[bool] = ...) -> None: ...

class ElectLeadersResponse(_message.Message):
    __slots__ = ("error_code", "error_message", "results", "controller")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    error_code: _errors_pb2.ErrorCode
    error_message: str
    results: _containers.RepeatedCompositeFieldContainer[ElectLeadersResult]
    controller: ControllerHint
    def __init__(self, error_code: _Optional[_Union[_errors_pb2.ErrorCode, str]] = ..., error_message: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ElectLeadersResult, _Mapping]]] = ..., controller: _Optional[_Union[ControllerHint, _Mapping]] = ...) -> None: ...

class ElectLeadersResult(_message.Message):
    __slots__ = ("topic_id", "partition", "error_code", "error_message", "leader_id", "leader_epoch")
    TOPIC_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    topic_id: bytes
    partition: int
    error_code: _errors_pb2.ErrorCode
    error_message: str
    leader_id: int
    leader_epoch: int
    def __init__(self, topic_id: _Optional[bytes] = ..., partition: _Optional[int] = ..., error_code: _Optional[_Union[_errors_pb2.ErrorCode, str]] = ..., error_message: _Optional[str] = ..., leader_id: _Optional[int] = ..., leader_epoch: _Optional[int] = ...) -> None: ...

class DescribeClusterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeClusterResponse(_message.Message):
    __slots__ = ("error_code", "error_message", "nodes", "controller_id", "answered_by", "raft_term", "commit_index", "metadata_offset", "voters", "controller", "cluster_id")
    class VotersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    RAFT_TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    METADATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    error_code: _errors_pb2.ErrorCode
    error_message: str
    nodes: _containers.RepeatedCompositeFieldContainer[_client_pb2.NodeInfo]
    controller_id: int
    answered_by: int
    raft_term: int
    commit_index: int
    metadata_offset: int
    voters: _containers.ScalarMap[int, str]
    controller: ControllerHint
    cluster_id: str
    def __init__(self, error_code: _Optional[_Union[_errors_pb2.ErrorCode, str]] = ..., error_message: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[_client_pb2.NodeInfo, _Mapping]]] = ..., controller_id: _Optional[int] = ..., answered_by: _Optional[int] = ..., raft_term: _Optional[int] = ..., commit_index: _Optional[int] = ..., metadata_offset: _Optional[int] = ..., voters: _Optional[_Mapping[int, str]] = ..., controller: _Optional[_Union[ControllerHint, _Mapping]] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class WatchMetadataRequest(_message.Message):
    __slots__ = ("from_offset",)
    FROM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    from_offset: int
    def __init__(self, from_offset: _Optional[int] = ...) -> None: ...

class WatchMetadataResponse(_message.Message):
    __slots__ = ("snapshot", "delta")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    snapshot: MetadataSnapshot
    delta: MetadataDelta
    def __init__(self, snapshot: _Optional[_Union[MetadataSnapshot, _Mapping]] = ..., delta: _Optional[_Union[MetadataDelta, _Mapping]] = ...) -> None: ...

class MetadataSnapshot(_message.Message):
    __slots__ = ("metadata_offset", "data")
    METADATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    metadata_offset: int
    data: bytes
    def __init__(self, metadata_offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class MetadataDelta(_message.Message):
    __slots__ = ("metadata_offset", "command", "error_code", "error_message")
    METADATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    metadata_offset: int
    command: bytes
    error_code: _errors_pb2.ErrorCode
    error_message: str
    def __init__(self, metadata_offset: _Optional[int] = ..., command: _Optional[bytes] = ..., error_code: _Optional[_Union[_errors_pb2.ErrorCode, str]] = ..., error_message: _Optional[str] = ...) -> None: ...

class ControllerServiceCreateTopicsRequest(_message.Message):
    __slots__ = ("request", "request_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request: _client_pb2.CreateTopicsRequest
    request_id: str
    def __init__(self, request: _Optional[_Union[_client_pb2.CreateTopicsRequest, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ControllerServiceCreateTopicsResponse(_message.Message):
    __slots__ = ("error_code", "error_message", "controller", "response", "metadata_offset")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    METADATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    error_code: _errors_pb2.ErrorCode
    error_message: str
    controller: ControllerHint
    response: _client_pb2.CreateTopicsResponse
    metadata_offset: int
    def __init__(self, error_code: _Optional[_Union[_errors_pb2.ErrorCode, str]] = ..., error_message: _Optional[str] = ..., controller: _Optional[_Union[ControllerHint, _Mapping]] = ..., response: _Optional[_Union[_client_pb2.CreateTopicsResponse, _Mapping]] = ..., metadata_offset: _Optional[int] = ...) -> None: ...

class ControllerServiceDeleteTopicsRequest(_message.Message):
    __slots__ = ("request", "request_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request: _client_pb2.DeleteTopicsRequest
    request_id: str
    def __init__(self, request: _Optional[_Union[_client_pb2.DeleteTopicsRequest, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ControllerServiceDeleteTopicsResponse(_message.Message):
    __slots__ = ("error_code", "error_message", "controller", "response", "metadata_offset")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    METADATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    error_code: _errors_pb2.ErrorCode
    error_message: str
    controller: ControllerHint
    response: _client_pb2.DeleteTopicsResponse
    metadata_offset: int
    def __init__(self, error_code: _Optional[_Union[_errors_pb2.ErrorCode, str]] = ..., error_message: _Optional[str] = ..., controller: _Optional[_Union[ControllerHint, _Mapping]] = ..., response: _Optional[_Union[_client_pb2.DeleteTopicsResponse, _Mapping]] = ..., metadata_offset: _Optional[int] = ...) -> None: ...

class ControllerServiceAlterConfigsRequest(_message.Message):
    __slots__ = ("request", "request_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request: _client_pb2.AlterConfigsRequest
    request_id: str
    def __init__(self, request: _Optional[_Union[_client_pb2.AlterConfigsRequest, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ControllerServiceAlterConfigsResponse(_message.Message):
    __slots__ = ("error_code", "error_message", "controller", "response", "metadata_offset")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    METADATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    error_code: _errors_pb2.ErrorCode
    error_message: str
    controller: ControllerHint
    response: _client_pb2.AlterConfigsResponse
    metadata_offset: int
    def __init__(self, error_code: _Optional[_Union[_errors_pb2.ErrorCode, str]] = ..., error_message: _Optional[str] = ..., controller: _Optional[_Union[ControllerHint, _Mapping]] = ..., response: _Optional[_Union[_client_pb2.AlterConfigsResponse, _Mapping]] = ..., metadata_offset: _Optional[int] = ...) -> None: ...
