"""The Redis store: every replica shares one registry, revocation set and window.

Admission is delegated to the batcher (one EVALSHA per request), the
revocation feed to pub/sub; this module holds the registry, revocation,
audit and operator reads, each a short pipeline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Sequence
from importlib import resources
from typing import Any

from redis.asyncio.cluster import RedisCluster

from gateway.errors import NotReplicated, StoreUnavailable
from gateway.model import budgets
from gateway.ratelimit import Decision
from gateway.store import base
from gateway.store.redis.batcher import VOID_SCRIPT, AdmissionBatcher
from gateway.store.redis.client import Availability, Client, text
from gateway.store.redis.feed import PUBSUB_PING_SECONDS, RevocationFeed
from gateway.store.redis.keys import KeyLayout, user_hash
from gateway.store.redis.replicated import ReplicatedWriter
from gateway.store.redis.tenancy import Tenancy

logger = logging.getLogger(__name__)

AUDIT_MAXLEN = 10_000
# A revocation flag outlives even a session that has already expired by this
# much, so a secret cancelled at the last moment is not admitted as unknown.
MIN_REVOCATION_TTL_MS = 60_000
_LUA = resources.files("gateway.store").joinpath("lua")
# A user's budget keys outlive the longest window and a reservation's lease.
_BUDGET_KEEP_MS = (budgets.LONGEST_WINDOW_SECONDS + budgets.RESERVATION_LEASE_SECONDS) * 1000


class RedisStore(base.Store):
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
        report_availability: bool = False,
        revocation_replicas: int = 0,
        revocation_wait_ms: int = 500,
    ) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self.keys = KeyLayout(prefix)
        self.window_seconds = window_seconds
        self._window_us = window_seconds * 1_000_000
        self._retention = retention_seconds
        self._revocation_ttl = revocation_ttl_seconds
        # Accepted for parity with the embedded store, and never read: every
        # expiry and TTL is decided by Redis TIME or an absolute expiry, so a
        # replica whose clock is wrong cannot shorten a revocation.
        del clock
        #: Whether Redis answers and has room; logged on change, not per request.
        self.availability = Availability(report=report_availability)
        self._batcher = AdmissionBatcher(
            client,
            keys=self.keys,
            window_seconds=window_seconds,
            timeout=timeout,
            availability=self.availability,
        )
        # Revocations are scripts so that their TTLs come from Redis TIME and
        # they may write when Redis is full (see the scripts' headers).
        self._revoke_secret_script = client.register_script(
            _LUA.joinpath("revoke_secret.lua").read_text()
        )
        self._revoke_id_script = client.register_script(_LUA.joinpath("revoke_id.lua").read_text())
        # With replicas to wait for, a revocation runs beside its WAIT on one
        # connection (replicated.py); without, as the registered scripts above.
        self._replicated = (
            ReplicatedWriter(
                client, replicas=revocation_replicas, wait_ms=revocation_wait_ms, timeout=timeout
            )
            if revocation_replicas > 0
            else None
        )
        self._audit_script = client.register_script(_LUA.joinpath("audit.lua").read_text())
        self._void_script = client.register_script(VOID_SCRIPT)
        self._reserve_script = client.register_script(_LUA.joinpath("budget.lua").read_text())
        self._settle_script = client.register_script(_LUA.joinpath("budget_settle.lua").read_text())
        self._feed = RevocationFeed(
            pubsub_url, self.keys.channel, ping_seconds=ping_seconds, client=client
        )
        self._tenancy = Tenancy(
            client,
            keys=self.keys,
            availability=self.availability,
            window_seconds=window_seconds,
            retention_seconds=retention_seconds,
        )

    # -- admission (hot path) -----------------------------------------------

    def admit(self, request: base.AdmitRequest) -> Coroutine[Any, Any, Decision]:
        # The batcher's coroutine itself, not one wrapped in another frame:
        # this runs for every proxied request.
        return self._batcher.admit(request)

    async def unadmit(self, request: base.AdmitRequest, member: str) -> None:
        # Awaited, so every later admission from this replica sees it undone:
        # one more round trip, for refused turns only. If Redis does not
        # answer, the batcher sends it again with its next batch (void.lua is
        # idempotent).
        _, _, _, session, window, *args = self._batcher.void_command(request, member)
        try:
            await self.availability.idempotent(
                lambda: self._void_script(keys=[session, window], args=args), proves_room=False
            )
        except StoreUnavailable:
            await self._batcher.keep_void(request, member)  # may raise in turn

    # -- registry -------------------------------------------------------------

    async def register(self, record: base.SessionRecord) -> bool:
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
            if record.counts != "all":
                fields["cnt"] = record.counts
            for cls, spec in record.windows.items():
                fields["c:" + cls] = spec
            if not record.history:
                fields["hist"] = 0
            if not record.uploads:
                fields["up"] = 0
            if record.max_file_bytes:
                fields["mfs"] = record.max_file_bytes
            if record.max_files:
                fields["mf"] = record.max_files
            if record.configuration:
                fields["cfg"] = record.configuration
            if record.models:
                fields["mdl"] = 1
                for model in record.models:
                    fields["m:" + model] = 1
            if record.app:
                fields["app"] = record.app
            pipe.hset(skey, mapping=fields)  # type: ignore[arg-type]
            pipe.pexpireat(skey, keep_until_ms)
            pipe.set(hkey, record.secret_hash, pxat=keep_until_ms)
            if record.issued:
                pipe.set(dkey, record.document, pxat=keep_until_ms)
            # pexpireat/pxat take the session's own expiry, an absolute time:
            # no replica clock is read.
            # Read after writing: a cancel that raced ahead wrote its flag
            # first and then looks for this mapping, so one of us sees the other.
            pipe.exists(rkey)
            return await pipe.execute()

        replies = await self.availability.idempotent(write)
        born_revoked = bool(replies[-1])
        if born_revoked:
            *_, short = await self._revoke_secret(record.secret_hash)
            if short is not None:
                raise short
        return born_revoked

    async def secret_hash_for(self, session_id: str) -> str | None:
        hkey = self.keys.session_id(session_id).secret_hash
        value = await self.availability.call(lambda: self._client.get(hkey))
        return text(value)

    async def issued_session(self, session_id: str) -> base.IssuedSession | None:
        hkey, sid_rkey, dkey = self.keys.session_id(session_id)

        async def by_id() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(dkey)
            pipe.get(hkey)
            pipe.exists(sid_rkey)
            return await pipe.execute()

        document, raw_hash, sid_revoked = await self.availability.call(by_id)
        secret_hash = text(raw_hash)
        if document is None or secret_hash is None:
            return None
        skey, _, rkey = self.keys.secret(secret_hash)

        async def by_secret() -> list[Any]:
            # Another hash slot than the id's keys: a second round trip.
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(skey, ["exp", "app"])
            pipe.exists(rkey)
            return await pipe.execute()

        (exp, app), revoked = await self.availability.call(by_secret)
        if exp is None:
            return None
        return base.IssuedSession(
            document=bytes(document),
            secret_hash=secret_hash,
            expires_at=int(exp),
            revoked=bool(revoked or sid_revoked),
            app=text(app) or "",
        )

    # -- revocation -------------------------------------------------------------

    async def _revoke_secret(
        self, secret_hash: str, *, wait: bool = True
    ) -> tuple[bool, str | None, int | None, NotReplicated | None]:
        """Set a secret's revoked flag: (newly set, its session id, its expiry,
        the error to raise if the replicas did not acknowledge it)."""
        keys = self.keys.secret(secret_hash)
        (created, sid, exp), short = await self._revocation_write(
            self._revoke_secret_script,
            [keys.session, keys.revoked],
            [self._retention, self._revocation_ttl * 1000, MIN_REVOCATION_TTL_MS],
            wait=wait,
        )
        return bool(created), text(sid), int(exp) if exp is not None else None, short

    async def _revocation_write(
        self, script: Any, keys: list[str], args: list[Any], *, wait: bool = True
    ) -> tuple[Any, NotReplicated | None]:
        """Run a revocation script: its reply, and unless as many replicas as
        configured acknowledged it (always, when none are), the error saying so.

        Not raised here: the write stands on the master, and the caller has
        more to write and announce before it reports the shortfall. With
        ``wait`` False (the shortfall is known already) nothing is waited for.
        """
        writer = self._replicated
        if writer is None:
            reply = await self.availability.idempotent(
                lambda: script(keys=keys, args=args), proves_room=False
            )
            return reply, None
        # Retried quickly only when Redis itself failed: replicas that did not
        # answer within the WAIT are not back 50 ms later, and the caller
        # (the Revoker, or a client told 503) tries again anyway.
        written = await self.availability.idempotent(
            lambda: writer.run(script.script, keys, args, wait=wait), proves_room=False
        )
        if wait and written.acknowledged < writer.replicas:
            return written.reply, NotReplicated(
                "Redis replicas did not acknowledge the revocation: "
                f"{written.acknowledged} of {writer.replicas} within {writer.wait_ms} ms"
            )
        return written.reply, None

    async def revoke(
        self, *, secret_hash: str | None, session_id: str | None, reason: str, replica: str
    ) -> base.RevokeResult:
        already = True
        registered = False
        short: NotReplicated | None = None
        if session_id is not None:
            id_keys = self.keys.session_id(session_id)
            (flag_set, mapped), short = await self._revocation_write(
                self._revoke_id_script,
                [id_keys.revoked, id_keys.secret_hash],
                [self._revocation_ttl],
            )
            already = not flag_set
            if secret_hash is None:
                secret_hash = text(mapped)
        # Both flags are written even when the first was not acknowledged:
        # the master refuses the secret at once, whatever the replicas do.
        if secret_hash is not None:
            created, sid, expires_at, secret_short = await self._revoke_secret(
                secret_hash, wait=short is None
            )
            short = short or secret_short
            if session_id is None:
                session_id = sid
            registered = expires_at is not None
            already = not created and already
        app = None
        if registered and secret_hash is not None and session_id is not None:
            app = await self._leave_indexes(secret_hash, session_id)
        if short is None or not already:
            # Announced when first written, so other replicas close their
            # streams now, and again once stored: not on every retry between.
            await self._announce(secret_hash, session_id, reason, replica, app)
        if short is not None:
            raise short
        return base.RevokeResult(secret_hash, session_id, already, registered)

    async def _leave_indexes(self, secret_hash: str, session_id: str) -> str | None:
        """Take a revoked session out of its user's and app's counts; its app.

        Not part of the revocation itself (other hash slots): if Redis fails
        here the entry stays until the session's expiry, counted as active
        by its user's cap, and the revocation stands.
        """
        skey = self.keys.secret(secret_hash).session
        try:
            user, app = await self.availability.call(
                lambda: self._client.hmget(skey, ["user", "app"])
            )
            if user is not None:
                await self._tenancy.unindex(text(user) or "", text(app) or "", session_id)
        except StoreUnavailable as exc:
            logger.warning("Revoked session %s still in its user's index: %s", session_id, exc)
            return None
        return text(app)

    async def _announce(
        self,
        secret_hash: str | None,
        session_id: str | None,
        reason: str,
        replica: str,
        app: str | None = None,
    ) -> None:
        fields = {
            "session_id": session_id or "",
            "secret_hash_prefix": (secret_hash or "")[:12],
            "reason": reason,
            "replica": replica,
        }
        if app:
            fields["app"] = app
        args: list[Any] = [AUDIT_MAXLEN, self._revocation_ttl]
        for name, value in fields.items():
            args += [name, value]

        async def append() -> Any:
            # Capped by length, and given a TTL like every other key: an idle
            # gateway's audit log ends with the last revocation it records.
            return await self._audit_script(keys=[self.keys.audit], args=args)

        await self.availability.idempotent(append, proves_room=False)
        if secret_hash is not None:
            await self.availability.idempotent(
                lambda: self._client.publish(self.keys.channel, secret_hash), proves_room=False
            )

    # -- model tokens -----------------------------------------------------------------

    async def grant_model_token(self, token_hash: str, grant: base.ModelGrant) -> None:
        key = self.keys.model_token(token_hash)
        fields: dict[str, str | int] = {
            "h": grant.secret_hash,
            "sid": grant.session_id,
            "user": grant.user,
            "wf": grant.workflow_id,
            "rid": grant.request_id,
            "exp": grant.expires_at,
        }

        async def write() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            # An absolute time: no replica's clock decides how long it lives.
            pipe.pexpireat(key, grant.expires_at * 1000)
            return await pipe.execute()

        await self.availability.idempotent(write)

    async def end_model_token(self, token_hash: str, *, grace_seconds: int) -> None:
        key = self.keys.model_token(token_hash)
        # LT: only ever shortens, so the session's expiry stays the bound;
        # a relative TTL, counted by Redis's own clock.
        await self.availability.idempotent(
            lambda: self._client.pexpire(key, max(grace_seconds * 1000, 1), lt=True),
            proves_room=False,
        )

    async def model_grant(self, token_hash: str) -> base.ModelGrant | None:
        key = self.keys.model_token(token_hash)
        raw = await self.availability.call(lambda: self._client.hgetall(key))
        fields = {text(k): text(v) or "" for k, v in (raw or {}).items()}
        secret_hash, session_id = fields.get("h"), fields.get("sid")
        if not secret_hash or not session_id:
            return None
        revoked_keys = (
            self.keys.secret(secret_hash).revoked,
            self.keys.session_id(session_id).revoked,
        )

        async def revoked() -> list[Any]:
            # Other hash slots than the token's: a second round trip, which a
            # model call (hundreds of ms at least) does not notice.
            pipe = self._client.pipeline(transaction=False)
            for rkey in revoked_keys:
                pipe.exists(rkey)
            return await pipe.execute()

        if any(await self.availability.call(revoked)):
            return None
        return base.ModelGrant(
            secret_hash=secret_hash,
            session_id=session_id,
            user=fields.get("user", ""),
            workflow_id=fields.get("wf", ""),
            request_id=fields.get("rid", ""),
            expires_at=int(fields.get("exp") or 0),
        )

    # -- budgets --------------------------------------------------------------------------

    async def _budget_script(
        self,
        key: budgets.BudgetKey,
        mode: str,
        call_id: str,
        need: budgets.Charge,
        limits: tuple[budgets.BudgetLimit, ...],
        *,
        model: str,
        lease_seconds: int,
    ) -> budgets.BudgetDecision:
        keys = list(self.keys.budget(key.workflow_id, key.user))
        args: list[Any] = [
            mode,
            call_id,
            key.session_id,
            need.input_tokens,
            need.output_tokens,
            repr(float(need.usd_micros)),
            lease_seconds * 1_000_000,
            _field(model),
            _BUDGET_KEEP_MS,
        ]
        for limit in limits:
            args += [
                "t" if limit.kind == "tokens" else "d",
                limit.scope[0],
                limit.seconds,
                repr(float(limit.limit)),
            ]
        reply = await self.availability.call(
            lambda: self._reserve_script(keys=keys, args=args), write=True
        )
        if int(reply[0]) == 1:
            return budgets.BudgetDecision(True)
        wait = int(reply[2])
        return budgets.BudgetDecision(False, int(reply[1]) - 1, None if wait < 0 else wait)

    async def reserve_budget(self, reservation: budgets.Reservation) -> budgets.BudgetDecision:
        # Not retried: a reservation that was written but whose answer was
        # lost would be held twice. The call is refused (503) instead.
        r = reservation
        return await self._budget_script(
            r.key, "reserve", r.call_id, r.charge, r.limits,
            model=r.model, lease_seconds=r.lease_seconds,
        )  # fmt: skip

    async def budget_room(
        self, key: budgets.BudgetKey, limits: tuple[budgets.BudgetLimit, ...]
    ) -> budgets.BudgetDecision:
        return await self._budget_script(
            key, "check", "", budgets.Charge(0, 0, 0, 0.0), limits, model="", lease_seconds=0
        )

    async def settle_budget(
        self, key: budgets.BudgetKey, call_id: str, charge: budgets.Charge, *, model: str
    ) -> None:
        keys = list(self.keys.budget(key.workflow_id, key.user))
        args: list[str | int] = [
            call_id,
            key.session_id,
            charge.input_tokens,
            charge.cached_input_tokens,
            charge.output_tokens,
            repr(float(charge.usd_micros)),
            _field(model),
            _BUDGET_KEEP_MS,
        ]
        # Idempotent: a repeat finds the reservation gone and charges nothing.
        await self.availability.idempotent(
            lambda: self._settle_script(keys=keys, args=args), proves_room=False
        )

    async def budget_charges(self, workflow_id: str, user: str) -> list[budgets.ChargeRecord]:
        charges_key, _, _ = self.keys.budget(workflow_id, user)
        seconds, micros = await self.availability.call(lambda: self._client.time())
        since = int(seconds) * 1_000_000 + int(micros) - budgets.LONGEST_WINDOW_SECONDS * 1_000_000
        rows = await self.availability.call(
            lambda: self._client.zrangebyscore(charges_key, f"({since}", "+inf", withscores=True)
        )
        records = []
        row: Any
        for row in rows:
            member, score = row
            parts = (text(member) or "").split("|")
            if len(parts) != 7:
                continue
            call_id, sid, input_tokens, cached, output, usd, model = parts
            records.append(
                budgets.ChargeRecord(
                    float(score) / 1_000_000,
                    sid,
                    model,
                    budgets.Charge(int(input_tokens), int(cached), int(output), float(usd)),
                    call_id,
                )
            )
        return records

    async def calls_in_flight(self, workflow_id: str, user: str) -> list[str]:
        _, reservations, _ = self.keys.budget(workflow_id, user)
        fields = await self.availability.call(lambda: self._client.hkeys(reservations))
        return [text(f) or "" for f in fields or []]

    async def audit_usage(self, *, session_id: str, replica: str, usage: dict[str, float]) -> None:
        args: list[Any] = [AUDIT_MAXLEN, self._revocation_ttl]
        fields = {"session_id": session_id, "reason": "model_usage", "replica": replica}
        for name, value in [*fields.items(), *((f"usage.{k}", repr(v)) for k, v in usage.items())]:
            args += [name, value]
        await self.availability.idempotent(
            lambda: self._audit_script(keys=[self.keys.audit], args=args), proves_room=False
        )

    # -- operator reads -----------------------------------------------------------

    async def lookup(self, session_id: str) -> base.SessionInfo | None:
        rkey = self.keys.session_id(session_id).revoked
        secret_hash = await self.secret_hash_for(session_id)
        sid_revoked = bool(await self.availability.call(lambda: self._client.exists(rkey)))
        if secret_hash is None:
            if not sid_revoked:
                return None
            return base.SessionInfo(session_id, "revoked", None, None, None, None, None)
        skey, wkey, revkey = self.keys.secret(secret_hash)
        seconds, micros = await self.availability.call(lambda: self._client.time())
        now_us = seconds * 1_000_000 + micros

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(skey, ["user", "exp", "lim", "app"])
            pipe.exists(revkey)
            pipe.zcount(wkey, f"({now_us - self._window_us}", "+inf")
            return await pipe.execute()

        (user, exp, lim, app), revoked, used = await self.availability.call(read)
        expires_at = int(exp) if exp is not None else None
        limit = int(lim) if lim is not None else None
        if revoked or sid_revoked:
            status = "revoked"
        elif expires_at is not None and expires_at * 1_000_000 <= now_us:
            status = "expired"
        else:
            status = "active"
        return base.SessionInfo(
            session_id=session_id,
            status=status,
            user=text(user),
            limit=limit,
            remaining=max(limit - int(used), 0) if limit is not None else None,
            expires_at=expires_at,
            secret_hash_prefix=secret_hash[:12],
            app=text(app),
        )

    async def audit_tail(self, count: int) -> list[base.AuditEntry]:
        if count <= 0:  # XREVRANGE refuses COUNT 0; the embedded store answers []
            return []

        async def read() -> Any:
            return await self._client.xrevrange(self.keys.audit, count=count)

        rows = await self.availability.call(read) or []
        entries = []
        for entry_id, fields in reversed(rows):
            values = {text(k): text(v) or "" for k, v in (fields or {}).items()}
            entries.append(
                base.AuditEntry(
                    id=text(entry_id) or "",
                    session_id=values.get("session_id") or None,
                    secret_hash_prefix=values.get("secret_hash_prefix") or None,
                    reason=values.get("reason") or "",
                    replica=values.get("replica") or "",
                    at=_entry_time(values.get("at"), text(entry_id) or "0"),
                    app=values.get("app") or None,
                    usage={
                        k.removeprefix("usage."): float(v)
                        for k, v in values.items()
                        if k is not None and k.startswith("usage.")
                    }
                    or None,
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

        flags = await self.availability.call(read)
        return {h for h, flag in zip(hashes, flags, strict=True) if flag}

    def revocations(self) -> AsyncIterator[str | None]:
        return self._feed.messages()

    # -- apps and users (tenancy.py) ------------------------------------------------

    async def open_session(self, slot: base.SessionSlot) -> base.SlotDecision:
        return await self._tenancy.open_session(slot)

    async def close_session(self, slot: base.SessionSlot) -> None:
        await self._tenancy.close_session(slot)

    async def ban_user(self, user: str, *, for_seconds: int) -> list[base.IndexedSession]:
        return await self._tenancy.ban_user(user, for_seconds=for_seconds)

    async def lift_ban(self, user: str) -> bool:
        return await self._tenancy.lift_ban(user)

    async def banned_for(self, user: str) -> float | None:
        return await self._tenancy.banned_for(user)

    async def user_sessions(self, user: str) -> tuple[list[base.IndexedSession], float | None]:
        return await self._tenancy.user_sessions(user)

    async def class_windows(self, secret_hashes: Sequence[str]) -> dict[str, base.SessionWindows]:
        return await self._tenancy.class_windows(secret_hashes)

    async def app_stats(self, app: str) -> base.AppStats:
        return await self._tenancy.app_stats(app)

    @property
    def full(self) -> bool:
        return self.availability.full

    async def ping(self) -> None:
        await self.availability.call(lambda: self._client.ping())

    async def now(self) -> float:
        seconds, micros = await self.availability.call(lambda: self._client.time())
        return int(seconds) + int(micros) / 1_000_000

    async def close(self) -> None:
        self._feed.close()
        if self._replicated is not None:
            await self._replicated.close()
        await self._batcher.close()
        await self._client.aclose()


def _field(value: str) -> str:
    """A value stored inside a "|"-separated record."""
    return value.replace("|", "/")


def _entry_time(written: str | None, entry_id: str) -> float:
    """An audit entry's time: its id is Redis's clock in ms (older entries
    carry the writing replica's clock in an ``at`` field)."""
    if written:
        return float(written)
    return int(entry_id.split("-", 1)[0]) / 1000
