"""TorchServe's batching window over Redis lists, with a fake clock (no real waiting)."""

from __future__ import annotations

import fakeredis
import pytest

from workers.worker.serving import Batcher

QUEUE, INFLIGHT = "q", "inflight"


class FakeTime:
    """A clock that only moves when the batcher sleeps; frames can arrive at set times."""

    def __init__(self, client: fakeredis.FakeRedis, arrivals: dict[float, bytes]) -> None:
        self.now = 100.0
        self.slept: list[float] = []
        self._r = client
        self._arrivals = sorted(arrivals.items())

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        while self._arrivals and self._arrivals[0][0] <= self.now:
            self._r.lpush(QUEUE, self._arrivals.pop(0)[1])


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def batcher(client: fakeredis.FakeRedis, time: FakeTime, size: int, delay_ms: int) -> Batcher:
    return Batcher(client, QUEUE, INFLIGHT, size, delay_ms, clock=time.clock, sleep=time.sleep)


def test_queued_requests_are_taken_without_waiting(client: fakeredis.FakeRedis) -> None:
    client.lpush(QUEUE, b"a", b"b", b"c", b"d", b"e")
    time = FakeTime(client, {})
    assert batcher(client, time, 4, 50).next_batch(0.1) == [b"a", b"b", b"c", b"d"]
    assert time.slept == []
    assert client.lrange(INFLIGHT, 0, -1) == [b"d", b"c", b"b", b"a"]  # moved, not popped
    assert client.lrange(QUEUE, 0, -1) == [b"e"]


def test_window_counts_from_the_first_request(client: fakeredis.FakeRedis) -> None:
    client.lpush(QUEUE, b"first")
    time = FakeTime(client, {100.02: b"second", 100.07: b"too late"})
    assert batcher(client, time, 8, 50).next_batch(0.1) == [b"first", b"second"]
    assert time.now == pytest.approx(100.05, abs=0.002)  # waited the 50 ms, no more


def test_batch_size_one_never_waits(client: fakeredis.FakeRedis) -> None:
    client.lpush(QUEUE, b"only", b"next")
    time = FakeTime(client, {})
    assert batcher(client, time, 1, 1000).next_batch(0.1) == [b"only"]
    assert time.slept == []


def test_empty_queue_returns_nothing(client: fakeredis.FakeRedis) -> None:
    assert batcher(client, FakeTime(client, {}), 4, 50).next_batch(0.01) == []


def test_block_slack_follows_the_server_timer() -> None:
    import redis

    from workers.worker.serving import BLOCK_SLACK, block_slack

    class Server:
        def __init__(self, reply: dict[str, str] | None) -> None:
            self._reply = reply

        def config_get(self, pattern: str) -> dict[str, str]:
            if self._reply is None:  # CONFIG denied to this user by an ACL
                raise redis.ResponseError("NOPERM this user has no permissions")
            return self._reply

    assert block_slack(Server({"hz": "100"})) == pytest.approx(0.02)  # type: ignore[arg-type]
    assert block_slack(Server({"hz": "10"})) == pytest.approx(0.11)  # type: ignore[arg-type]
    assert block_slack(Server(None)) == BLOCK_SLACK  # type: ignore[arg-type]
