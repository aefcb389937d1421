"""A user as the operator sees one: banned everywhere at once, and looked at.

Every session the gateway hands out or learns is indexed under its user
(see :meth:`~gateway.store.base.Store.open_session`), so a ban finds them
all: each is revoked the normal way (audited one by one, announced, its open
streams cut on every replica) and, for a while if asked, the user's new
sessions are refused at create. The admin API and the CLI share this module;
they differ only in how a revocation is made (through the serving process's
:class:`~gateway.revocation.Revoker`, or straight into the store).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.apps import App
from gateway.store.base import AppStats, IndexedSession, Store

#: The longest ban: long enough for any incident, short enough to end by itself.
MAX_BAN_SECONDS = 366 * 86400
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

#: Revokes one session; returns whether the store holds the revocation now
#: (False: kept pending by the serving process, stored as soon as it can be).
Revoke = Callable[[IndexedSession], Awaitable[bool]]


def parse_duration(text: str) -> int:
    """``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"7d"`` -> seconds; ValueError otherwise."""
    found = _DURATION.match(text.strip())
    if found is None:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 2h or 7d")
    seconds = int(found[1]) * _UNIT[found[2]]
    if not 1 <= seconds <= MAX_BAN_SECONDS:
        raise ValueError(f"a ban lasts from 1 s to {MAX_BAN_SECONDS} s")
    return seconds


@dataclass(frozen=True, slots=True)
class BanResult:
    user: str
    banned_for_seconds: int
    revoked: list[tuple[IndexedSession, bool]]  # each session, and whether stored

    def as_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "banned_for_seconds": self.banned_for_seconds or None,
            "revoked": len(self.revoked),
            "sessions": [
                {"session_id": s.session_id, "app": s.app or None, "stored": stored}
                for s, stored in self.revoked
            ],
        }


async def ban(store: Store, revoke: Revoke, user: str, *, for_seconds: int = 0) -> BanResult:
    """Revoke every active session of ``user``; with ``for_seconds``, refuse
    the user's new sessions that long. Raises StoreUnavailable before
    anything is revoked if the store cannot take the ban."""
    sessions = await store.ban_user(user, for_seconds=for_seconds)
    revoked = [(session, await revoke(session)) for session in sessions]
    return BanResult(user, for_seconds, revoked)


async def user_view(store: Store, user: str) -> dict[str, Any]:
    """The user's active sessions, each with what is left of its windows.

    ``windows`` maps a window's name to its limit and what remains; today
    each session has one (``"session"``: its max_requests_per_1_minute).
    Windows added later (per request class, per user) go in beside it.
    """
    indexed, ban_left = await store.user_sessions(user)
    sessions = []
    for entry in indexed:
        info = await store.lookup(entry.session_id)
        if info is None or info.status != "active":
            continue
        sessions.append(
            {
                "session_id": entry.session_id,
                "app": entry.app or None,
                "workflow_id": entry.workflow_id or None,
                "issued": bool(entry.app),
                "created_at": entry.created_at,
                "expires_at": entry.expires_at,
                "secret_hash_prefix": entry.secret_hash[:12],
                "windows": {
                    "session": {
                        "limit": info.limit,
                        "remaining": info.remaining,
                        "window_seconds": store.window_seconds,
                    }
                },
            }
        )
    return {
        "user": user,
        "banned_for_seconds": round(ban_left, 3) if ban_left is not None else None,
        "sessions": sessions,
    }


def app_view(app: App, stats: AppStats) -> dict[str, Any]:
    """An app's configuration and its current use."""
    return {
        "name": app.name,
        "workflows": sorted(app.workflows) if app.workflows is not None else None,
        "max_sessions_per_minute": app.max_sessions_per_minute,
        "max_active_sessions_per_user": app.max_active_sessions_per_user,
        "on_too_many_sessions": app.on_too_many_sessions.value,
        "creates_in_window": stats.creates,
        "window_seconds": stats.window_seconds,
        "active_sessions": stats.active,
    }
