"""The dispatcher's streaming API over fakeredis (``Dispatcher.stream``): each piece is
handed over as it arrives, in order, from the same one listener; two streams interleave
without mixing; the liveness rule holds between pieces; a caller that stops reading
forgets the request (later pieces are dropped) and sets its cancel key; a plain ``send``
gets the first piece.

Fake workers as in ``test_dispatch``: they answer on the frame's reply list, addressed to
its id, and keep the frame in their in-flight list until the final reply.
"""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from control.core import keys, observed
from control.core.dispatch import Delivery, Dispatcher, NoWorker
from control.core.envelope import Reply, Request
from control.core.errors import InternalServerException
from control.core.observed import WorkerState
from control.core.registry import Registry
from tests.unit import test_dispatch
from tests.unit.test_dispatch import (
    FakeWorker,
    asynchronous,
    body,
    dispatching,
    eventually,
    fake_worker,
    worker,
)

# test_dispatch's fixtures, by name: its fakeredis server and sync client, the
# registered model, and its short liveness interval (autouse).
server = test_dispatch.server
client = test_dispatch.client
registered = test_dispatch.registered
short_pauses = test_dispatch.short_pauses


async def piece(fake: FakeWorker, request: Request, text: bytes, more: bool = True) -> None:
    """Push one reply to ``request`` without acknowledging it (a stream in progress)."""
    reply = Reply(status=200, body=text, headers={"ts_stream_next": str(more).lower()}, more=more)
    await fake.client.lpush(request.reply_key, reply.to(request.id).frame())


async def final(fake: FakeWorker, request: Request, frame: bytes, text: bytes) -> None:
    """The final reply and the acknowledgement, as a worker's reply pipeline sends them."""
    await fake.answer(request, frame, text, headers={"ts_stream_next": "false"})


async def collect(dispatcher: Dispatcher, rid: str, got: list[Delivery]) -> None:
    async for delivery in dispatcher.stream("m", None, body(rid.encode()), {}, rid):
        got.append(delivery)


