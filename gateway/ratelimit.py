"""Admission decisions and the headers that describe them. Pure functions.

The store (Redis or embedded) evaluates one request in one atomic step and
returns a :class:`Decision`; this module turns it into the OpenAI-style and
IETF draft (draft-ietf-httpapi-ratelimit-headers) response headers, or into the
error that rejects the request.
"""

from __future__ import annotations

import enum
import functools
import math
from typing import NamedTuple

from gateway.errors import AuthError, BadRequest, GatewayError, RateLimited
from gateway.types import Headers


class Outcome(enum.IntEnum):
    """Result codes shared with the Lua script; the numbers are its return values."""

    ADMITTED = 0
    RATE_LIMITED = 1
    USER_RATE_LIMITED = 2
    REVOKED = 3
    EXPIRED = 4
    UNKNOWN = 5
    CLASS_RATE_LIMITED = 6  # a window of the request's class (policy)
    # The session's chatkit_configuration refuses the request:
    HISTORY_DISABLED = 7  # threads.list with history.enabled false
    UPLOADS_DISABLED = 8  # an upload with file_upload.enabled false
    FILE_TOO_LARGE = 9  # attachments.create declaring more than max_file_size
    TOO_MANY_FILES = 10  # attachments.create past max_files
    MODEL_NOT_ALLOWED = 11  # a turn naming a model the workflow's policy does not list


class Window(NamedTuple):
    """One sliding window's state after the decision.

    ``wait_ms`` is how long until the oldest admitted request leaves the window
    (when one more request can be admitted); ``reset_ms`` until the newest does
    (when the window is empty again). A NamedTuple, not a dataclass: one is
    built per request, and tuples build several times faster.
    """

    limit: int
    remaining: int
    wait_ms: int
    reset_ms: int


class Identity(NamedTuple):
    """Who an admitted request acts as, read from the session's record.

    The workflow fields are empty for sessions learned from an upstream's
    create response (it names no workflow the gateway could trust) and
    ``workflow_version`` for workflows without one.
    """

    session_id: str
    user: str
    workflow_id: str
    workflow_version: str
    expires_at: int  # unix seconds
    #: file_upload.max_file_size in bytes, 0 for none: uploads are cut there.
    max_file_bytes: int = 0
    #: The session's chatkit_configuration (JSON), "" for none.
    configuration: str = ""
    #: The issuer app that created the session, "" for a learned one.
    app: str = ""


class ClassWindow(NamedTuple):
    """A policy window of the request's class: which one, and its state."""

    cls: str  # "turn", "read", ...
    scope: str  # "session" | "user"
    seconds: int
    window: Window

    @property
    def name(self) -> str:
        """``turn-user-1d``: how headers and messages name this window."""
        return f"{self.cls}-{self.scope}-{_window_name(self.seconds)}"


