"""The Redis store: every replica shares one registry, revocation set and window.

Admission is delegated to the batcher (one EVALSHA per request), the
revocation feed to pub/sub; this module holds the registry, revocation,
audit and operator reads, each a short pipeline.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from typing import Any

from redis.asyncio.cluster import RedisCluster

from gateway.ratelimit import Decision
from gateway.store.base import (
    AdmitRequest,
    AuditEntry,
    IssuedSession,
    RevokeResult,
    SessionInfo,
    SessionRecord,
    Store,
)
from gateway.store.redis.batcher import AdmissionBatcher
from gateway.store.redis.client import Client, call, idempotent, text
from gateway.store.redis.feed import PUBSUB_PING_SECONDS, RevocationFeed
from gateway.store.redis.keys import KeyLayout, user_hash

AUDIT_MAXLEN = 10_000


class RedisStore(Store):
    name = "redis"

    def __init__(
        self,
        client: Client,
        *,
        prefix: str = "ckg",
        window_seconds: int = 60,
        retention_seconds: int = 3600,
        revocation_ttl_seconds: int = 86400,
        timeout: float = 2.0,
        pubsub_url: str,
        ping_seconds: float = PUBSUB_PING_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self.keys = KeyLayout(prefix)
        self._window_us = window_seconds * 1_000_000
        self._retention = retention_seconds
        self._revocation_ttl = revocation_ttl_seconds
        # The clock only sets TTLs (expiry is checked against Redis TIME).
        self._clock = clock
        self._batcher = AdmissionBatcher(
            client, keys=self.keys, window_seconds=window_seconds, timeout=timeout
        )
        self._feed = RevocationFeed(
            pubsub_url, self.keys.channel, ping_seconds=ping_seconds, client=client
        )

    # -- admission (hot path) -----------------------------------------------

    def admit(self, request: AdmitRequest) -> Coroutine[Any, Any, Decision]:
        # The batcher's coroutine itself, not one wrapped in another frame:
        # this runs for every proxied request.
        return self._batcher.admit(request)

    # -- registry -------------------------------------------------------------

    async def register(self, record: SessionRecord) -> bool:
        skey = self.keys.secret(record.secret_hash).session
        hkey, rkey, dkey = self.keys.session_id(record.session_id)
        keep_until_ms = (record.expires_at + self._retention) * 1000

        async def write() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            fields: dict[str, str | int] = {
                "sid": record.session_id,
                "user": record.user,
                "exp": record.expires_at,
                "lim": record.limit,
            }
            if record.user:  # no user, no user window (the API requires one)
                fields["uh"] = user_hash(record.user)
            # Absent fields read as empty (admit.lua), so unset ones cost nothing.
            if record.workflow_id:
                fields["wf"] = record.workflow_id
            if record.workflow_version:
                fields["wv"] = record.workflow_version
            if record.issued:
                fields["iss"] = 1
            pipe.hset(skey, mapping=fields)  # type: ignore[arg-type]
            pipe.pexpireat(skey, keep_until_ms)
            pipe.set(hkey, record.secret_hash, pxat=keep_until_ms)
            if record.issued:
                pipe.set(dkey, record.document, pxat=keep_until_ms)
            # Read after writing: a cancel that raced ahead wrote its flag
            # first and then looks for this mapping, so one of us sees the other.
            pipe.exists(rkey)
            return await pipe.execute()

        replies = await idempotent(write)
        born_revoked = bool(replies[-1])
        if born_revoked:
            await self._revoke_hash(record.secret_hash, record.expires_at)
        return born_revoked

    async def secret_hash_for(self, session_id: str) -> str | None:
        hkey = self.keys.session_id(session_id).secret_hash
        value = await call(lambda: self._client.get(hkey))
        return text(value)

    async def issued_session(self, session_id: str) -> IssuedSession | None:
        hkey, sid_rkey, dkey = self.keys.session_id(session_id)

        async def by_id() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(dkey)
            pipe.get(hkey)
            pipe.exists(sid_rkey)
            return await pipe.execute()

        document, raw_hash, sid_revoked = await call(by_id)
        secret_hash = text(raw_hash)
        if document is None or secret_hash is None:
            return None
        skey, _, rkey = self.keys.secret(secret_hash)

        async def by_secret() -> list[Any]:
            # Another hash slot than the id's keys: a second round trip.
            pipe = self._client.pipeline(transaction=False)
            pipe.hget(skey, "exp")
            pipe.exists(rkey)
            return await pipe.execute()

        exp, revoked = await call(by_secret)
        if exp is None:
            return None
        return IssuedSession(
            document=bytes(document),
            secret_hash=secret_hash,
            expires_at=int(exp),
            revoked=bool(revoked or sid_revoked),
        )

    # -- revocation -------------------------------------------------------------

    async def _revoke_hash(self, secret_hash: str, expires_at: int | None) -> bool:
        """Set the revoked flag; True if it was newly set."""
        rkey = self.keys.secret(secret_hash).revoked
        if expires_at is not None:
            ttl_ms = max(int((expires_at + self._retention - self._clock()) * 1000), 60_000)
        else:
            ttl_ms = self._revocation_ttl * 1000
        created = await idempotent(lambda: self._client.set(rkey, 1, px=ttl_ms, nx=True))
        return bool(created)

    async def revoke(
        self,
        *,
        secret_hash: str | None,
        session_id: str | None,
        reason: str,
        replica: str,
    ) -> RevokeResult:
        expires_at: int | None = None
        already = True
        registered = False
        if session_id is not None:
            rkey = self.keys.session_id(session_id).revoked
            flag_set = await idempotent(
                lambda: self._client.set(rkey, 1, ex=self._revocation_ttl, nx=True)
            )
            already = not flag_set
            if secret_hash is None:
                secret_hash = await self.secret_hash_for(session_id)
        if secret_hash is not None:
            skey = self.keys.secret(secret_hash).session
            sid, exp = await call(lambda: self._client.hmget(skey, ["sid", "exp"]))
            if session_id is None:
                session_id = text(sid)
            expires_at = int(exp) if exp is not None else None
            registered = exp is not None
            already = not await self._revoke_hash(secret_hash, expires_at) and already
        await self._announce(secret_hash, session_id, reason, replica)
        return RevokeResult(secret_hash, session_id, already, registered)

    async def _announce(
        self, secret_hash: str | None, session_id: str | None, reason: str, replica: str
    ) -> None:
        fields = {
            "session_id": session_id or "",
            "secret_hash_prefix": (secret_hash or "")[:12],
            "reason": reason,
            "replica": replica,
            "at": f"{self._clock():.3f}",
        }
        audit = self.keys.audit

        async def append() -> Any:
            # Capped by length, and given a TTL like every other key: an idle
            # gateway's audit log ends with the last revocation it records.
            pipe = self._client.pipeline(transaction=False)
            pipe.xadd(audit, fields, maxlen=AUDIT_MAXLEN, approximate=True)  # type: ignore[arg-type]
            pipe.expire(audit, self._revocation_ttl)
            return await pipe.execute()

        await idempotent(append)
        if secret_hash is not None:
            await idempotent(lambda: self._client.publish(self.keys.channel, secret_hash))

    # -- operator reads -----------------------------------------------------------

    async def lookup(self, session_id: str) -> SessionInfo | None:
        rkey = self.keys.session_id(session_id).revoked
        secret_hash = await self.secret_hash_for(session_id)
        sid_revoked = bool(await call(lambda: self._client.exists(rkey)))
        if secret_hash is None:
            if not sid_revoked:
                return None
            return SessionInfo(session_id, "revoked", None, None, None, None, None)
        skey, wkey, revkey = self.keys.secret(secret_hash)

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(skey, ["user", "exp", "lim"])
            pipe.exists(revkey)
            pipe.zcount(wkey, f"({(self._clock() * 1_000_000) - self._window_us:.0f}", "+inf")
            return await pipe.execute()

        (user, exp, lim), revoked, used = await call(read)
        expires_at = int(exp) if exp is not None else None
        limit = int(lim) if lim is not None else None
        if revoked or sid_revoked:
            status = "revoked"
        elif expires_at is not None and expires_at <= self._clock():
            status = "expired"
        else:
            status = "active"
        return SessionInfo(
            session_id=session_id,
            status=status,
            user=text(user),
            limit=limit,
            remaining=max(limit - int(used), 0) if limit is not None else None,
            expires_at=expires_at,
            secret_hash_prefix=secret_hash[:12],
        )

    async def audit_tail(self, count: int) -> list[AuditEntry]:
        if count <= 0:  # XREVRANGE refuses COUNT 0; the embedded store answers []
            return []

        async def read() -> Any:
            return await self._client.xrevrange(self.keys.audit, count=count)

        rows = await call(read) or []
        entries = []
        for entry_id, fields in reversed(rows):
            values = {text(k): text(v) or "" for k, v in (fields or {}).items()}
            entries.append(
                AuditEntry(
                    id=text(entry_id) or "",
                    session_id=values.get("session_id") or None,
                    secret_hash_prefix=values.get("secret_hash_prefix") or None,
                    reason=values.get("reason") or "",
                    replica=values.get("replica") or "",
                    at=float(values.get("at") or "0"),
                )
            )
        return entries

    async def revoked_among(self, secret_hashes: Collection[str]) -> set[str]:
        hashes = list(secret_hashes)
        if not hashes:
            return set()

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for secret_hash in hashes:
                pipe.exists(self.keys.secret(secret_hash).revoked)
            return await pipe.execute()

        flags = await call(read)
        return {h for h, flag in zip(hashes, flags, strict=True) if flag}

    def revocations(self) -> AsyncIterator[str | None]:
        return self._feed.messages()

    async def ping(self) -> None:
        await call(lambda: self._client.ping())

    async def close(self) -> None:
        await self._batcher.close()
        await self._client.aclose()
