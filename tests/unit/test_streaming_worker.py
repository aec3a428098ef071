"""Streaming on the worker side, over fakeredis: TorchServe's
``send_intermediate_predict_response`` pushes one piece per request at once (while the
handler still runs), in order, marked ``Reply.more`` with ``ts_stream_next: true``; the
final reply says ``ts_stream_next: false``; a client that went away stops the handler;
``stream`` requests run alone; the frame flags survive the wire and old frames parse.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from control.core import keys, observed
from control.core.envelope import FrameError, Part, Reply, Request, pack
from control.core.observed import WorkerRecord, WorkerState
from workers.handling.context import Context
from workers.handling.service import LoadedModel
from workers.handling.streaming import send_intermediate_predict_response
from workers.handling.types import InferenceRequest
from workers.worker.heartbeat import Reporter
from workers.worker.serving import ModelRunner, OnlineLoop

INFLIGHT = keys.inflight("9000")
LISTENER = keys.replies("api-1")


def request(rid: str, kind: str = "predict", reply_to: str = LISTENER) -> Request:
    return Request(
        id=rid, model="m", version="1.0", deadline=0.0, enqueued=1.0, headers={},
        parts=(Part("body", "text/plain", rid.encode()),), kind=kind, reply_to=reply_to,
    )  # fmt: skip


def loaded(entry_point: Any) -> LoadedModel:
    return LoadedModel(Context("m", "/tmp", None, 4, None, "0.12.0"), entry_point)


def serve(client: fakeredis.FakeRedis, model: LoadedModel, requests: list[Request]) -> None:
    frames = [r.frame() for r in requests]
    for frame in frames:
        client.lpush(INFLIGHT, frame)  # taken from the queue, as BLMOVE does
    loop = OnlineLoop(client, ModelRunner(model), batcher=None, inflight=INFLIGHT)  # type: ignore[arg-type]
    loop.serve(frames)


def replies(client: fakeredis.FakeRedis, key: str = LISTENER) -> list[Reply]:
    """Every reply on ``key``, oldest first (workers LPUSH; listeners pop the right)."""
    return [Reply.parse(frame) for frame in reversed(client.lrange(key, 0, -1))]


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def test_torchserves_streaming_handler_pushes_each_piece_at_once(
    client: fakeredis.FakeRedis,
) -> None:
    seen_while_running: list[int] = []

    def handler(data: list[Any], context: Context) -> list[str]:
        for _ in range(3):
            send_intermediate_predict_response(
                ["hello"], context.request_ids, "Intermediate Prediction success", 200, context
            )
            # Pushed at once: on the reply list before the handler goes on.
            seen_while_running.append(client.llen(LISTENER))
        return ["hello world "]

    serve(client, loaded(handler), [request("r1")])
    assert seen_while_running == [1, 2, 3]
    answer = replies(client)
    assert [r.body for r in answer] == [b"hello"] * 3 + [b"hello world "]
    assert b"".join(r.body for r in answer) == b"hellohellohellohello world "
    assert [r.more for r in answer] == [True, True, True, False]
    assert [r.headers.get("ts_stream_next") for r in answer] == ["true"] * 3 + ["false"]
    assert {r.id for r in answer} == {"r1"}
    assert all(r.status == 200 and r.error is None for r in answer)
    assert client.llen(INFLIGHT) == 0  # acknowledged with the final reply only


def test_pieces_keep_the_status_headers_and_content_type_the_handler_set(
    client: fakeredis.FakeRedis,
) -> None:
    def handler(data: list[Any], context: Context) -> list[Any]:
        context.set_response_status(201, "Made", idx=0)
        context.set_response_content_type(0, "application/json")
        context.set_response_header(0, "x-piece", "yes")
        send_intermediate_predict_response([{"token": 1}], context.request_ids, "ok", 200, context)
        return [{"token": 2}]

    serve(client, loaded(handler), [request("r1")])
    piece, final = replies(client)
    assert (piece.status, piece.reason, piece.content_type) == (201, "Made", "application/json")
    assert piece.headers == {"x-piece": "yes", "ts_stream_next": "true"}
    assert piece.body == b'{\n  "token": 1\n}'  # serialised as a final reply is
    assert final.headers == {"x-piece": "yes", "ts_stream_next": "false"}
    assert (final.more, final.body) == (False, b'{\n  "token": 2\n}')


def test_a_batch_streams_one_piece_per_request_to_each_reply_list(
    client: fakeredis.FakeRedis,
) -> None:
    other = keys.replies("api-2")

    def handler(data: list[Any], context: Context) -> list[str]:
        for step in range(2):
            pieces = [f"{d['body']}-{step}" for d in data]
            send_intermediate_predict_response(pieces, context.request_ids, "ok", 200, context)
        return [f"{d['body']}-end" for d in data]

    serve(client, loaded(handler), [request("a"), request("b", reply_to=other)])
    assert [(r.id, r.body, r.more) for r in replies(client)] == [
        ("a", b"a-0", True), ("a", b"a-1", True), ("a", b"a-end", False),
    ]  # fmt: skip
    assert [(r.id, r.body, r.more) for r in replies(client, other)] == [
        ("b", b"b-0", True), ("b", b"b-1", True), ("b", b"b-end", False),
    ]  # fmt: skip


def test_a_handler_that_does_not_stream_answers_as_before(client: fakeredis.FakeRedis) -> None:
    serve(client, loaded(lambda data, context: ["plain"]), [request("r1")])
    [reply] = replies(client)
    assert (reply.body, reply.more, reply.headers) == (b"plain", False, {})


def test_a_cancelled_stream_stops_the_handler_at_its_next_piece(
    client: fakeredis.FakeRedis,
) -> None:
    steps: list[int] = []

    def handler(data: list[Any], context: Context) -> list[str]:
        for step in range(100):
            steps.append(step)
            if step == 2:
                client.set(keys.cancel("r1"), b"1")  # the API: its client went away
            send_intermediate_predict_response(["tok"], context.request_ids, "ok", 200, context)
        return ["never"]

    serve(client, loaded(handler), [request("r1")])
    # The piece sent with the cancel key set is the last one; the next call raises.
    assert steps == [0, 1, 2, 3]
    answer = replies(client)
    assert [r.more for r in answer] == [True, True, True, False]
    assert (answer[-1].status, answer[-1].error) == (503, "Prediction failed")


def test_one_cancelled_request_of_a_batch_gets_no_more_pieces_the_others_do(
    client: fakeredis.FakeRedis,
) -> None:
    def handler(data: list[Any], context: Context) -> list[str]:
        send_intermediate_predict_response(["1", "1"], context.request_ids, "ok", 200, context)
        client.set(keys.cancel("a"), b"1")
        for _ in range(2):
            send_intermediate_predict_response(["2", "2"], context.request_ids, "ok", 200, context)
        return ["end", "end"]

    serve(client, loaded(handler), [request("a"), request("b")])
    by_id: dict[str, list[bytes]] = {}
    for reply in replies(client):
        by_id.setdefault(reply.id, []).append(reply.body)
    # "a": the piece whose pipeline saw the key, then only the final reply.
    assert by_id == {"a": [b"1", b"2", b"end"], "b": [b"1", b"2", b"2", b"end"]}


def test_a_handler_error_mid_stream_is_the_final_reply(client: fakeredis.FakeRedis) -> None:
    def handler(data: list[Any], context: Context) -> list[str]:
        send_intermediate_predict_response(["tok"], context.request_ids, "ok", 200, context)
        raise RuntimeError("the model broke")

    serve(client, loaded(handler), [request("r1")])
    piece, final = replies(client)
    assert (piece.body, piece.more) == (b"tok", True)
    assert (final.status, final.error, final.more) == (503, "Prediction failed", False)


def test_an_intermediate_error_code_ends_every_stream_of_the_batch(
    client: fakeredis.FakeRedis,
) -> None:
    def handler(data: list[Any], context: Context) -> list[str]:
        send_intermediate_predict_response(["x"], context.request_ids, "bad input", 400, context)
        send_intermediate_predict_response(["y"], context.request_ids, "ok", 200, context)
        return ["z"]

    serve(client, loaded(handler), [request("r1")])
    first, *rest = replies(client)
    assert (first.status, first.error, first.more) == (400, "bad input", False)
    # After its stream ended, the request gets nothing but the final reply (to nobody).
    assert [r.error for r in rest] == ["Prediction failed"]


def test_pieces_outside_an_online_batch_are_dropped(client: fakeredis.FakeRedis) -> None:
    def handler(data: list[Any], context: Context) -> list[str]:
        send_intermediate_predict_response(["tok"], context.request_ids, "ok", 200, context)
        return ["final"]

    # A batch job or a Celery task: the model runs without a reply stream.
    [reply] = loaded(handler).handle([InferenceRequest("r1", {}, [])])
    assert (reply.body, reply.headers) == (b"final", {})


def test_stream_requests_are_never_batched(client: fakeredis.FakeRedis) -> None:
    batches: list[list[str]] = []

    def handler(data: list[Any], context: Context) -> list[str]:
        assert context.request_ids is not None
        batches.append(list(context.request_ids.values()))
        return ["ok"] * len(data)

    serve(client, loaded(handler), [request("p1"), request("s1", "stream"), request("p2")])
    assert batches == [["p1", "p2"], ["s1"]]
    assert sorted(r.id for r in replies(client)) == ["p1", "p2", "s1"]


def test_the_stream_flags_travel_in_frames_and_old_frames_parse() -> None:
    piece = Reply(status=200, body=b"tok", more=True).to("r1")
    assert Reply.parse(piece.frame()) == piece
    final = Reply(status=200, body=b"end").to("r1")
    assert b'"more"' not in final.frame()  # a non-streamed reply's frame is unchanged
    old = pack({"id": "r1", "status": 200, "headers": {}}, b"x")  # a worker before streams
    assert Reply.parse(old).more is False
    with pytest.raises(FrameError, match="more"):
        Reply.parse(pack({"status": 200, "more": "yes"}))
    streamed = request("s1", "stream")
    assert Request.parse(streamed.frame()) == streamed


def test_each_piece_restarts_the_response_timeout(
    client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(observed, "now", lambda: clock[0])
    record = WorkerRecord("9000", "m", "1.0", "h1", 1, -1, WorkerState.READY, 1000.0, since=1000.0)
    reporter = Reporter(client, record)
    published: list[tuple[WorkerState, float]] = []

    def handler(data: list[Any], context: Context) -> list[str]:
        for _ in range(2):
            clock[0] += 100.0  # each token takes 100 s: the batch runs past 120 s
            send_intermediate_predict_response(["tok"], context.request_ids, "ok", 200, context)
            # What the heartbeat publishes now (and keeps, as its beat does).
            reporter._record = beat = reporter._beat_record(memory=0)
            published.append((beat.state, beat.since))
        return ["end"]

    frames = [request("r1").frame()]
    runner = ModelRunner(loaded(handler), reporter.busy, progress=reporter.progress)
    OnlineLoop(client, runner, batcher=None, inflight=INFLIGHT).serve(frames)  # type: ignore[arg-type]
    # The supervisor's response_timeout counts from the latest piece, not the batch start.
    assert published == [(WorkerState.BUSY, 1100.0), (WorkerState.BUSY, 1200.0)]
    reporter.progress()  # idle: nothing restarts
    assert reporter._beat_record(memory=0).state is WorkerState.READY
