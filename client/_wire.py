"""The producer's requests, written straight to the protobuf wire format.

A ``ProduceStreamRequest`` is a few small headers around encoded batches (``encode_batch_parts``).
Building it as messages copies every batch payload into a message, the request, and the serialized
bytes; joining the wire bytes copies each once. The bytes are what protobuf would make of the same request
(fields in number order, defaults omitted); a test holds them equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from headwater.v1.batch import encode_varint

__all__ = ["produce_stream_request"]


def _int32(tag: bytes, value: int) -> bytes:
    return tag + encode_varint(value) if value else b""


def _framed(tag: bytes, size: int) -> bytes:
    return tag + encode_varint(size)


Batch = Sequence[bytes]  # a serialized RecordBatch, in pieces to be sent one after the other


def produce_stream_request(
    acks: int, timeout_ms: int, topics: Iterable[tuple[str, Iterable[tuple[int, Iterable[Batch]]]]]
) -> bytes:
    """A serialized ``ProduceStreamRequest``: ``topics`` is ``(topic, [(partition, [batch])])``, each
    batch in pieces (``encode_batch_parts``).

    Sizes are summed from the inside out first, so that the batches are copied once, by the final
    join, however deep they sit.
    """
    head = _int32(b"\x08", acks) + _int32(b"\x10", timeout_ms)  # ProduceRequest.acks, .timeout_ms
    # (ProduceTopicData.topic field, its size, [(ProducePartitionData.partition field, its size,
    # [(batch frame, batch)])])
    plan = []
    request_size = len(head)
    for topic, partitions in topics:
        name = topic.encode()
        topic_field = _framed(b"\x0a", len(name)) + name if name else b""
        topic_size = len(topic_field)
        parts = []
        for partition, batches in partitions:
            partition_field = _int32(b"\x08", partition)
            framed = [(_framed(b"\x12", sum(map(len, b))), b) for b in batches]  # .batches
            size = len(partition_field) + sum(len(f) + sum(map(len, b)) for f, b in framed)
            parts.append((partition_field, size, framed))
            topic_size += len(_framed(b"\x12", size)) + size  # ProduceTopicData.partitions
        plan.append((topic_field, topic_size, parts))
        request_size += len(_framed(b"\x1a", topic_size)) + topic_size  # ProduceRequest.topics
    out = [_framed(b"\x0a", request_size), head]  # ProduceStreamRequest.request
    for topic_field, topic_size, parts in plan:
        out += (_framed(b"\x1a", topic_size), topic_field)
        for partition_field, size, framed in parts:
            out += (_framed(b"\x12", size), partition_field)
            for frame, b in framed:
                out.append(frame)
                out += b
    return b"".join(out)
