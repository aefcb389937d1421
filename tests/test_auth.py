"""Pure decisions on the hot path: parsing the bearer secret and hashing it.

Everything here is a function of its arguments, so the tables below are the
specification: one row per case, a comment saying why the row exists.
"""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from gateway.auth import MAX_SECRET_BYTES, SecretHasher, bearer_secret, constant_time_equal
from gateway.errors import AuthError

Headers = list[tuple[bytes, bytes]]
SECRET = b"ek_68f1c2d3e4_Zm9vYmFy-._~+/="


def _auth(*values: bytes) -> Headers:
    """ASGI headers (lower-case names) with one Authorization header per value."""
    return [(b"host", b"gateway"), *((b"authorization", v) for v in values)]


# -- bearer parsing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "secret"),
    [
        (_auth(b"Bearer " + SECRET), SECRET),  # the canonical form
        (_auth(b"bearer " + SECRET), SECRET),  # the scheme is case-insensitive (RFC 9110 11.1)
        (_auth(b"BEARER " + SECRET), SECRET),
        (_auth(b"BeArEr " + SECRET), SECRET),
        (_auth(b"Bearer   " + SECRET + b"  "), SECRET),  # surrounding spaces are not the token
        (_auth(b"Bearer " + b"a" * MAX_SECRET_BYTES), b"a" * MAX_SECRET_BYTES),  # at the cap
        (_auth(b"Bearer ek_token_123"), b"ek_token_123"),  # the spec's example secret
    ],
)
def test_bearer_secret_is_extracted(headers: Headers, secret: bytes) -> None:
    assert bearer_secret(headers) == secret


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ([(b"host", b"gateway")], "missing_client_secret"),  # no Authorization at all
        ([], "missing_client_secret"),
        (_auth(b"Basic " + SECRET), "invalid_authorization"),  # wrong scheme
        (_auth(SECRET), "invalid_authorization"),  # no scheme
        (_auth(b"Bearer"), "invalid_authorization"),  # scheme, no token
        (_auth(b"Bearer "), "invalid_authorization"),  # empty token
        (_auth(b"Bearer    "), "invalid_authorization"),  # only spaces
        (_auth(b"Bearer" + SECRET), "invalid_authorization"),  # no separating space
        (_auth(b"Bearer\t" + SECRET), "invalid_authorization"),  # tab is not the separator
        (_auth(b"Bearer " + SECRET, b"Bearer " + SECRET), "invalid_authorization"),  # duplicate
        (_auth(b"Bearer " + SECRET, b"Basic x"), "invalid_authorization"),  # two, one bad
        (_auth(b"Bearer ek_\xff\xfe"), "invalid_authorization"),  # non-ASCII bytes
        (_auth(b"Bearer ek_a\x00b"), "invalid_authorization"),  # control byte
        (_auth(b"Bearer ek_a b"), "invalid_authorization"),  # two tokens
        (_auth(b'Bearer ek_"quoted"'), "invalid_authorization"),  # outside b64token
        (_auth(b"Bearer ek_{tag}"), "invalid_authorization"),  # braces would touch key tags
        (_auth(b"Bearer " + b"a" * (MAX_SECRET_BYTES + 1)), "invalid_authorization"),  # too long
    ],
)
def test_bad_authorization_is_refused(headers: Headers, code: str) -> None:
    with pytest.raises(AuthError) as caught:
        bearer_secret(headers)
    assert caught.value.status == 401
    assert caught.value.code == code
    # The message tells the caller what to send, never echoes what they sent.
    assert SECRET.decode() not in caught.value.message
    assert "ek_" not in caught.value.message


def test_other_headers_named_like_authorization_are_ignored() -> None:
    headers = [(b"proxy-authorization", b"Bearer nope"), (b"x-authorization", b"Bearer no")]
    with pytest.raises(AuthError) as caught:
        bearer_secret(headers)
    assert caught.value.code == "missing_client_secret"


# -- hashing -------------------------------------------------------------------------


def test_peppered_hash_is_hmac_sha256_under_the_pepper() -> None:
    pepper = b"a-long-operator-chosen-pepper"
    expected = hmac.new(pepper, SECRET, hashlib.sha256).hexdigest()
    assert SecretHasher(pepper)(SECRET) == expected


def test_unpeppered_hash_is_a_keyed_hash_not_plain_sha256() -> None:
    digest = SecretHasher(None)(SECRET)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest != hashlib.sha256(SECRET).hexdigest()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (SecretHasher(None), SecretHasher(b"pepper-one")),  # a pepper changes every hash
        (SecretHasher(b"pepper-one"), SecretHasher(b"pepper-two")),  # and each pepper differs
    ],
)
def test_hashes_differ_between_keys(a: SecretHasher, b: SecretHasher) -> None:
    assert a(SECRET) != b(SECRET)


def test_hash_is_deterministic_and_separates_secrets() -> None:
    hasher = SecretHasher(b"pepper")
    assert hasher(SECRET) == SecretHasher(b"pepper")(SECRET)  # every replica agrees
    assert hasher(SECRET) != hasher(SECRET + b"x")


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("token-aaaaaaaaaaaa", "token-aaaaaaaaaaaa", True),
        ("token-aaaaaaaaaaaa", "token-aaaaaaaaaaab", False),  # last byte differs
        ("token-aaaaaaaaaaaa", "token-aaa", False),  # prefix only
        (b"bytes-token", "bytes-token", True),  # str and bytes compare by content
    ],
)
def test_constant_time_equal(a: str | bytes, b: str | bytes, equal: bool) -> None:
    assert constant_time_equal(a, b) is equal
