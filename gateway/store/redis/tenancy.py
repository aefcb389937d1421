"""Apps and users on Redis: create-time checks, a user's session index, bans.

A user's index and ban live under the user's hash tag ``{u:<user hash>}``
and an app's window under ``{app:<name>}`` (see keys.py), so on a Redis
Cluster each check is one script on one node. The two are not one atomic
step together: the app's window is counted first and given back if the
user's script refuses.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any

from gateway.errors import StoreUnavailable
from gateway.store.base import (
    AppStats,
    IndexedSession,
    SessionSlot,
    SlotDecision,
    SlotOutcome,
)
from gateway.store.redis.client import Availability, Client, text
from gateway.store.redis.keys import KeyLayout

logger = logging.getLogger(__name__)
_LUA = resources.files("gateway.store").joinpath("lua")


class Tenancy:
    """The Redis store's part for apps and users (see :class:`~gateway.store.base.Store`)."""

    def __init__(
        self,
        client: Client,
        *,
        keys: KeyLayout,
        availability: Availability,
        window_seconds: int,
        retention_seconds: int,
    ) -> None:
        self._client = client
        self._keys = keys
        self._availability = availability
        self._window_seconds = window_seconds
        self._retention = retention_seconds
        self._open = client.register_script(_LUA.joinpath("open_session.lua").read_text())
        self._app_create = client.register_script(_LUA.joinpath("app_create.lua").read_text())
        self._ban = client.register_script(_LUA.joinpath("ban_user.lua").read_text())

    async def open_session(self, slot: SessionSlot) -> SlotDecision:
        app_keys = self._keys.app(slot.app) if slot.app else None
        if app_keys is not None:
            args: list[str | int] = [
                slot.app_rate or 0,
                self._window_seconds * 1_000_000,
                slot.session_id,
                slot.expires_at,
                self._retention,
            ]
            counted, wait_ms = await self._availability.call(
                lambda: self._app_create(keys=list(app_keys), args=args), write=True
            )
            if not counted:
                return SlotDecision(SlotOutcome.APP_RATE_LIMITED, int(wait_ms))
        user_keys = self._keys.user(slot.user)
        user_args: list[str | int] = [
            slot.session_id,
            slot.secret_hash,
            slot.app,
            slot.workflow_id,
            slot.expires_at,
            slot.max_active or 0,
            "1" if slot.refuse else "0",
            self._retention,
        ]
        try:
            reply = await self._availability.call(
                lambda: self._open(keys=list(user_keys), args=user_args), write=True
            )
        except StoreUnavailable:
            await self._give_back(slot)
            raise
        status, wait_ms, *evicted = reply
        if status != 0:
            await self._give_back(slot)
            outcome = SlotOutcome.BANNED if status == 1 else SlotOutcome.TOO_MANY_SESSIONS
            return SlotDecision(outcome, int(wait_ms))
        gone = tuple(
            IndexedSession(text(sid) or "", text(h) or "", slot.app, slot.workflow_id, 0.0, 0)
            for sid, h in zip(evicted[::2], evicted[1::2], strict=True)
        )
        return SlotDecision(SlotOutcome.OPENED, 0, gone)

    async def _give_back(self, slot: SessionSlot) -> None:
        """The app's count of a create that did not happen, returned."""
        if not slot.app:
            return
        app_keys = self._keys.app(slot.app)

        async def remove() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.zrem(app_keys.creates, slot.session_id)
            pipe.zrem(app_keys.active, slot.session_id)
            return await pipe.execute()

        try:
            await self._availability.idempotent(remove, proves_room=False)
        except StoreUnavailable as exc:
            # Counted against the app until it leaves the window: a refusal
            # costs the app one create, never lets one more through.
            logger.warning("A refused create stays counted for app %s: %s", slot.app, exc)

    async def close_session(self, slot: SessionSlot) -> None:
        await self._give_back(slot)
        await self.unindex(slot.user, slot.app, slot.session_id)

    async def unindex(self, user: str, app: str, session_id: str) -> None:
        """A session revoked or never handed out leaves the user's and app's counts."""
        user_keys = self._keys.user(user)
        app_keys = self._keys.app(app) if app else None

        async def remove() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.zrem(user_keys.sessions, session_id)
            pipe.hdel(user_keys.entries, session_id)
            if app_keys is not None:
                pipe.zrem(app_keys.active, session_id)
            return await pipe.execute()

        await self._availability.idempotent(remove, proves_room=False)

    async def ban_user(self, user: str, *, for_seconds: int) -> list[IndexedSession]:
        user_keys = self._keys.user(user)
        reply = await self._availability.idempotent(
            lambda: self._ban(keys=list(user_keys), args=[for_seconds]), proves_room=False
        )
        sessions = [_entry(sid, raw) for sid, raw in zip(reply[::2], reply[1::2], strict=True)]
        apps = {s.app for s in sessions if s.app}
        if apps:

            async def forget() -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for s in sessions:
                    if s.app:
                        pipe.zrem(self._keys.app(s.app).active, s.session_id)
                return await pipe.execute()

            try:
                await self._availability.idempotent(forget, proves_room=False)
            except StoreUnavailable as exc:
                logger.warning("Banned sessions still counted as their apps' active: %s", exc)
        return sessions

    async def lift_ban(self, user: str) -> bool:
        ban_key = self._keys.user(user).ban
        deleted = await self._availability.idempotent(
            lambda: self._client.delete(ban_key), proves_room=False
        )
        return bool(deleted)

    async def banned_for(self, user: str) -> float | None:
        ban_key = self._keys.user(user).ban
        left = await self._availability.call(lambda: self._client.pttl(ban_key))
        return int(left) / 1000 if int(left) > 0 else None

    async def user_sessions(self, user: str) -> tuple[list[IndexedSession], float | None]:
        user_keys = self._keys.user(user)

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(user_keys.entries)
            pipe.pttl(user_keys.ban)
            return await pipe.execute()

        # TIME apart: a cluster pipeline refuses a command without a key.
        seconds, _ = await self._availability.call(lambda: self._client.time())
        entries, ban = await self._availability.call(read)
        sessions = [
            s
            for s in (_entry(sid, raw) for sid, raw in (entries or {}).items())
            if s.expires_at > int(seconds)
        ]
        sessions.sort(key=lambda s: s.created_at)
        return sessions, int(ban) / 1000 if int(ban) > 0 else None

    async def app_stats(self, app: str) -> AppStats:
        app_keys = self._keys.app(app)
        seconds, micros = await self._availability.call(lambda: self._client.time())
        now_us = int(seconds) * 1_000_000 + int(micros)
        window_us = self._window_seconds * 1_000_000

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.zcount(app_keys.creates, f"({now_us - window_us}", "+inf")
            pipe.zcount(app_keys.active, f"({int(seconds)}", "+inf")
            return await pipe.execute()

        creates, active = await self._availability.call(read)
        return AppStats(int(creates), self._window_seconds, int(active))


def _entry(sid: Any, raw: Any) -> IndexedSession:
    fields = json.loads(raw)
    return IndexedSession(
        session_id=text(sid) or "",
        secret_hash=str(fields["h"]),
        app=str(fields["a"]),
        workflow_id=str(fields["w"]),
        created_at=float(fields["c"]),
        expires_at=int(fields["e"]),
    )
