"""Apps: who may call the issuer's session API, and what each may do.

A platform team runs one gateway for many apps. Each app (a backend with its
own keys) is configured in ``GATEWAY_ISSUER_KEYS``::

    {"support-app": {"keys": ["sha256:<hex>", "sha256:<hex>"],
                     "workflows": ["wf_support"],
                     "max_sessions_per_minute": 600,
                     "max_active_sessions_per_user": 5,
                     "on_too_many_sessions": "revoke_oldest"}}

- ``keys``: several, so a key rotates without downtime; only SHA-256 digests
  are configured, and a presented key is hashed and compared with every
  digest of every app in constant time;
- ``workflows``: the only workflows the app may create sessions for;
- ``max_sessions_per_minute``: an exact sliding window on the app's creates;
- ``max_active_sessions_per_user``: per user, app and workflow; a create
  beyond it revokes the user's oldest such session (``revoke_oldest``) or is
  refused (``refuse``), so a backend that creates a session per page load
  cannot multiply a user's request limit.

The older ``GATEWAY_ISSUER_API_KEYS`` still works: its keys are one app named
``default`` that may use every workflow, without limits.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from gateway.auth import bearer_secret
from gateway.errors import AuthError

if TYPE_CHECKING:
    from gateway.settings import Settings

#: The app that ``GATEWAY_ISSUER_API_KEYS`` configures.
DEFAULT_APP = "default"
APP_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class OnTooManySessions(StrEnum):
    """What a create beyond ``max_active_sessions_per_user`` does."""

    REVOKE_OLDEST = "revoke_oldest"
    REFUSE = "refuse"


class AppSetting(BaseModel):
    """One entry of ``GATEWAY_ISSUER_KEYS``, as configured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keys: tuple[str, ...] = Field(min_length=1)
    workflows: tuple[str, ...] = Field(min_length=1)
    # Strict: "5" or true is a mistake to report, not a number to guess.
    max_sessions_per_minute: StrictInt | None = Field(default=None, ge=1)
    max_active_sessions_per_user: StrictInt | None = Field(default=None, ge=1)
    on_too_many_sessions: OnTooManySessions = OnTooManySessions.REVOKE_OLDEST

    @field_validator("keys", mode="before")
    @classmethod
    def _digests_only(cls, value: object) -> object:
        # Only digests: a key written here in clear would sit in every copy
        # of the configuration (`chatkit-gateway new-api-key` prints both).
        if isinstance(value, list | tuple):
            for entry in value:
                if not isinstance(entry, str) or not _DIGEST.match(entry.lower()):
                    raise ValueError(
                        "each key must be 'sha256:' and 64 hex digits "
                        "(chatkit-gateway new-api-key prints one)"
                    )
            return tuple(entry.lower() for entry in value)
        return value


@dataclass(frozen=True, slots=True)
class App:
    """An app as the issuer uses it. ``workflows`` None means every workflow."""

    name: str
    digests: tuple[bytes, ...]
    workflows: frozenset[str] | None = None
    max_sessions_per_minute: int | None = None
    max_active_sessions_per_user: int | None = None
    on_too_many_sessions: OnTooManySessions = OnTooManySessions.REVOKE_OLDEST

    def may_use(self, workflow_id: str) -> bool:
        return self.workflows is None or workflow_id in self.workflows

    @classmethod
    def configured(cls, name: str, setting: AppSetting) -> App:
        return cls(
            name=name,
            digests=tuple(bytes.fromhex(key[7:]) for key in setting.keys),
            workflows=frozenset(setting.workflows),
            max_sessions_per_minute=setting.max_sessions_per_minute,
            max_active_sessions_per_user=setting.max_active_sessions_per_user,
            on_too_many_sessions=setting.on_too_many_sessions,
        )

    @classmethod
    def unrestricted(cls, entries: str) -> App:
        """``GATEWAY_ISSUER_API_KEYS``: comma-separated keys or ``sha256:`` entries."""
        digests = []
        for entry in (e.strip() for e in entries.split(",")):
            if not entry:
                continue
            if entry.startswith("sha256:"):
                digests.append(bytes.fromhex(entry[7:]))
            else:
                digests.append(hashlib.sha256(entry.encode()).digest())
        return cls(name=DEFAULT_APP, digests=tuple(digests))


class AppKeys:
    """Finds the app whose key a session-API request carries."""

    __slots__ = ("_apps", "_entries")

    def __init__(self, apps: tuple[App, ...]) -> None:
        self._apps = {app.name: app for app in apps}
        self._entries = tuple((digest, app) for app in apps for digest in app.digests)

    @property
    def apps(self) -> dict[str, App]:
        return dict(self._apps)

    def app(self, name: str) -> App | None:
        return self._apps.get(name)

    def identify(self, headers: list[tuple[bytes, bytes]]) -> App | None:
        """The app owning ``Authorization: Bearer <key>``, or None.

        Every digest is compared, and without branching on the result, so the
        timing says neither whether nor where a key matched.
        """
        try:
            key = bearer_secret(headers)
        except AuthError:
            return None
        digest = hashlib.sha256(key).digest()
        found: App | None = None
        for expected, app in self._entries:
            match = hmac.compare_digest(digest, expected)
            found = app if match else found
        return found


def build_apps(settings: Settings) -> tuple[App, ...]:
    """The configured apps: ``GATEWAY_ISSUER_KEYS`` and, as ``default``,
    ``GATEWAY_ISSUER_API_KEYS``."""
    apps = [App.configured(name, setting) for name, setting in settings.issuer_keys.items()]
    if settings.issuer_api_keys is not None:
        apps.append(App.unrestricted(settings.issuer_api_keys.get_secret_value()))
    return tuple(apps)