@functools.lru_cache(maxsize=64)
def _window_name(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


class Decision(NamedTuple):
    outcome: Outcome
    #: The session's limit; None when it does not count the request's class.
    session: Window | None = None
    user: Window | None = None
    #: Set on admissions of a registered session; None otherwise (and for
    #: unknown secrets admitted under the default limit).
    identity: Identity | None = None
    #: The class window that refused the request, or when admitted the one
    #: with the fewest requests left; None when the class has none.
    class_window: ClassWindow | None = None
    #: An admission's window member ("" unless admitted): what
    #: :meth:`gateway.store.base.Store.unadmit` removes when the gateway
    #: refuses the request after all (a turn whose budget is spent).
    member: str = ""

    @property
    def admitted(self) -> bool:
        return self.outcome is Outcome.ADMITTED


#: Outcome by the script's code, without Enum.__call__ on the hot path.
OUTCOMES: tuple[Outcome, ...] = tuple(Outcome)
ADMIT_UNLIMITED = Decision(Outcome.ADMITTED)


@functools.lru_cache(maxsize=4096)
def duration(ms: int) -> str:
    """OpenAI's reset format (Go durations): ``20ms``, ``1s``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m" + (f"{rest:.3f}".rstrip("0").rstrip(".") or "0") + "s"


def _binding(decision: Decision) -> Window | None:
    cw = decision.class_window
    windows = [w for w in (decision.session, decision.user) if w is not None]
    if cw is not None:
        windows.append(cw.window)
    if not windows:
        return None
    if decision.outcome is Outcome.USER_RATE_LIMITED and decision.user is not None:
        return decision.user
    if decision.outcome is Outcome.RATE_LIMITED and decision.session is not None:
        return decision.session
    if decision.outcome is Outcome.CLASS_RATE_LIMITED and cw is not None:
        return cw.window
    return min(windows, key=lambda w: (w.remaining, -w.wait_ms))


def rate_limit_headers(decision: Decision, *, window_seconds: int) -> Headers:
    """Headers for a response to a request that went through the limiter."""
    user = decision.user
    session = decision.session
    cw = decision.class_window
    if user is None and (cw is None or session is None):
        # The common cases, kept short: they run for every admitted request.
        # One window: the session's, or (a class the session limit does not
        # count, such as an issued read) the class's.
        if cw is not None:
            name, seconds, window = cw.name, cw.seconds, cw.window
        elif session is not None:
            name, seconds, window = "session", window_seconds, session
        else:
            return []
        wait_s = -(-window.wait_ms // 1000)
        return [
            (b"x-ratelimit-limit-requests", str(window.limit).encode()),
            (b"x-ratelimit-remaining-requests", str(window.remaining).encode()),
            (b"x-ratelimit-reset-requests", duration(window.reset_ms).encode()),
            (b"ratelimit-policy", f'"{name}";q={window.limit};w={seconds}'.encode()),
            (b"ratelimit", f'"{name}";r={window.remaining};t={wait_s}'.encode()),
        ]
    binding = _binding(decision)
    if binding is None:
        return []
    policies = []
    states = []
    named = [("session", window_seconds, decision.session), ("user", window_seconds, user)]
    if cw is not None:
        named.append((cw.name, cw.seconds, cw.window))
    for label, length, state in named:
        if state is None:
            continue
        policies.append(f'"{label}";q={state.limit};w={length}')
        states.append(f'"{label}";r={state.remaining};t={math.ceil(state.wait_ms / 1000)}')
    return [
        (b"x-ratelimit-limit-requests", str(binding.limit).encode()),
        (b"x-ratelimit-remaining-requests", str(binding.remaining).encode()),
        (b"x-ratelimit-reset-requests", duration(binding.reset_ms).encode()),
        (b"ratelimit-policy", ", ".join(policies).encode()),
        (b"ratelimit", ", ".join(states).encode()),
    ]


_CONFIGURATION_REFUSALS: dict[Outcome, tuple[str, str, str | None]] = {
    Outcome.HISTORY_DISABLED: (
        "Thread history is disabled for this session (chatkit_configuration.history.enabled).",
        "history_disabled",
        "type",
    ),
    Outcome.UPLOADS_DISABLED: (
        "File uploads are disabled for this session (chatkit_configuration.file_upload.enabled).",
        "file_upload_disabled",
        None,
    ),
    Outcome.FILE_TOO_LARGE: (
        "The file is larger than this session allows "
        "(chatkit_configuration.file_upload.max_file_size).",
        "file_too_large",
        "params.size",
    ),
    Outcome.TOO_MANY_FILES: (
        "This session has attached as many files as it may "
        "(chatkit_configuration.file_upload.max_files).",
        "too_many_files",
        None,
    ),
    Outcome.MODEL_NOT_ALLOWED: (
        "The model this turn asks for is not allowed for this session's workflow.",
        "model_not_allowed",
        "params.input.inference_options.model",
    ),
}


def rejection(decision: Decision, *, window_seconds: int) -> GatewayError | None:
    """The error that rejects this decision, or None when it admits."""
    outcome = decision.outcome
    if outcome is Outcome.ADMITTED:
        return None
    if outcome is Outcome.REVOKED:
        return AuthError("This client secret has been revoked.", code="client_secret_revoked")
    if outcome is Outcome.EXPIRED:
        return AuthError("This client secret has expired.", code="client_secret_expired")
    if outcome is Outcome.UNKNOWN:
        return AuthError("Unknown client secret.", code="invalid_client_secret")
    configured = _CONFIGURATION_REFUSALS.get(outcome)
    if configured is not None:
        message, code, param = configured
        return BadRequest(message, code=code, param=param)
    binding = _binding(decision)
    wait_ms = max(binding.wait_ms if binding else window_seconds * 1000, 1)
    scope = "user" if outcome is Outcome.USER_RATE_LIMITED else "session"
    headers = [
        (b"retry-after", str(max(1, math.ceil(wait_ms / 1000))).encode()),
        (b"retry-after-ms", str(wait_ms).encode()),
        *rate_limit_headers(decision, window_seconds=window_seconds),
    ]
    limit = binding.limit if binding else 0
    cw = decision.class_window
    if outcome is Outcome.CLASS_RATE_LIMITED and cw is not None:
        whose = "this user's sessions allow" if cw.scope == "user" else "this session allows"
        return RateLimited(
            f"Rate limit reached for '{cw.cls}' requests: {whose} {limit} per "
            f"{_window_name(cw.seconds)}. Retry after {wait_ms / 1000:.3f} s.",
            headers=headers,
        )
    return RateLimited(
        f"Rate limit reached: this {scope} allows {limit} requests per "
        f"{window_seconds} s. Retry after {wait_ms / 1000:.3f} s.",
        headers=headers,
    )
