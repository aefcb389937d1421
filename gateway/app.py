"""Assembly: settings in, one ASGI application out.

The outer app is a few lines of raw ASGI that send the gateway's own
endpoints (/healthz, /readyz, /metrics) to a small starlette app and
everything else to the :class:`~gateway.proxy.Proxy`. Start-up builds the
store, the upstream client and the revocation machinery; a bad setting
stops the process, an unreachable Redis does not (client routes answer 503
until it answers).

/readyz answers 200 while the process accepts traffic and 503 while it is
starting or draining; the store's state is in its body (see gateway.health).
With GATEWAY_METRICS_PORT, /metrics moves to a listener of its own.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as LocalRoute

from gateway.admin import AdminServer, Listener
from gateway.admission import Gatekeeper
from gateway.apps import AppKeys, build_apps
from gateway.auth import SecretHasher
from gateway.capacity import SHED_COUNTER
from gateway.errors import EXCEPTION_HANDLERS, ConfigError, StoreUnavailable, error_body
from gateway.health import StoreMonitor
from gateway.issuer import Issuer, SessionIds
from gateway.lifecycle import draining
from gateway.metrics import Metrics
from gateway.model.metering import Metering
from gateway.model.prices import Prices
from gateway.model.routes import ModelLabels, ModelUpstream
from gateway.model.tokens import ModelTokens
from gateway.proxy import Proxy
from gateway.revocation import Revoker
from gateway.routes import Kind, Route, table_with
from gateway.sessions import SessionControl
from gateway.settings import Settings, UnknownSecrets, load_settings, otel_traces_exporter
from gateway.store.base import Store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore, connect, connect_sentinel
from gateway.telemetry import Telemetry
from gateway.tracing import Tracing, configure
from gateway.types import Receive, Scope, Send
from gateway.upstream import create_session

logger = logging.getLogger("gateway")

LOCAL_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@dataclass
class Components:
    """What start-up builds; the admin API and tests reach in through this."""

    settings: Settings
    store: Store
    revoker: Revoker
    hasher: SecretHasher
    metrics: Metrics
    session: aiohttp.ClientSession
    proxy: Proxy
    monitor: StoreMonitor
    model: ModelUpstream | None = None


def build_store(settings: Settings, *, serving: bool = False) -> Store:
    """The configured store; ``serving`` for the gateway itself, which logs
    Redis outages and a full Redis (a one-shot command reports its own error)."""
    if not settings.uses_redis:
        return MemoryStore(
            window_seconds=settings.window_seconds,
            retention_seconds=settings.session_retention_seconds,
            revocation_ttl_seconds=settings.revocation_ttl_seconds,
        )
    url = settings.redis_url.get_secret_value() if settings.redis_url is not None else ""
    sentinel_password = settings.redis_sentinel_password
    return RedisStore(
        connect_sentinel(
            settings.redis_sentinel_list,
            settings.redis_sentinel_master,
            url=url,
            timeout=settings.redis_timeout,
            sentinel_password=sentinel_password.get_secret_value() if sentinel_password else None,
        )
        if settings.redis_sentinel_list
        else connect(url, cluster=settings.redis_cluster, timeout=settings.redis_timeout),
        prefix=settings.key_prefix,
        window_seconds=settings.window_seconds,
        retention_seconds=settings.session_retention_seconds,
        revocation_ttl_seconds=settings.revocation_ttl_seconds,
        timeout=settings.redis_timeout,
        pubsub_url=url,
        report_availability=serving,
        revocation_replicas=settings.redis_revocation_replicas,
        revocation_wait_ms=settings.redis_revocation_wait_ms,
    )


def build_issuer(
    settings: Settings, store: Store, revoker: Revoker, hasher: SecretHasher, metrics: Metrics
) -> Issuer | None:
    """Issuer mode's session API, when workflows are configured."""
    if not settings.workflows or (settings.issuer_api_keys is None and not settings.issuer_keys):
        return None
    pepper = settings.secret_pepper
    return Issuer(
        workflows=frozenset(settings.workflows),
        apps=AppKeys(build_apps(settings)),
        store=store,
        revoker=revoker,
        hasher=hasher,
        metrics=metrics,
        ids=SessionIds(pepper.get_secret_value().encode() if pepper else None),
        default_limit=settings.default_max_requests_per_1_minute,
        default_expires_seconds=settings.session_default_expires_seconds,
        max_expires_seconds=settings.session_max_expires_seconds,
        serves_every_create=not settings.has_upstream,
        policies={wf: w.policy for wf, w in settings.workflows.items()},
    )


