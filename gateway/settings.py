"""The gateway's configuration: one frozen object, read once at start-up.

Every setting is an environment variable with the ``GATEWAY_`` prefix; a TOML
file named by ``GATEWAY_CONFIG_FILE`` may supply defaults, and the environment
wins over the file. The variable names are a public interface.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from enum import Enum, StrEnum
from typing import Any, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from gateway import jsonbody
from gateway.apps import APP_NAME, DEFAULT_APP, AppSetting
from gateway.errors import ConfigError
from gateway.logs import LogFormat
from gateway.policy import Policy
from gateway.routes import CONFIGURABLE_KINDS, METHODS
from gateway.service_links import is_service_link

logger = logging.getLogger(__name__)

ENV_PREFIX = "GATEWAY_"
# Settings given as JSON in the environment (tables in the TOML file).
_STRUCTURED = frozenset({"upstreams", "routes", "workflows", "issuer_keys"})
MIB = 1024 * 1024


class UnknownSecrets(StrEnum):
    """What to do with a bearer secret that no session registered."""

    REJECT = "reject"
    ALLOW = "allow"


_SEGMENT = re.compile(r"^([A-Za-z0-9._~-]+|\{[a-z_]{1,32}\})$")
_ROUTE_KINDS = tuple(kind.value for kind in CONFIGURABLE_KINDS)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not carry credentials, a query or a fragment")
    return value.rstrip("/")


class RouteSetting(BaseModel):
    """A route added by configuration, e.g. to a self-hosted ChatKit server.

    Configured routes are matched before the built-in ChatKit table.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pattern: str
    methods: tuple[str, ...]
    kind: str
    upstream: str = "default"
    exclusive: bool = False

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        segments = value.split("/")
        if segments[0] != "" or len(segments) < 2:
            raise ValueError(f"route pattern {value!r} must start with /")
        for index, segment in enumerate(segments[1:], start=1):
            if segment == "**" and index == len(segments) - 1:
                continue
            if not _SEGMENT.match(segment):
                raise ValueError(f"route pattern {value!r}: bad segment {segment!r}")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not set(value) <= METHODS:
            raise ValueError(f"methods must be some of {sorted(METHODS)}")
        return value

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value not in _ROUTE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(_ROUTE_KINDS)}")
        return value


