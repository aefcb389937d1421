"""Reading JSON from outside: every failure is one ValueError, no text that cannot be encoded."""

from __future__ import annotations

import pytest

from gateway.jsonbody import Unreadable, is_text, loads

DEEP = b"[" * 990 + b"]" * 990


@pytest.mark.parametrize(
    "data",
    [
        DEEP,  # RecursionError inside json.loads
        b"\xff",  # not UTF-8
        b'"\xed\xa0\x80"',  # a surrogate written as UTF-8 (json.loads would take it)
        '"x"'.encode("utf-16"),  # JSON, but not in UTF-8
        b"{",  # not JSON
        b"",
        b'{"a": 1, "a": 2}',  # a repeated key
        b'[{"a": {"b": 1, "b": 1}}]',
    ],
)
def test_every_way_json_fails_is_one_value_error(data: bytes) -> None:
    with pytest.raises(Unreadable):
        loads(data)


def test_lone_surrogates_are_not_text() -> None:
    assert is_text("\N{GRINNING FACE}")
    assert not is_text("\ud800")
    assert not is_text("a\udfff")