def build_model_upstream(
    settings: Settings, store: Store, revoker: Revoker, hasher: SecretHasher, metrics: Metrics
) -> ModelUpstream | None:
    """The model routes' upstream, tokens and metering, when a model key is configured."""
    if settings.model_api_key is None:
        return None
    metering = Metering(
        store,
        metrics=metrics,
        prices=Prices.load(settings.model_prices),
        policies={name: workflow.policy for name, workflow in settings.workflows.items()},
        labels=ModelLabels(),
        audit=settings.audit_model_usage,
        grace_seconds=settings.model_token_grace_seconds,
        replica=settings.effective_replica_id,
    )
    return ModelUpstream(
        origin=settings.model_upstream,
        api_key=settings.model_api_key.get_secret_value(),
        tokens=ModelTokens(
            store,
            hasher=hasher,
            revoker=revoker,
            grace_seconds=settings.model_token_grace_seconds,
        ),
        metering=metering,
        max_body=settings.model_max_body_bytes,
    )


class GatewayApp:
    """The ASGI application uvicorn serves."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._tracing = tracing
        self.components: Components | None = None
        self._draining = False
        routes = [LocalRoute("/healthz", self._healthz), LocalRoute("/readyz", self._readyz)]
        self._local_paths = LOCAL_PATHS
        if settings.metrics_port is None:
            routes.append(LocalRoute("/metrics", self._metrics))
        else:
            # Off the client port: scrapes come from the metrics listener only.
            self._local_paths = LOCAL_PATHS - {"/metrics"}
        self._local = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
        self._local.router.redirect_slashes = False  # /healthz/ is no route, not a redirect
        self._admin: AdminServer | None = None
        self._metrics_listener: Listener | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            components = self.components
            if scope["path"] in self._local_paths or components is None:
                await self._local(scope, receive, send)
            else:
                await components.proxy(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        # websocket: not part of the ChatKit API; the server closes it.

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            await self.startup()
        except Exception as exc:
            # The traceback says where (a port taken, a listener that would not
            # start); uvicorn's own line has only the message.
            logger.critical("Start-up failed: %s", exc, exc_info=True)
            # Whatever had started (store checks, the revocation feed, the
            # upstream pool) is stopped before the process exits.
            await self.shutdown()
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        state = scope.get("state")
        if state is not None and self.components is not None:
            # The lifespan state is what uvicorn shares with its connections:
            # the protocol counts the connections it sheds through this.
            state[SHED_COUNTER] = self.components.metrics.count_shed_connection
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await self.shutdown()
        finally:
            await send({"type": "lifespan.shutdown.complete"})

    async def startup(self) -> None:
        settings = self.settings
        store = self._store or build_store(settings, serving=True)
        try:
            await store.ping()
        except StoreUnavailable as exc:
            # Exiting would turn a Redis outage during a rollout into a crash
            # loop. Client routes answer 503 store_unavailable (fail closed)
            # until Redis answers; every operation connects afresh.
            logger.warning(
                "Starting although the store does not answer yet: %s", type(exc).__name__
            )
        if isinstance(store, MemoryStore):
            logger.warning(
                "No GATEWAY_REDIS_URL: using the embedded store. Its state is per process, "
                "so limits and revocations are not shared between replicas or workers."
            )
        metrics = Metrics(workers=settings.workers)
        metrics.workflows = frozenset(settings.workflows)
        metrics.apps = frozenset(app.name for app in build_apps(settings))
        if self._tracing is None:
            self._tracing = configure(otel_traces_exporter())
        metrics.store_full.set_function(lambda: 1.0 if store.full else 0.0)
        hasher = SecretHasher(
            settings.secret_pepper.get_secret_value().encode() if settings.secret_pepper else None
        )
        revoker = Revoker(store, replica=settings.effective_replica_id, metrics=metrics)
        gatekeeper = Gatekeeper(
            store,
            hasher=hasher,
            revoker=revoker,
            metrics=metrics,
            allow_unknown=settings.unknown_secrets is UnknownSecrets.ALLOW,
            default_limit=settings.default_max_requests_per_1_minute,
            user_limit=settings.user_max_requests_per_1_minute,
            window_seconds=settings.window_seconds,
            enforce=settings.enforce,
        )
        session = create_session(settings)
        routes = table_with(
            (
                Route(r.pattern, frozenset(r.methods), Kind(r.kind), r.upstream, r.exclusive)
                for r in settings.routes
            ),
            issued=bool(settings.workflows),
            hosted=settings.has_upstream,
            model=settings.serves_model,
        )
        model = build_model_upstream(settings, store, revoker, hasher, metrics)
        sessions = SessionControl(
            store=store,
            revoker=revoker,
            hasher=hasher,
            metrics=metrics,
            default_limit=settings.default_max_requests_per_1_minute,
            issuer=build_issuer(settings, store, revoker, hasher, metrics),
            forwarding=settings.has_upstream,
        )
        proxy = Proxy(
            routes=routes,
            settings=settings,
            session=session,
            gatekeeper=gatekeeper,
            revoker=revoker,
            sessions=sessions,
            metrics=metrics,
            telemetry=Telemetry(metrics, tracing=self._tracing, access_log=settings.access_log),
            model=model,
        )
        revoker.start()
        monitor = StoreMonitor(
            store,
            metrics=metrics,
            interval=settings.store_check_interval_seconds,
            timeout=settings.redis_timeout,
        )
        monitor.start()
        self.components = Components(
            settings, store, revoker, hasher, metrics, session, proxy, monitor, model
        )
        if settings.admin_token is not None:
            self._admin = AdminServer(self.components)
            await self._admin.start()
        if settings.metrics_port is not None:
            self._metrics_listener = Listener(
                Starlette(
                    routes=[LocalRoute("/metrics", self._metrics)],
                    exception_handlers=EXCEPTION_HANDLERS,
                ),
                host=settings.metrics_host or settings.host,
                port=settings.metrics_port,
                name="Metrics",
            )
            await self._metrics_listener.start()
        tune_gc()
        logger.info("chatkit-gateway ready: %s", settings.redacted())

    async def shutdown(self) -> None:
        components = self.components
        if components is None:
            return
        self._draining = True
        for listener in (self._admin, self._metrics_listener):
            if listener is not None:
                await listener.stop()
        await components.monitor.stop()
        await components.revoker.stop()
        if components.model is not None:
            await components.model.tokens.close()
            await components.model.metering.close()
        await components.session.close()
        await components.store.close()
        if self._tracing is not None:
            self._tracing.shutdown()

    # -- the gateway's own endpoints ------------------------------------------------

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _readyz(self, request: Request) -> Response:
        components = self.components
        if components is None:
            return _unready("The gateway is starting.", code="starting")
        if self._draining or draining.is_set():
            return _unready("The gateway is shutting down.", code="draining")
        store = components.monitor.report()
        if self.settings.readiness_requires_store and components.monitor.up is False:
            return _unready(
                f"The store is unreachable: {components.monitor.error}", code="store_unavailable"
            )
        return JSONResponse(
            {
                "status": "ready",
                "store": store,
                "pending_revocations": components.revoker.pending,
                "store_full": components.store.full,
                "revocation_listener": components.revoker.listener_state,
            }
        )

    async def _metrics(self, request: Request) -> Response:
        if self.components is None:
            return _unready("The gateway is starting.", code="starting")
        return Response(self.components.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long-running proxy.

    Everything built at start-up lives for the whole process: freezing it
    keeps full collections from walking it again and again. A request makes
    a few hundred short-lived objects, so the default gen-0 threshold (700
    allocations) ran a collection every couple of requests; most of them
    free nothing, since request objects die by reference counting.
    Measured with scripts/bench: less CPU per request on every route.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _unready(message: str, *, code: str) -> Response:
    return Response(
        error_body(message, type="api_error", code=code),
        status_code=503,
        media_type="application/json",
    )


def create_app() -> GatewayApp:
    """uvicorn's factory: each worker process reads the environment itself."""
    try:
        # The serve command read the same environment and reported what it ignored.
        settings = load_settings(report_ignored=False)
    except ConfigError as exc:
        raise SystemExit(f"chatkit-gateway: {exc}") from None
    return GatewayApp(settings)
