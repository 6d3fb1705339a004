"""Produce requests are bounded per node: past max_produce_requests a unary Produce is refused with
RESOURCE_EXHAUSTED (it is already in memory), and a ProduceStream waits for a turn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from headwater.config import NodeConfig
from headwater.node.broker import Broker
from headwater.node.metrics import NodeMetrics
from headwater.node.service import HeadwaterService
from headwater.storage import LogStore
from headwater.v1 import client_pb2 as pb


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class FakeContext:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[HeadwaterService]:
    store = LogStore(str(tmp_path / "log"))
    broker = Broker(NodeConfig(node_id=1, data_dir=str(tmp_path), max_produce_requests=2), store)
    try:
        yield HeadwaterService(broker, NodeMetrics(broker), cast(Any, None))
    finally:
        broker.close()
        store.close()


def test_a_unary_produce_past_the_bound_is_refused(service: HeadwaterService) -> None:
    service._producing = 2  # two requests in hand
    with pytest.raises(Aborted) as refused:
        asyncio.run(service.Produce(pb.ProduceRequest(acks=1), cast(Any, FakeContext())))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_produce_requests=2" in str(refused.value)
    service._producing = 0
    answer = asyncio.run(service.Produce(pb.ProduceRequest(acks=1), cast(Any, FakeContext())))
    assert isinstance(answer, pb.ProduceResponse)  # under the bound: handled (nothing to append)


def test_a_stream_waits_for_a_turn_past_the_bound_and_goes_on_when_one_frees(
    service: HeadwaterService,
) -> None:
    async def main() -> None:
        async def one_request() -> AsyncIterator[pb.ProduceStreamRequest]:
            yield pb.ProduceStreamRequest(request=pb.ProduceRequest(acks=1))

        await service._produce_slots.acquire()
        await service._produce_slots.acquire()  # both turns taken
        stream = service.ProduceStream(one_request(), cast(Any, FakeContext()))
        answer = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)
        assert not answer.done()  # waiting for a turn
        service._produce_slots.release()
        assert isinstance((await asyncio.wait_for(answer, 5)).response, pb.ProduceResponse)
        await stream.aclose()

    asyncio.run(main())