@asynchronous
async def test_pieces_are_handed_over_one_by_one_in_order(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    got: list[Delivery] = []
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        consumer = asyncio.create_task(collect(dispatcher, "r1", got))
        request, frame = await fake.take()
        for count in range(1, 4):
            await piece(fake, request, b"hello")
            # Handed over before the next exists: nothing waits for the whole answer.
            await eventually(lambda n=count: len(got) == n, f"piece {count}")  # type: ignore[misc]
        await final(fake, request, frame, b"hello world ")
        await consumer
    assert [d.reply.body for d in got] == [b"hello"] * 3 + [b"hello world "]
    assert [d.reply.more for d in got] == [True, True, True, False]
    assert {d.version for d in got} == {"1.0"}


@asynchronous
async def test_an_answer_that_does_not_stream_is_one_delivery(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    got: list[Delivery] = []
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        await asyncio.gather(collect(dispatcher, "r1", got), fake.serve())
    assert [(d.reply.body, d.reply.more) for d in got] == [(b"r1", False)]


@asynchronous
async def test_two_streams_interleave_and_each_gets_only_its_own_pieces(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    a: list[Delivery] = []
    b: list[Delivery] = []
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        tasks = [asyncio.create_task(collect(dispatcher, "a", a))]
        first = await fake.take()
        tasks.append(asyncio.create_task(collect(dispatcher, "b", b)))
        second = await fake.take()
        held = {r.id: (r, f) for r, f in (first, second)}
        for step in range(3):
            for rid in ("a", "b"):
                await piece(fake, held[rid][0], f"{rid}{step}".encode())
        await final(fake, *held["b"], b"b-end")
        await final(fake, *held["a"], b"a-end")
        await asyncio.gather(*tasks)
    assert [d.reply.body for d in a] == [b"a0", b"a1", b"a2", b"a-end"]
    assert [d.reply.body for d in b] == [b"b0", b"b1", b"b2", b"b-end"]


@asynchronous
async def test_a_stream_waits_between_pieces_while_its_worker_holds_it(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.BUSY), ttl=60)
    got: list[Delivery] = []
    async with dispatching(server) as (dispatcher, wire), fake_worker(server) as fake:
        consumer = asyncio.create_task(collect(dispatcher, "r1", got))
        request, frame = await fake.take()
        await piece(fake, request, b"tok")
        await eventually(lambda: len(got) == 1, "the first piece")
        checks = wire.scripts(dispatcher._alive.sha)
        # A slow next token: many liveness checks find the request held, and it waits.
        await eventually(lambda: wire.scripts(dispatcher._alive.sha) >= checks + 5, "checks")
        await final(fake, request, frame, b"end")
        await consumer
    assert [d.reply.body for d in got] == [b"tok", b"end"]


@asynchronous
async def test_a_worker_lost_mid_stream_ends_it_with_worker_died(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    got: list[Delivery] = []
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        consumer = asyncio.create_task(collect(dispatcher, "r1", got))
        request, _ = await fake.take()
        await piece(fake, request, b"tok")
        await eventually(lambda: len(got) == 1, "the first piece")
        client.delete(keys.worker("9000"))  # its host vanished, with its supervisor
        with pytest.raises(InternalServerException) as caught:
            await consumer
    assert caught.value.message == "Worker died."


@asynchronous
async def test_a_reader_that_stops_forgets_the_request_and_cancels_it(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        replies = dispatcher.stream("m", None, body(), {}, "r1")
        first = asyncio.create_task(anext(replies))
        request, frame = await fake.take()
        await piece(fake, request, b"tok")
        assert (await first).reply.body == b"tok"
        await replies.aclose()  # the client went away
        assert "r1" not in dispatcher._waiting
        await eventually(lambda: client.exists(keys.cancel("r1")), "the cancel key")
        assert 0 < client.pttl(keys.cancel("r1")) <= keys.REPLY_TTL_MS
        # Pieces still coming for it are replies for nobody: dropped, nothing disturbed.
        await piece(fake, request, b"unread")
        await final(fake, request, frame, b"unread end")
        await eventually(lambda: client.llen(dispatcher.replies) == 0, "the drop")
        served = asyncio.create_task(fake.serve())
        assert (await dispatcher.send("m", None, body(b"next"), {})).reply.body == b"next"
        await served


@asynchronous
async def test_a_finished_stream_sets_no_cancel_key(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    got: list[Delivery] = []
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        await asyncio.gather(collect(dispatcher, "r1", got), fake.serve())
        await asyncio.sleep(0)  # a cancel write would have been scheduled by now
        assert not dispatcher._cancels
    assert not client.exists(keys.cancel("r1"))


@asynchronous
async def test_a_plain_send_gets_the_first_piece_and_the_rest_is_dropped(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        sent = asyncio.create_task(dispatcher.send("m", None, body(), {}, "r1"))
        request, frame = await fake.take()
        await piece(fake, request, b"first")
        outcome = await sent
        assert (outcome.reply.body, outcome.reply.more) == (b"first", True)
        assert outcome.reply.headers["ts_stream_next"] == "true"
        await piece(fake, request, b"second")
        await final(fake, request, frame, b"end")
        await eventually(lambda: client.llen(dispatcher.replies) == 0, "the drop")


@asynchronous
async def test_a_stream_raises_the_enqueue_errors_before_its_first_delivery(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    async with dispatching(server) as (dispatcher, _):
        with pytest.raises(NoWorker):
            await anext(dispatcher.stream("m", None, body(), {}, "r1"))
    assert not client.exists(keys.cancel("r1"))


@asynchronous
async def test_a_stream_request_frame_asks_for_a_batch_of_one(
    server: fakeredis.FakeServer, client: fakeredis.FakeRedis, registered: Registry
) -> None:
    observed.publish(client, worker("9000", WorkerState.READY), ttl=60)
    async with dispatching(server) as (dispatcher, _), fake_worker(server) as fake:
        replies = dispatcher.stream("m", None, body(), {}, "r1", kind="stream")
        first = asyncio.create_task(anext(replies))
        request, frame = await fake.take()
        assert request.kind == "stream"
        await final(fake, request, frame, b"end")
        assert (await first).reply.body == b"end"
        await replies.aclose()
