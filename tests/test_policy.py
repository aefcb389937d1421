"""Request classes from ChatKit envelopes, and workflow policies: pure functions."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from gateway.chatkit import (
    Envelope,
    RequestClass,
    classify,
    error_event,
    may_be_transcribe,
    parse_envelope,
    requested_model,
)
from gateway.errors import BadRequest, ConfigError, PayloadTooLarge
from gateway.policy import DEFAULT_LIMITS, Policy, parse_spec
from gateway.ratelimit import Decision, Outcome, rejection
from gateway.settings import load_settings

BOUNDS = {"max_bytes": 1024, "max_transcribe_bytes": 4096}


@pytest.mark.parametrize(
    ("request_type", "cls"),
    [
        ("threads.create", RequestClass.TURN),
        ("threads.add_user_message", RequestClass.TURN),
        ("threads.retry_after_item", RequestClass.TURN),
        ("threads.add_client_tool_output", RequestClass.TURN),
        ("threads.add_structured_input", RequestClass.TURN),
        ("threads.custom_action", RequestClass.TURN),
        ("threads.get_by_id", RequestClass.READ),
        ("threads.list", RequestClass.READ),
        ("items.list", RequestClass.READ),
        ("threads.update", RequestClass.WRITE),
        ("threads.delete", RequestClass.WRITE),
        ("items.feedback", RequestClass.WRITE),
        ("attachments.delete", RequestClass.WRITE),
        ("threads.sync_custom_action", RequestClass.WRITE),  # app code, but no agent run
        ("attachments.create", RequestClass.UPLOAD),
        ("input.transcribe", RequestClass.TRANSCRIBE),
        ("threads.from_a_newer_chatkit", RequestClass.TURN),  # unknown: the dearest class
        ("", RequestClass.TURN),
    ],
)
def test_each_type_has_its_class(request_type: str, cls: RequestClass) -> None:
    assert classify(request_type) is cls


def test_an_envelope_is_parsed_once_into_its_type_class_and_params() -> None:
    body = b'{"type": "threads.create", "params": {"input": {"inference_options": {"model": "m"}}}}'
    envelope = parse_envelope(body, **BOUNDS)
    assert (envelope.type, envelope.cls, envelope.model) == (
        "threads.create",
        RequestClass.TURN,
        "m",
    )
    assert parse_envelope(b'{"type": "threads.list"}', **BOUNDS).params == {}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe",  # not UTF-8
        # UTF-16 and an encoded lone surrogate: json.loads of bytes takes both.
        '{"type": "threads.list"}'.encode("utf-16"),
        b'{"type": "threads.list", "x": "\xed\xa0\x80"}',
        b"null",
        b'"threads.list"',
        b'{"type": null}',
        b'{"type": ""}',
        b'{"type": ["threads.list"]}',
        b"[" * 50_000 + b"]" * 50_000,  # deeper than the parser recurses
    ],
)
def test_what_is_not_an_envelope_is_a_400(body: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_envelope(body, **BOUNDS)
    assert caught.value.code == "invalid_json"


def test_transcribe_has_its_own_bound() -> None:
    audio = json.dumps({"type": "input.transcribe", "params": {"audio_base64": "A" * 2000}})
    assert parse_envelope(audio.encode(), **BOUNDS).cls is RequestClass.TRANSCRIBE
    listing = json.dumps({"type": "threads.list", "params": {"pad": "A" * 2000}})
    with pytest.raises(PayloadTooLarge):
        parse_envelope(listing.encode(), **BOUNDS)


def test_a_declared_size_is_read_only_when_it_is_a_number() -> None:
    def size(value: object) -> object:
        body = json.dumps({"type": "attachments.create", "params": {"size": value}})
        return parse_envelope(body.encode(), **BOUNDS).declared_size

    assert size(2048) == 2048
    assert size(True) is None
    assert size("2048") is None


def test_only_a_turn_names_a_model_for_the_allow_list() -> None:
    def envelope(request_type: str, model: object) -> Envelope:
        options = {} if model is None else {"model": model}
        params = {"input": {"inference_options": options}}
        return parse_envelope(
            json.dumps({"type": request_type, "params": params}).encode(), **BOUNDS
        )

    assert requested_model(envelope("threads.create", "a")) == "a"
    assert requested_model(envelope("threads.add_user_message", "")) == ""
    assert requested_model(envelope("threads.custom_something", "z")) == "z"  # unknown: a turn
    assert requested_model(envelope("threads.create", None)) is None  # the server's default
    assert requested_model(envelope("threads.list", "z")) is None  # a read runs no model
    assert requested_model(envelope("threads.create", ["a"])) is None  # not a name


@pytest.mark.parametrize(
    "params",
    [{"input": "x"}, {"input": {"inference_options": ["m"]}}, {"input": None}, {}],
)
def test_a_turn_whose_params_have_another_shape_names_no_model(params: object) -> None:
    body = json.dumps({"type": "threads.create", "params": params}).encode()
    assert requested_model(parse_envelope(body, **BOUNDS)) is None


def test_a_refused_model_answers_400_naming_the_field() -> None:
    error = rejection(Decision(Outcome.MODEL_NOT_ALLOWED), window_seconds=60)
    assert isinstance(error, BadRequest)
    assert (error.status, error.code, error.param) == (
        400,
        "model_not_allowed",
        "params.input.inference_options.model",
    )


def test_an_error_event_is_one_chatkit_stream_event() -> None:
    raw = error_event("Rate limit reached.")
    assert raw.startswith(b"data: ")
    assert raw.endswith(b"\n\n")
    assert json.loads(raw[6:]) == {
        "type": "error",
        "code": "custom",
        "message": "Rate limit reached.",
        "allow_retry": True,
    }


def test_the_default_policy_limits_every_class_but_turns_per_session() -> None:
    windows = Policy().windows()
    assert "turn" not in windows  # turns: the session's own limit
    assert {cls: parse_spec(spec)[0].limit for cls, spec in windows.items()} == {
        cls.value: DEFAULT_LIMITS[cls]["session"]["1m"]
        for cls in RequestClass
        if cls is not RequestClass.TURN
    }


def test_a_policy_compiles_to_the_windows_the_store_reads() -> None:
    policy = Policy.model_validate(
        {"limits": {"turn": {"user": {"1d": 200, "1h": 30}, "session": {"1m": 5}}}}
    )
    assert policy.windows()["turn"] == "s60:5,u3600:30,u86400:200"
    assert [(w.scope, w.seconds, w.limit) for w in parse_spec("s60:5,u86400:200")] == [
        ("session", 60, 5),
        ("user", 86400, 200),
    ]


@pytest.mark.parametrize(
    ("policy", "named"),
    [
        ({"session_limit_counts": "reads"}, "GATEWAY_WORKFLOWS.wf_x.policy.session_limit_counts"),
        ({"limits": {"turns": {}}}, "GATEWAY_WORKFLOWS.wf_x.policy.limits.turns"),
        ({"limits": {"turn": {"team": {}}}}, "GATEWAY_WORKFLOWS.wf_x.policy.limits.turn.team"),
        ({"limits": {"turn": {"user": {"1w": 1}}}}, "GATEWAY_WORKFLOWS.wf_x.policy.limits.turn"),
        ({"limits": {"read": {"user": {"1d": 0}}}}, "GATEWAY_WORKFLOWS.wf_x.policy.limits"),
        ({"models": []}, "GATEWAY_WORKFLOWS.wf_x.policy.models"),
        ({"limit_answer": "html"}, "GATEWAY_WORKFLOWS.wf_x.policy.limit_answer"),
        ({"budget": 3}, "GATEWAY_WORKFLOWS.wf_x.policy.budget"),
    ],
)
def test_an_invalid_policy_stops_start_up_naming_the_workflow_and_field(
    policy: dict[str, object], named: str
) -> None:
    env = {
        "GATEWAY_UPSTREAM_URL": "none",
        "GATEWAY_ISSUER_API_KEYS": "k" * 24,
        "GATEWAY_WORKFLOWS": json.dumps(
            {"wf_x": {"upstream": "http://chatkit:8001/chatkit", "policy": policy}}
        ),
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    [line] = str(caught.value).splitlines()
    assert line.startswith(named)


def test_the_documented_policies_load() -> None:
    # docs/policy.md shows a policy as JSON and as TOML: both must be valid as written.
    page = (Path(__file__).parent.parent / "docs" / "policy.md").read_text()
    json_block = page.split("```json\n", 1)[1].split("```", 1)[0]
    toml_block = page.split("```toml\n", 1)[1].split("```", 1)[0]
    base = {"GATEWAY_UPSTREAM_URL": "none", "GATEWAY_ISSUER_API_KEYS": "k" * 24}
    from_json = load_settings({**base, "GATEWAY_WORKFLOWS": json_block})
    policy = from_json.workflows["wf_support"].policy
    assert policy.windows()["turn"] == "u86400:200"
    assert policy.models == ("gpt-5-mini",)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(toml_block)
    try:
        from_toml = load_settings({**base, "GATEWAY_CONFIG_FILE": fh.name})
    finally:
        os.unlink(fh.name)
    toml_policy = from_toml.workflows["wf_support"].policy
    assert toml_policy.windows() == {**policy.windows(), "transcribe": "s60:10"}
    assert toml_policy.limit_answer == "chatkit"


# chatkit.types warns on import about its own widget classes.
@pytest.mark.filterwarnings("ignore:Direct usage of named widget classes:DeprecationWarning")
def test_a_repeated_type_is_classed_as_the_chatkit_sdk_reads_it() -> None:
    # A client must not be counted as a read while the server runs a turn: both
    # parsers keep the last of repeated keys, so the classes agree.
    # The ChatKit SDK is dev-only (it lifts starlette and PyJWT above the
    # gateway's floors), so the lowest-versions run has no SDK to agree with.
    types = pytest.importorskip("chatkit.types")
    from pydantic import TypeAdapter

    request_type = types.ChatKitReq

    body = b'{"type": "threads.list", "params": {}, "type": "threads.create", "params": {"input":'
    body += b' {"content": [], "attachments": [], "inference_options": {}}}}'
    assert parse_envelope(body, **BOUNDS).cls is RequestClass.TURN
    assert TypeAdapter(request_type).validate_json(body).type == "threads.create"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b'{"type":"input.transcribe","params":{"audio_base64":"', True),
        (b' {\n  "type" : "input.transcribe", ', True),  # whitespace anywhere JSON allows
        (b'{"params":{"audio_base64":"AAAA', False),  # type later: held to the small bound
        (b'{"type":"threads.list"', False),
        (b'{"type":"input.transcribe_v2"', False),  # another type: the ordinary bound
    ],
)
def test_which_bodies_may_grow_past_the_envelope_bound(head: bytes, expected: bool) -> None:
    assert may_be_transcribe(head) is expected
