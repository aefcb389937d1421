"""Where each piece of state lives in Redis.

Key layout (``p`` is the configured prefix, ``h`` the secret's HMAC):

    p:{h}:s       hash: sid, user, uh (user hash), exp, lim,  TTL exp + retention
                  wf, wv (workflow id and version, if any),
                  iss (1 if the gateway issued the session)
    p:{h}:w       zset: the session's sliding window           TTL window
    p:{h}:r       revoked flag                                  TTL exp + retention
    p:{h}:w:C:L   zset: the session's window of class C, L seconds  TTL L
    p:{u:U}:w     zset: user U's window (standalone Redis only) TTL window
    p:{u:U}:ix    zset: U's active sessions, sid -> expires_at  TTL last exp + retention
    p:{u:U}:ie    hash: sid -> JSON {a app, w workflow, h hash, c created, e exp}
    p:{u:U}:ban   U may not get sessions while it exists        TTL the ban
    p:{app:A}:c   zset: app A's creates, sid -> µs              TTL window
    p:{app:A}:a   zset: app A's sessions, sid -> expires_at     TTL last exp + retention
    p:{sid:S}:h   session id S -> h                             TTL exp + retention
    p:{sid:S}:r   session id S revoked (cancel before/without registration)
    p:{sid:S}:d   issued session S's ChatSession JSON, no secret  TTL exp + retention
    p:{mt:T}      hash: a model token's grant (h, sid, user,    TTL the session's
                  wf, rid, exp); T is the token's HMAC          expiry, then the grace
                  (a tagged token's: p:{t:T}:mt:h, see below)
    p:{b:W:U}:c   zset: user U's model-call charges in          TTL a day + lease
                  workflow W (gateway.model.budgets)
    p:{b:W:U}:r   hash: their calls in flight (reservations)    TTL a day + lease
    p:{b:W:U}:t   hash: running sums per window, per user and   TTL a day + lease
                  per session (see lua/budget.lua)
    p:audit       stream of revocations, capped
    p:revocations pub/sub channel of revoked hashes

Every key of one secret shares the hash tag ``{h}``, so the admission script
runs unchanged on Redis Cluster. A user's keys share ``{u:U}`` (U the user
hash) and an app's ``{app:A}``, so the create-time checks are one script per
slot there too.

A secret the gateway issued carries its user's slot tag T (``ek_T_...``,
:meth:`gateway.auth.SecretHasher.user_tag`), kept in its hash as ``T_h``. Its
keys take the tag instead, and so do its user's class windows::

    p:{t:T}:h:s, p:{t:T}:h:w, ...   as above, for the secret T_h
    p:{t:T}:u:U:C:L                 zset: user U's window of class C, L s
    p:{t:T}:mt:h                    a model token's grant (``ckmt_T_...``),
                                    written by the admission of its turn

so one script on one slot sees a session and its user's windows, on Cluster
too. A forged tag finds no session in its slot: an unknown secret.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from gateway.auth import split_tag


class SecretKeys(NamedTuple):
    """The keys of one secret; they share a hash slot."""

    session: str
    window: str
    revoked: str


class SessionIdKeys(NamedTuple):
    """The keys of one session id; they share a hash slot."""

    secret_hash: str
    revoked: str
    document: str


class UserKeys(NamedTuple):
    """The keys of one user's session index; they share a hash slot."""

    sessions: str
    entries: str
    ban: str


class AppKeys(NamedTuple):
    """The keys of one app; they share a hash slot."""

    creates: str
    active: str


def user_hash(user: str) -> str:
    """A user's window key holds a digest, not the user name itself."""
    return hashlib.sha256(user.encode()).hexdigest()[:32]


class KeyLayout:
    """Key names under one prefix."""

    __slots__ = ("audit", "channel", "prefix", "user_prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        # The admission script appends the user hash and "}:w".
        self.user_prefix = f"{prefix}:{{u:"
        self.channel = f"{prefix}:revocations"
        self.audit = f"{prefix}:audit"

    def secret(self, secret_hash: str) -> SecretKeys:
        tag, digest = split_tag(secret_hash)
        base = f"{self.prefix}:{{t:{tag}}}:{digest}" if tag else f"{self.prefix}:{{{digest}}}"
        return SecretKeys(f"{base}:s", f"{base}:w", f"{base}:r")

    def model_token(self, token_hash: str) -> str:
        """A model token's grant; a tagged token's (given to a tagged
        secret's turn) in its session's slot, so admission can write it."""
        tag, digest = split_tag(token_hash)
        if tag:
            return f"{self.prefix}:{{t:{tag}}}:mt:{digest}"
        return f"{self.prefix}:{{mt:{token_hash}}}"

    def budget(self, workflow_id: str, user: str) -> tuple[str, str, str]:
        """A user's budget keys in a workflow (charges, reservations, sums):
        one hash tag, so the budget scripts run on one node of a cluster."""
        base = f"{self.prefix}:{{b:{workflow_id}:{user_hash(user)}}}"
        return f"{base}:c", f"{base}:r", f"{base}:t"

    def class_user_prefix(self, secret_hash: str) -> str:
        """Where the user's class windows of this secret live ("" for none).

        Only tagged secrets have them: their user's windows share their slot.
        The admission script appends ``<user hash>:<class>:<seconds>``.
        """
        tag, _ = split_tag(secret_hash)
        return f"{self.prefix}:{{t:{tag}}}:u:" if tag else ""

    def user(self, user: str) -> UserKeys:
        base = f"{self.user_prefix}{user_hash(user)}}}"
        return UserKeys(f"{base}:ix", f"{base}:ie", f"{base}:ban")

    def app(self, name: str) -> AppKeys:
        base = f"{self.prefix}:{{app:{name}}}"
        return AppKeys(f"{base}:c", f"{base}:a")

    def session_id(self, session_id: str) -> SessionIdKeys:
        base = f"{self.prefix}:{{sid:{session_id}}}"
        return SessionIdKeys(f"{base}:h", f"{base}:r", f"{base}:d")
