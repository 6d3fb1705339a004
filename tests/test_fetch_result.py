"""FetchResult writes stored batches to the wire as they are; the bytes must equal protobuf's own."""

from __future__ import annotations

from headwater.node.broker import FetchResult
from headwater.v1 import batch as codec
from headwater.v1 import client_pb2 as pb
from headwater.v1 import errors_pb2


def stored(base_offset: int, values: list[bytes]) -> bytes:
    b = codec.build_batch([(None, v, None, 1000 + i) for i, v in enumerate(values)])
    b.base_offset = base_offset
    return b.SerializeToString()


def test_fetch_result_bytes_equal_the_message_built_by_protobuf() -> None:
    raw_a = [stored(0, [b"a", b"b"]), stored(2, [b"c" * 300])]
    raw_b = [stored(7, [b""])]
    result = FetchResult()
    t1 = result.add_topic("orders")
    p0, batches0 = result.add_partition(t1, partition=0, high_watermark=3, leader_id=1)
    batches0.extend(raw_a)
    p1, _ = result.add_partition(t1, partition=1, high_watermark=-1)
    p1.error_code = errors_pb2.ERROR_CODE_OFFSET_OUT_OF_RANGE
    t2 = result.add_topic("")  # an empty name is omitted on the wire, as protobuf does
    _, batches2 = result.add_partition(t2, partition=0)
    batches2.extend(raw_b)

    expected = pb.FetchResponse()
    e1 = expected.topics.add(topic="orders")
    e0 = e1.partitions.add(partition=0, high_watermark=3, leader_id=1)
    for r in raw_a:
        e0.batches.add().ParseFromString(r)
    e1.partitions.add(partition=1, high_watermark=-1, error_code=errors_pb2.ERROR_CODE_OFFSET_OUT_OF_RANGE)
    e2 = expected.topics.add(topic="").partitions.add(partition=0)
    e2.batches.add().ParseFromString(raw_b[0])

    assert result.to_message() == expected
    assert result.to_bytes() == expected.SerializeToString()
    assert [b.SerializeToString() for b in result.to_message().topics[0].partitions[0].batches] == raw_a


def test_an_empty_fetch_result_is_an_empty_response() -> None:
    assert FetchResult().to_bytes() == b""
