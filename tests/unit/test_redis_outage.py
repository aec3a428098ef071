"""While Redis cannot be reached: TorchServe-shaped 503s, an Unhealthy /ping, and
waiting requests that ride out a short outage."""

from __future__ import annotations

import asyncio
import json

import falcon
import falcon.asgi
import pytest
import redis
from falcon import testing

from control.core import dispatch
from control.core.dispatch import _Outage
from control.http.common import REDIS_DOWN, new_app
from control.inference.health import healthy


class Down:
    """A resource whose Redis is gone."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_every_port_answers_503_json_while_redis_is_down() -> None:
    app = new_app([])
    app.add_route("/models", Down())
    result = testing.TestClient(app).simulate_get("/models")
    assert result.status_code == 503
    assert json.loads(result.content) == {
        "code": 503,
        "type": "ServiceUnavailableException",
        "message": REDIS_DOWN,
    }
    assert "Traceback" not in result.text


def test_ping_is_unhealthy_while_redis_is_down() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    assert healthy(client) is False


def test_a_wait_rides_out_a_short_outage_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(dispatch.asyncio, "sleep", sleep)
    outage = _Outage(clock=lambda: now[0])

    async def scenario() -> None:
        for _ in range(3):  # swallowed: the request still lives in Redis
            async with outage.tolerated():
                raise redis.ConnectionError("down")
        async with outage.tolerated():
            pass  # Redis is back: the outage is over
        with pytest.raises(redis.TimeoutError):
            for _ in range(1000):
                async with outage.tolerated():
                    raise redis.TimeoutError("still down")
        assert now[0] >= dispatch.REDIS_OUTAGE_WAIT
        with pytest.raises(ValueError):
            async with outage.tolerated():
                raise ValueError("not an outage")

    asyncio.run(scenario())
