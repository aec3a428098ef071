"""A worker never drops the replies of a batch it ran because Redis blinked.

Found by the chaos tests (tests/acceptance/test_chaos.py): Redis restarted while a
worker was running a request kept the frame in the worker's in-flight list, and the
reply the worker could not push was dropped, so the waiting API (which counts a frame
held by a live worker as being worked on) never answered its client.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
import redis

from control.core import keys
from control.core.envelope import Part, Reply, Request
from workers.handling.types import InferenceReply, InferenceRequest
from workers.worker import serving
from workers.worker.serving import ModelRunner, OnlineLoop

INFLIGHT = "mqs:o:inflight:9000"
REQUEST = Request(
    id="r1", model="m", version="1.0", deadline=0.0, enqueued=1.0,
    headers={}, parts=(Part("body", "text/plain", b"token-1"),),
)  # fmt: skip


class Echo:
    def handle(self, batch: list[InferenceRequest], stream: object = None) -> list[InferenceReply]:
        return [
            InferenceReply(200, "", {}, None, b"".join(p.value for p in r.parameters))
            for r in batch
        ]


class Blinking:
    """A client whose next ``failures`` pipelines fail as a Redis restart makes them."""

    def __init__(self, real: fakeredis.FakeRedis, failures: int) -> None:
        self.real = real
        self.failures = failures

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = self.real.pipeline(transaction=transaction)
        execute = pipe.execute

        def blinking() -> Any:
            # An empty pipeline sends nothing (redis-py returns [] without connecting).
            if pipe.command_stack and self.failures > 0:
                self.failures -= 1
                pipe.reset()  # as redis-py's execute does, whatever happened
                raise redis.ConnectionError("Error 111 connecting to Redis. Connection refused.")
            return execute()

        pipe.execute = blinking
        return pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def real() -> fakeredis.FakeRedis:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    client.lpush(INFLIGHT, REQUEST.frame())  # taken from the queue, as BLMOVE does
    return client


def loop_on(client: Any) -> OnlineLoop:
    return OnlineLoop(client, ModelRunner(Echo()), batcher=None, inflight=INFLIGHT)  # type: ignore[arg-type]


def test_replies_are_delivered_once_redis_is_back(real: fakeredis.FakeRedis) -> None:
    client = Blinking(real, failures=2)
    loop_on(client).serve([REQUEST.frame()])
    assert client.failures == 0  # both failed attempts were retried
    [frame] = real.lrange(keys.reply("r1"), 0, -1)
    reply = Reply.parse(frame)
    assert (reply.status, reply.body) == (200, b"token-1")
    assert real.llen(INFLIGHT) == 0  # nothing left for anyone to wait on


def test_past_the_retry_limit_the_error_goes_up_and_the_frame_stays(
    real: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The frame stays in the in-flight list: whoever answers for the worker (its
    # supervisor, when it exits) still finds it.
    monkeypatch.setattr(serving, "REPLY_RETRY_S", 0.0)
    with pytest.raises(redis.ConnectionError):
        loop_on(Blinking(real, failures=1)).serve([REQUEST.frame()])
    assert real.llen(INFLIGHT) == 1
    assert not real.exists(keys.reply("r1"))
