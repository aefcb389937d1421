"""Reading a model's usage from its answer, and the event framing under it.

The framing is checked against the official openai SDK's own decoder: the
same stream, cut into chunks at every possible place, gives the same events'
data in both.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from openai._streaming import SSEDecoder

from gateway.model.routes import prepare
from gateway.model.sse import EventSplitter, event_data
from gateway.model.usage import CHAT, RESPONSES, StreamMeter, Usage, body_usage, usage_from

STREAMS = [
    # LF, CRLF and CR line ends, comments, a field without a colon, multi-line data
    b"event: a\ndata: one\n\n: comment\ndata: two\ndata: lines\n\n",
    b"data: crlf\r\n\r\ndata:no-space\r\n\r\n",
    b"data: cr\r\rdata: next\r\r",
    b'id: 1\nretry: 5\ndata\n\ndata: {"x": 1}\n\n',
]


def sdk_data(stream: bytes) -> list[str]:
    return [event.data for event in SSEDecoder().iter_bytes(iter([stream])) if event.data]


def split_data(chunks: list[bytes]) -> list[str]:
    splitter = EventSplitter()
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    events += splitter.close()
    return [d.decode() for event in events if (d := event_data(event))]


@pytest.mark.parametrize("stream", STREAMS)
def test_events_match_the_official_decoder_however_the_bytes_are_cut(stream: bytes) -> None:
    expected = sdk_data(stream)
    assert split_data([stream]) == expected
    for cut in range(1, len(stream)):
        assert split_data([stream[:cut], stream[cut:]]) == expected, cut
    assert split_data([bytes([b]) for b in stream]) == expected


def test_an_event_cut_short_is_left_over_not_invented() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: whole\n\ndata: half") == [b"data: whole\n\n"]
    assert splitter.rest() == b"data: half"


def responses_stream(final: str, usage: dict[str, object] | None) -> bytes:
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {"usage": None}},
        {"type": "response.output_text.delta", "delta": 'says "usage"'},
        {"type": final, "response": {"usage": usage}},
    ]
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


RESPONSES_USAGE = {
    "input_tokens": 120,
    "input_tokens_details": {"cached_tokens": 100},
    "output_tokens": 30,
    "output_tokens_details": {"reasoning_tokens": 12},
    "total_tokens": 150,
}


@pytest.mark.parametrize("final", ["response.completed", "response.incomplete", "response.failed"])
def test_responses_usage_comes_from_the_last_event_and_the_stream_passes_unchanged(
    final: str,
) -> None:
    stream = responses_stream(final, RESPONSES_USAGE)
    meter = StreamMeter(RESPONSES)
    rng = random.Random(final)
    passed = b""
    at = 0
    while at < len(stream):
        step = rng.randint(1, 40)
        passed += meter.feed(stream[at : at + step])
        at += step
    assert passed + meter.rest() == stream
    assert meter.usage == Usage(120, 100, 30)
    assert meter.usage.total_tokens == 150
    assert meter.usage.uncached_input_tokens == 20


def test_a_responses_stream_without_its_last_event_has_no_usage() -> None:
    stream = responses_stream("response.completed", RESPONSES_USAGE)
    cut = stream[: stream.index(b"event: response.completed")]
    meter = StreamMeter(RESPONSES)
    meter.feed(cut)
    assert meter.usage is None


def chat_stream() -> list[bytes]:
    def chunk(**body: object) -> bytes:
        return f"data: {json.dumps({'object': 'chat.completion.chunk', **body})}\n\n".encode()

    return [
        chunk(choices=[{"index": 0, "delta": {"content": "hi"}}], usage=None),
        chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}], usage=None),
        chunk(
            choices=[],
            usage={
                "prompt_tokens": 9,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens": 2,
                "total_tokens": 11,
            },
        ),
        b"data: [DONE]\n\n",
    ]


@pytest.mark.parametrize("hide", [True, False])
def test_the_chat_usage_chunk_is_read_and_hidden_only_when_the_gateway_asked_for_it(
    hide: bool,
) -> None:
    events = chat_stream()
    stream = b"".join(events)
    meter = StreamMeter(CHAT, hide_usage=hide)
    passed = b"".join(meter.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    passed += meter.rest()
    assert meter.usage == Usage(9, 0, 2)
    assert passed == (b"".join(events[:2] + events[3:]) if hide else stream)


@pytest.mark.parametrize(
    ("route", "usage", "expected"),
    [
        (RESPONSES, RESPONSES_USAGE, Usage(120, 100, 30)),
        (CHAT, {"prompt_tokens": 5, "completion_tokens": 1}, Usage(5, 0, 1)),
        # cached input larger than input (never seen, never trusted): capped
        (CHAT, {"prompt_tokens": 5, "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 9}}, Usage(5, 5, 1)),
        (RESPONSES, {"input_tokens": -1, "output_tokens": 1}, None),  # not a count
        (RESPONSES, {"input_tokens": True, "output_tokens": 1}, None),  # not a count
        (CHAT, None, None),
    ],
)  # fmt: skip
def test_usage_objects(route: str, usage: object, expected: Usage | None) -> None:
    assert usage_from(route, usage) == expected


def test_a_whole_answer_s_usage_is_its_body_s() -> None:
    body = json.dumps({"object": "response", "usage": RESPONSES_USAGE}).encode()
    assert body_usage(RESPONSES, body) == Usage(120, 100, 30)
    assert body_usage(RESPONSES, b"not json") is None


@pytest.mark.parametrize(
    ("body", "forwarded", "hidden"),
    [
        # no stream: as sent
        ({"model": "m", "messages": []}, None, False),
        # the caller asked for usage: as sent
        ({"model": "m", "stream": True, "stream_options": {"include_usage": True}}, None, False),
        # the caller did not ask: the gateway asks, and hides the chunk
        ({"model": "m", "stream": True}, {"include_usage": True}, True),
        # an explicit false is overridden (and the chunk hidden)
        ({"model": "m", "stream": True, "stream_options": {"include_usage": False}},
         {"include_usage": True}, True),
    ],
)  # fmt: skip
def test_chat_requests_ask_for_usage_when_the_caller_did_not(
    body: dict[str, object], forwarded: dict[str, object] | None, hidden: bool
) -> None:
    raw = json.dumps(body).encode()
    request = prepare(CHAT, raw)
    assert request.hide_usage is hidden
    if forwarded is None:
        assert request.body == raw
    else:
        assert json.loads(request.body)["stream_options"] == forwarded


@pytest.mark.parametrize("body", [b"[]", b"{", b'{"input": "x"}', b'{"model": 5}'])
def test_a_model_request_without_a_model_is_refused(body: bytes) -> None:
    from gateway.errors import BadRequest

    with pytest.raises(BadRequest):
        prepare(RESPONSES, body)