class WorkflowSetting(BaseModel):
    """A workflow whose sessions the gateway issues itself (issuer mode)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: The URL of this workflow's ChatKit endpoint (its ``POST /chatkit``):
    #: client requests to ``/chatkit/<rest>`` go to ``<upstream>/<rest>``.
    upstream: str
    #: What this workflow's sessions may do (gateway/policy.py); the defaults
    #: count turns against the session limit and give other classes their own.
    policy: Policy = Field(default_factory=Policy)

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        return _http_url(value)


_WORKFLOW_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
#: RFC 6750 b64token: what an Authorization: Bearer value may hold.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]+")
#: GATEWAY_UPSTREAM_URL's value for "no hosted upstream": issuer mode only.
NO_UPSTREAM = "none"


class Settings(BaseSettings):
    """Validated gateway settings. Construct with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    # Every field's description is its documentation: scripts/docgen.py turns
    # them into docs/configuration.md and config/gateway.example.toml, and
    # tests/test_docgen.py fails when either is stale or a field has none.
    # Sections of the reference begin at the fields scripts/docgen.py names.

    # Listener.
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on; 0.0.0.0 (or ::) to accept connections from other hosts.",
    )
    port: int = Field(
        8080,
        ge=1,
        le=65535,
        description="TCP port for client and server traffic, /healthz, /readyz and /metrics.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Worker processes, each one event loop on at most one core; more than "
        "one needs a Redis store to share limits and revocations.",
    )
    log_level: str = Field("info", description="critical, error, warning, info or debug.")
    # Off by default: a log write per request.
    access_log: bool = Field(
        False,
        description="One log line per proxied request: method, path without query, status, "
        "route kind, outcome, client address, bytes in and out, durations, request ids. "
        "Never the query or a secret.",
    )
    replica_id: str = Field(
        "",
        description="This replica's name in the revocation audit log; empty means hostname:pid.",
    )

    # Upstream.
    upstream_url: str = Field(
        "https://api.openai.com",
        description="Where requests are forwarded: an http(s):// URL without credentials, "
        'query or fragment. "none" serves issued sessions only (needs '
        "GATEWAY_WORKFLOWS).",
    )
    upstreams: dict[str, str] = Field(
        default_factory=dict,
        description='More upstreams by name, for configured routes ("default" is '
        "GATEWAY_UPSTREAM_URL). JSON in the environment, a table in the TOML file.",
        examples=[{"selfhosted": "http://chatkit-server:8000"}],
    )
    routes: tuple[RouteSetting, ...] = Field(
        (),
        description="Routes matched before the built-in ChatKit table: pattern, methods, "
        "kind (client: client-secret admission; server; session_create; session_cancel), "
        "upstream (a name from GATEWAY_UPSTREAMS, default GATEWAY_UPSTREAM_URL) and "
        "exclusive (other methods on the pattern are 405). JSON in the environment, "
        "an array of tables in the TOML file.",
        examples=[
            [
                {
                    "pattern": "/chatkit",
                    "methods": ["POST"],
                    "kind": "client",
                    "upstream": "selfhosted",
                }
            ]
        ],
    )
    upstream_connect_timeout: float = Field(
        5.0, gt=0, description="Seconds to open a connection to the upstream; then 504."
    )
    # SSE streams may go quiet between events, so this is per read, not per response.
    upstream_read_timeout: float = Field(
        300.0,
        gt=0,
        description="Longest silence, in seconds, between reads of an upstream response "
        "(per read: SSE streams idle between events); then 504, or the stream is cut.",
    )
    upstream_write_timeout: float = Field(
        60.0, gt=0, description="Longest stall, in seconds, while sending a request body upstream."
    )
    upstream_keepalive_timeout: float = Field(
        4.0,
        gt=0,
        description="Seconds an idle pooled upstream connection is kept for reuse. Shorter "
        "than the upstreams' own idle timeout (uvicorn, which serves most ChatKit servers, "
        "closes after 5 s), so the gateway lets go first: a request sent on a connection "
        "the upstream is closing fails (502) without reaching it, and a POST is not retried.",
    )
    upstream_pool_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds to wait for a free upstream connection when "
        "GATEWAY_UPSTREAM_MAX_CONNECTIONS caps them; then 504.",
    )
    # A cap would also cap concurrent streams and make short requests queue
    # behind them; file descriptors (raised to the hard limit at start-up)
    # and GATEWAY_MAX_CONNECTIONS bound them instead.
    upstream_max_connections: int = Field(
        0,
        ge=0,
        description="Upstream connections per worker; 0 sets no cap. Each open SSE stream "
        "holds one, so a cap also caps streams.",
    )
    upstream_proxy: SecretStr | None = Field(
        None,
        description="Egress proxy for every upstream (http:// or https://, may carry "
        "user:password, never logged): plain http upstreams go to it in absolute form, "
        "https ones through CONNECT. HTTP_PROXY/HTTPS_PROXY are never read.",
        examples=["http://proxy.internal:3128"],
    )

    # Limits on what clients may send.
    max_body_bytes: int = Field(
        512 * MIB + MIB,
        ge=0,
        description="Largest request body in bytes (413 beyond): 513 MiB is a 512 MB upload "
        "plus multipart framing.",
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="Largest total size of a request's headers in bytes; 431 beyond.",
    )
    max_headers: int = Field(
        100, ge=8, description="Most header fields a request may carry; 431 beyond."
    )
    trust_forwarded_headers: bool = Field(
        False,
        description="Extend the client's X-Forwarded-For/Forwarded (true) or replace them "
        "(false). True only behind a proxy you run.",
    )

    # Store.
    redis_url: SecretStr | None = Field(
        None,
        description="redis://, rediss:// or unix:// URL of the shared store; unset, each "
        "process keeps an embedded store of its own.",
        examples=["redis://redis:6379/0"],
    )
    redis_cluster: bool = Field(
        False, description="The URL names a Redis Cluster node (needs GATEWAY_REDIS_URL)."
    )
    redis_timeout: float = Field(
        2.0, gt=0, description="Seconds before a Redis call counts as failed."
    )
    redis_sentinels: str = Field(
        "",
        description="Redis Sentinel: the sentinels, comma-separated host:port. "
        "GATEWAY_REDIS_URL, if set, then only gives the master's credentials and "
        "database; its host is ignored.",
    )
    redis_sentinel_master: str = Field(
        "", description="The name of the master the sentinels watch (with GATEWAY_REDIS_SENTINELS)."
    )
    redis_sentinel_password: SecretStr | None = Field(
        None,
        description="Password of the sentinels themselves, if they require one.",
        examples=["sentinel-password"],
    )
    # Replication is asynchronous: a revocation the master took but no
    # replica received yet dies with the master in a failover.
    redis_revocation_replicas: int = Field(
        0,
        ge=0,
        le=16,
        description="Replicas that must acknowledge a revocation (WAIT) before it counts as "
        "stored, so a failover cannot lose it; 0 takes the master's word. Until then it "
        "stays pending (enforced by this replica, written again), and an issued session's "
        "cancel answers 503.",
    )
    redis_revocation_wait_ms: int = Field(
        500,
        ge=1,
        le=60_000,
        description="How long each revocation waits for those acknowledgements, in milliseconds.",
    )
    key_prefix: str = Field(
        "ckg",
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="Prefix of every Redis key (1-32 of A-Z a-z 0-9 _ . -); separates "
        "gateways sharing a Redis.",
    )

    # Admission.
    unknown_secrets: UnknownSecrets = Field(
        UnknownSecrets.REJECT,
        description="Bearer secrets no session registered: reject (401) or allow (admitted "
        "under the default limit).",
    )
    default_max_requests_per_1_minute: int = Field(
        10, ge=1, description="Per-session limit when the session names none."
    )
    user_max_requests_per_1_minute: int | None = Field(
        None,
        ge=1,
        description="A second window across all sessions of one user; unset, none. Needs "
        "standalone Redis (not GATEWAY_REDIS_CLUSTER).",
        examples=[100],
    )
    enforce: bool = Field(
        True,
        description="false is report-only: evaluate, set the headers, log and count "
        "would-be rejections, but admit.",
    )
    secret_pepper: SecretStr | None = Field(
        None,
        description="HMAC key for hashing client secrets; identical on every replica "
        "sharing a Redis (changing it makes every registered session unknown).",
        examples=["change-me"],
    )
    # Shorter values exist for tests that must watch the window slide.
    window_seconds: int = Field(
        60,
        ge=1,
        le=3600,
        description="The sliding window's length in seconds; 60 is the ChatKit contract.",
    )

    # Revocation.
    revocation_ttl_seconds: int = Field(
        86400,
        ge=60,
        description="How long a revocation is kept when the session's expiry is unknown.",
    )
    session_retention_seconds: int = Field(
        3600,
        ge=0,
        description="How long after expiry a session's record (and revocation) is kept, so "
        'a late request is told "expired" rather than "unknown".',
    )

    # Issuer mode: the gateway is the session authority for these workflows
    # (self-hosted ChatKit servers), answering the session API itself.
    workflows: dict[str, WorkflowSetting] = Field(
        default_factory=dict,
        description="Issuer mode: workflow id -> {upstream: the URL of its ChatKit "
        "endpoint, policy: what its sessions may do (docs/policy.md)}; requests to "
        "/chatkit/<rest> go to <upstream>/<rest>. JSON in the environment, tables in the "
        "TOML file.",
        examples=[
            {
                "wf_support": {
                    "upstream": "http://chatkit-server:8001/chatkit",
                    "policy": {
                        "session_limit_counts": "turn",
                        "limits": {
                            "turn": {"user": {"1d": 200}},
                            "read": {"session": {"1m": 120}},
                        },
                        "limit_answer": "chatkit",
                    },
                }
            }
        ],
    )
    issuer_api_keys: SecretStr | None = Field(
        None,
        description='Keys allowed to create and cancel issued sessions: "sha256:<hex>" '
        "entries (chatkit-gateway new-api-key prints one) or the keys themselves (16+ "
        "characters), comma-separated.",
        examples=["sha256:" + "0" * 64],
    )
    # The app model and its validation live in gateway/apps.py.
    issuer_keys: dict[str, AppSetting] = Field(
        default_factory=dict,
        description="Apps by name, each with its own keys (sha256: digests only), the "
        "workflows it may create sessions for, and limits: max_sessions_per_minute (an "
        "exact window on its creates), max_active_sessions_per_user (per user and "
        'workflow) and on_too_many_sessions ("revoke_oldest" or "refuse"). '
        'GATEWAY_ISSUER_API_KEYS, if also set, is one more app named "default" that may '
        "do everything. JSON in the environment, tables in the TOML file (docs/tenancy.md).",
        examples=[
            {
                "support-app": {
                    "keys": ["sha256:" + "0" * 64],
                    "workflows": ["wf_support"],
                    "max_sessions_per_minute": 600,
                    "max_active_sessions_per_user": 5,
                    "on_too_many_sessions": "revoke_oldest",
                }
            }
        ],
    )
    session_default_expires_seconds: int = Field(
        600, ge=1, description="An issued session's expiry when the create body names none."
    )
    # OpenAI's maximum; may be raised, as custom mode has no refresh hook.
    session_max_expires_seconds: int = Field(
        600,
        ge=1,
        le=7 * 86400,
        description="The longest expiry a create may ask for (OpenAI's own maximum by default).",
    )
    # The JSON envelope of a POST /chatkit is read whole before admission (its
    # type decides what the request counts against).
    chatkit_max_envelope_bytes: int = Field(
        MIB,
        ge=1024,
        description="The largest POST /chatkit envelope (read before admission: its type "
        "decides what the request counts against); larger: 413.",
    )
    chatkit_max_transcribe_bytes: int = Field(
        16 * MIB,
        ge=1024,
        description="The largest input.transcribe envelope, which carries base64 audio.",
    )
    identity_signing_key: SecretStr | None = Field(
        None,
        description="Signs X-ChatKit-Assertion (HS256, 32+ bytes) for ChatKit servers "
        "reachable without the gateway.",
        examples=["a-random-key-of-at-least-32-bytes"],
    )
    identity_issuer: str = Field(
        "chatkit-gateway",
        min_length=1,
        max_length=256,
        description='The assertion\'s "iss" claim.',
    )
    identity_assertion_ttl_seconds: int = Field(
        60,
        ge=5,
        le=3600,
        description="How long an assertion is valid (never past the session's expiry).",
    )
    cors_origins: str = Field(
        "",
        description="Origins allowed to call client routes from a browser, comma-separated, "
        'or "*". Set, the gateway owns CORS on client routes.',
    )
    # The model, for self-hosted ChatKit servers (docs/budgets.md).
    model_api_key: SecretStr | None = Field(
        None,
        description="The OpenAI key for the model routes. Set, each admitted turn carries "
        "X-ChatKit-Model-Token, which the ChatKit server presents as its key on POST "
        "/v1/responses and /v1/chat/completions here; the gateway forwards those with this "
        "key, which never leaves it. Unset: no model tokens, no model routes.",
        examples=["sk-..."],
    )
    model_upstream: str = Field(
        "https://api.openai.com",
        description="Where model calls go: an origin (scheme://host[:port]); the route's "
        "path is appended.",
    )
    model_token_grace_seconds: int = Field(
        30,
        ge=0,
        le=3600,
        description="How long a model token outlives the end of its turn's response "
        "(never its session's expiry).",
    )
    model_max_body_bytes: int = Field(
        32 * MIB,
        ge=1024,
        description="The largest model request body; bodies are read whole to reserve "
        "their budget.",
    )
    model_prices: str | None = Field(
        None,
        description="A price table file (JSON: date, models -> USD per 1M input, "
        "cached_input and output tokens) replacing the shipped one wholesale.",
        examples=["/etc/chatkit-gateway/prices.json"],
    )
    audit_model_usage: bool = Field(
        False,
        description="Append one entry per turn to the audit stream with its model usage "
        "(reason model_usage), once its token's grace is over and its last model call "
        "has settled.",
    )

    # Admin listener: off unless a token is configured.
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token (16+ characters) for the admin API; unset, no admin listener.",
        examples=["a-long-random-token"],
    )
    admin_host: str = Field(
        "127.0.0.1",
        description="Address of the admin listener; keep it off the network clients reach.",
    )
    admin_port: int = Field(
        8081, ge=1, le=65535, description="Port of the admin listener; must differ from the port."
    )

    # -- Client connections: limits and timeouts against slow or hostile -----
    # -- clients, and the drain on shutdown (gateway/protocol.py) ------------
    max_target_bytes: int = Field(
        8192,
        ge=256,
        description="Longest request target (path and query) in bytes; 414 beyond, while reading.",
    )
    client_header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds for the whole request head (request line and headers) to "
        "arrive; then 408.",
    )
    client_keepalive_timeout: float = Field(
        75.0,
        gt=0,
        description="Seconds an idle keep-alive client connection stays open. Longer than "
        "the idle timeout of the clients and load balancers in front (aiohttp 15 s, most "
        "balancers 60 s), so they close first: a server that closes first races a request "
        "the client is sending, which then fails with a reset. Idle connections are the "
        "first shed when the connection cap is reached.",
    )
    client_body_timeout: float = Field(
        30.0, gt=0, description="Longest silence in seconds while a request body arrives; then 408."
    )
    # So a trickled body cannot hold an upstream connection.
    client_body_min_rate: int = Field(
        240,
        ge=0,
        description="Slowest average upload in bytes/s once the grace period is over "
        "(408 below it); 0 turns it off.",
    )
    client_body_min_rate_grace: float = Field(
        5.0, gt=0, description="Seconds of an upload before its minimum rate applies."
    )
    # Derived, it leaves room for an upstream socket per connection and for
    # what accept() takes before the cap applies (gateway/capacity.py).
    max_connections: int = Field(
        0,
        ge=0,
        description="Open client connections per worker; at the cap a new connection makes "
        "room by closing one without a complete request head, else an idle keep-alive one "
        "(503 overloaded when every other is in a request). 0 derives it from the "
        "file-descriptor limit: 56 at 256, 224 at 1024.",
    )
    # Behind a load balancer every connection may come from one address.
    max_connections_per_client: int = Field(
        0,
        ge=0,
        description="Open connections per client address and worker (503 beyond); 0 is no limit.",
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="How long requests in flight (SSE streams) may go on after SIGTERM "
        "before they are cut.",
    )
    # -- Observability -----------------------------------------------------
    log_format: LogFormat = Field(
        LogFormat.TEXT,
        description="text: one line per record, control characters escaped; json: one "
        "object per line.",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve /metrics on a listener of its own (then the client port no "
        "longer answers it).",
        examples=[9090],
    )
    metrics_host: str | None = Field(
        None,
        description="Host of the metrics listener; unset, the same as GATEWAY_HOST.",
        examples=["0.0.0.0"],
    )
    # Every replica would leave its Service at once during a Redis outage.
    readiness_requires_store: bool = Field(
        False,
        description="true: /readyz also fails while the store is unreachable (by default "
        "only while starting or draining; the store's state is in the body and in "
        "chatkit_gateway_store_up).",
    )
    store_check_interval_seconds: float = Field(
        5.0,
        gt=0,
        le=300,
        description="Seconds between the store checks behind /readyz and chatkit_gateway_store_up.",
    )
    # -- end of observability ----------------------------------------------

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() merges the environment over the TOML file and hands
        # the result in as init values, so tests never touch os.environ.
        return (init_settings,)

    @field_validator("model_upstream")
    @classmethod
    def _model_upstream_is_origin(cls, value: str) -> str:
        value = _http_url(value)
        if urlsplit(value).path:
            raise ValueError(
                "must be an origin (scheme://host[:port]): the route's path is appended"
            )
        return value

    @field_validator("model_api_key")
    @classmethod
    def _model_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return value

    @property
    def serves_model(self) -> bool:
        """Model tokens and model routes: on only with a model key."""
        return self.model_api_key is not None

    @field_validator("upstream_url")
    @classmethod
    def _upstream_is_http(cls, value: str) -> str:
        if value.strip().lower() == NO_UPSTREAM:
            return NO_UPSTREAM
        return _http_url(value)

    @field_validator("workflows")
    @classmethod
    def _workflow_ids(cls, value: dict[str, WorkflowSetting]) -> dict[str, WorkflowSetting]:
        for workflow_id in value:
            if not _WORKFLOW_ID.match(workflow_id):
                raise ValueError(f"workflow id {workflow_id!r} must match {_WORKFLOW_ID.pattern}")
        return value

    @field_validator("issuer_api_keys")
    @classmethod
    def _issuer_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        for entry in value.get_secret_value().split(","):
            entry = entry.strip()
            if entry.startswith("sha256:"):
                if not re.fullmatch(r"[0-9a-fA-F]{64}", entry[7:]):
                    raise ValueError("a sha256: entry needs exactly 64 hex digits")
            elif len(entry) < 16:
                raise ValueError("each key must be at least 16 characters (or a sha256: entry)")
        return value

    @field_validator("issuer_keys")
    @classmethod
    def _app_names(cls, value: dict[str, AppSetting]) -> dict[str, AppSetting]:
        seen: dict[str, str] = {}
        for name, app in value.items():
            if not APP_NAME.match(name):
                raise ValueError(f"app name {name!r} must match {APP_NAME.pattern}")
            for key in app.keys:
                if key in seen:
                    raise ValueError(f"app {name!r}: a key of app {seen[key]!r} is listed again")
                seen[key] = name
        return value

    @field_validator("identity_signing_key")
    @classmethod
    def _signing_key_strong(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value().encode()) < 32:
            # RFC 7518 3.2: an HS256 key must be at least as long as the hash.
            raise ValueError("must be at least 32 bytes (RFC 7518 section 3.2)")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",") if o.strip()):
            if origin == "*":
                continue
            parts = urlsplit(origin)
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or parts.path
                or parts.query
                or parts.fragment
                or parts.username
            ):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
        return value

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return tuple(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    @property
    def has_upstream(self) -> bool:
        """False when GATEWAY_UPSTREAM_URL=none: only issued sessions are served."""
        return self.upstream_url != NO_UPSTREAM

    @field_validator("upstreams")
    @classmethod
    def _upstreams_are_http(cls, value: dict[str, str]) -> dict[str, str]:
        if "default" in value:
            raise ValueError("'default' is GATEWAY_UPSTREAM_URL; name the others differently")
        return {name: _http_url(url) for name, url in value.items()}

    @field_validator("upstream_proxy")
    @classmethod
    def _proxy_is_http(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("must not carry a path, a query or a fragment")
        try:
            parts.port  # noqa: B018 (urlsplit checks the port only when asked)
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, value: str) -> str:
        for entry in (e.strip() for e in value.split(",") if e.strip()):
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{entry!r} is not host:port")
        return value

    @property
    def redis_sentinel_list(self) -> tuple[tuple[str, int], ...]:
        """The sentinels as (host, port) pairs; empty without Sentinel."""
        pairs = []
        for entry in (e.strip() for e in self.redis_sentinels.split(",") if e.strip()):
            host, _, port = entry.rpartition(":")
            pairs.append((host.strip("[]"), int(port)))
        return tuple(pairs)

    @property
    def uses_redis(self) -> bool:
        """Whether the store is Redis (a URL or Sentinel) rather than embedded."""
        return self.redis_url is not None or bool(self.redis_sentinel_list)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        value = value.lower()
        if value not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError("must be one of critical, error, warning, info, debug")
        return value

    @field_validator("admin_token")
    @classmethod
    def _admin_token_strong(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        # Read with the client secret's parser (RFC 6750 b64token): a token
        # outside it could never be presented, so say so at start-up.
        if not _BEARER_TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError("may hold only letters, digits and -._~+/=")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.redis_cluster and self.redis_url is None:
            raise ValueError("GATEWAY_REDIS_CLUSTER needs GATEWAY_REDIS_URL")
        if bool(self.redis_sentinel_list) != bool(self.redis_sentinel_master):
            raise ValueError(
                "GATEWAY_REDIS_SENTINELS and GATEWAY_REDIS_SENTINEL_MASTER go together"
            )
        if self.redis_sentinel_list and self.redis_cluster:
            raise ValueError("GATEWAY_REDIS_SENTINELS and GATEWAY_REDIS_CLUSTER exclude each other")
        if self.redis_revocation_replicas and not self.uses_redis:
            raise ValueError("GATEWAY_REDIS_REVOCATION_REPLICAS needs a Redis store")
        if self.redis_cluster and self.user_max_requests_per_1_minute is not None:
            # The user's window lives in another hash slot than the secret's
            # keys, so one atomic script cannot cover both on a cluster.
            raise ValueError(
                "GATEWAY_USER_MAX_REQUESTS_PER_1_MINUTE is not supported with "
                "GATEWAY_REDIS_CLUSTER=true (the user window is in another hash slot)"
            )
        for route in self.routes:
            if route.upstream != "default" and route.upstream not in self.upstreams:
                raise ValueError(
                    f"route {route.pattern!r} names upstream {route.upstream!r}, "
                    "which GATEWAY_UPSTREAMS does not define"
                )
        if self.workflows and self.issuer_api_keys is None and not self.issuer_keys:
            raise ValueError(
                "GATEWAY_WORKFLOWS needs GATEWAY_ISSUER_KEYS or GATEWAY_ISSUER_API_KEYS: "
                "nobody could create a session"
            )
        if self.issuer_keys and not self.workflows:
            raise ValueError("GATEWAY_ISSUER_KEYS needs GATEWAY_WORKFLOWS")
        for name, app in self.issuer_keys.items():
            for workflow_id in app.workflows:
                if workflow_id not in self.workflows:
                    raise ValueError(
                        f"GATEWAY_ISSUER_KEYS.{name}.workflows: {workflow_id!r} is not "
                        "in GATEWAY_WORKFLOWS"
                    )
        if DEFAULT_APP in self.issuer_keys and self.issuer_api_keys is not None:
            raise ValueError(
                f"GATEWAY_ISSUER_KEYS.{DEFAULT_APP}: the name is GATEWAY_ISSUER_API_KEYS's "
                "app; name the app differently or drop GATEWAY_ISSUER_API_KEYS"
            )
        if self.session_default_expires_seconds > self.session_max_expires_seconds:
            raise ValueError(
                "GATEWAY_SESSION_DEFAULT_EXPIRES_SECONDS exceeds "
                "GATEWAY_SESSION_MAX_EXPIRES_SECONDS"
            )
        for workflow_id, workflow in self.workflows.items():
            if workflow.policy.has_budgets and self.model_api_key is None:
                raise ValueError(
                    f"GATEWAY_WORKFLOWS.{workflow_id}.policy has tokens/usd budgets, which need "
                    "GATEWAY_MODEL_API_KEY: only model calls through the gateway are counted"
                )
        if self.model_api_key is not None and not self.workflows:
            raise ValueError(
                "GATEWAY_MODEL_API_KEY needs GATEWAY_WORKFLOWS: model tokens are given "
                "to the turns of issued sessions only"
            )
        if not self.has_upstream and not self.workflows:
            raise ValueError("GATEWAY_UPSTREAM_URL=none needs GATEWAY_WORKFLOWS")
        if self.admin_token is not None and self.admin_port == self.port:
            raise ValueError("GATEWAY_ADMIN_PORT must differ from GATEWAY_PORT")
        if self.metrics_port is not None and self.metrics_port in (
            self.port,
            self.admin_port if self.admin_token is not None else None,
        ):
            raise ValueError(
                "GATEWAY_METRICS_PORT must differ from GATEWAY_PORT and the admin port"
            )
        return self

    @property
    def effective_replica_id(self) -> str:
        return self.replica_id or f"{socket.gethostname()}:{os.getpid()}"

    def redacted(self) -> dict[str, Any]:
        """The effective configuration for the start-up log, secrets masked."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                out[name] = "***" if value.get_secret_value() else None
            elif isinstance(value, Enum):
                out[name] = value.value
            else:
                out[name] = value
        if self.redis_url is not None:
            parts = urlsplit(self.redis_url.get_secret_value())
            netloc = parts.hostname or ""
            if parts.port:
                netloc += f":{parts.port}"
            out["redis_url"] = f"{parts.scheme}://{netloc}{parts.path}"
        # Digests are not secrets, but nobody reading a log needs them.
        out["issuer_keys"] = {
            name: {**app, "keys": f"{len(app['keys'])} key(s)"}
            for name, app in out.get("issuer_keys", {}).items()
        }
        if self.upstream_proxy is not None:
            out["upstream_proxy"] = _without_credentials(self.upstream_proxy.get_secret_value())
        return out


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}"


def load_settings(
    environ: Mapping[str, str] | None = None, *, report_ignored: bool = True
) -> Settings:
    """Read settings from ``environ`` (default: the process environment).

    ``GATEWAY_CONFIG_FILE`` may name a TOML file of lower-case setting names;
    the environment wins over it. A secret setting may instead be read from
    the file named by ``GATEWAY_<NAME>_FILE``. Kubernetes service-link
    variables are ignored, with one warning naming them unless
    ``report_ignored`` is false (a worker process re-reading what the serve
    command already reported). Raises :class:`ConfigError` with one line per
    problem, naming the variable.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    toml_file = env.get(f"{ENV_PREFIX}CONFIG_FILE")
    if toml_file:
        try:
            with open(toml_file, "rb") as fh:
                values.update(tomllib.load(fh))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{ENV_PREFIX}CONFIG_FILE: cannot read {toml_file}: {exc}") from None
        except RecursionError:  # tomllib recurses into nested arrays and tables
            raise ConfigError(
                f"{ENV_PREFIX}CONFIG_FILE: cannot read {toml_file}: nested too deeply"
            ) from None
    service_links: list[str] = []
    from_files: dict[str, str] = {}
    given: set[str] = set()  # set by the environment itself
    for key, value in env.items():
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper == f"{ENV_PREFIX}CONFIG_FILE":
            continue
        name = upper.removeprefix(ENV_PREFIX).lower()
        if is_service_link(name, value):
            service_links.append(upper)
            continue
        if name not in Settings.model_fields:
            secret = name.removesuffix("_file")
            if name.endswith("_file") and secret in file_settings():
                if value:
                    from_files[secret] = _read_secret_file(upper, value)
                continue
            if name.endswith("_file") and secret in Settings.model_fields:
                raise ConfigError(f"{upper}: only secret settings can be read from a file")
            raise ConfigError(f"{upper}: unknown setting (check the spelling)")
        if value == "":  # an empty variable means "use the default"
            continue
        values[name] = _parse(name, upper, value)
        given.add(name)
    for name, content in from_files.items():
        variable = f"{ENV_PREFIX}{name.upper()}"
        if name in given:
            raise ConfigError(f"{variable} and {variable}_FILE are both set; keep one of them")
        values[name] = _parse(name, f"{variable}_FILE", content)
    if service_links and report_ignored:
        logger.warning(
            "Ignoring %d Kubernetes service-link variable(s) (set enableServiceLinks: "
            "false in the pod spec to stop them): %s",
            len(service_links),
            ", ".join(sorted(service_links)),
        )
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _parse(name: str, variable: str, value: str) -> Any:
    if name in _STRUCTURED:
        try:
            return jsonbody.loads(value.encode())
        except jsonbody.Unreadable as exc:
            raise ConfigError(
                f"{variable}: must be JSON (or set it in the TOML file): {exc}"
            ) from None
    return value


# -- secrets from files -------------------------------------------------------------
# Kubernetes Secrets and Docker secrets are usually mounted as files; a
# variable holding a secret is visible to anything that can read the
# process environment (docker inspect, /proc/<pid>/environ, crash reports).

# Secrets held in types other than SecretStr (JSON maps of keys, for
# instance); every SecretStr field is readable from a file without listing.
_FILE_SETTINGS_EXTRA = frozenset({"issuer_api_keys", "issuer_keys", "identity_signing_key"})


def _holds_secret(annotation: Any) -> bool:
    return annotation is SecretStr or any(_holds_secret(arg) for arg in get_args(annotation))


def file_settings() -> frozenset[str]:
    """The settings that ``GATEWAY_<NAME>_FILE`` may supply."""
    fields = Settings.model_fields
    return frozenset(
        name
        for name, field in fields.items()
        if _holds_secret(field.annotation) or name in _FILE_SETTINGS_EXTRA
    )


def _read_secret_file(variable: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            content = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{variable}: cannot read {path}: {reason}") from None
    # Editors and `echo` end files with a newline; it is never part of a secret.
    content = content.removesuffix("\n").removesuffix("\r")
    if not content:
        raise ConfigError(f"{variable}: {path} is empty")
    return content


def otel_traces_exporter(environ: Mapping[str, str] | None = None) -> str | None:
    """The OpenTelemetry exporter named by the standard ``OTEL_TRACES_EXPORTER``.

    Tracing is on only when it names one (and ``OTEL_SDK_DISABLED`` is not
    true); the SDK reads its other ``OTEL_*`` variables itself.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return None if name in ("", "none") else name


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        if loc:
            # The variable upper-case, the path inside its JSON as written:
            # a workflow id or route index keeps its own spelling.
            name = f"{ENV_PREFIX}{str(loc[0]).upper()}"
            if len(loc) > 1:
                name += "." + ".".join(str(part) for part in loc[1:])
        else:
            name = "configuration"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{name}: {message}")
    return "\n".join(lines)
