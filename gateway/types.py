"""Type aliases for the ASGI interface and header lists, shared by every module.

ASGI messages are plain dicts by the specification; the aliases name what
flows so that mypy can check the hot path's callables.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias

#: Header lists as ASGI and aiohttp's ``raw_headers`` carry them: (name, value) bytes.
Headers: TypeAlias = list[tuple[bytes, bytes]]
Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
