"""``chatkit-gateway`` commands: serve, revoke, revocations, user, unban, app, new-api-key.

Exit status: 0 success, 1 the operation failed (store unreachable...),
2 bad configuration or usage, 4 an installed dependency lacks an internal the
gateway relies on (``serve`` only; see gateway/internals.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway import __version__
from gateway.auth import new_api_key
from gateway.errors import ConfigError, StoreUnavailable
from gateway.settings import Settings, load_settings
from gateway.store.base import IndexedSession
from gateway.users import app_view, ban, parse_duration, user_view

EXIT_FAILED = 1
EXIT_CONFIG = 2
#: An installed dependency lacks an internal the gateway relies on (gateway/internals.py).
EXIT_DEPENDENCY = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatkit-gateway",
        description="Authenticating, rate-limiting reverse proxy for OpenAI ChatKit. "
        "Configured by GATEWAY_* environment variables (see docs/configuration.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gateway")
    revoke = commands.add_parser(
        "revoke", help="revoke a session's client secret in the configured store"
    )
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--session-id", help="the session id (cksess_...)")
    target.add_argument(
        "--secret-stdin",
        action="store_true",
        help="read the client secret from standard input (never from the command line)",
    )
    target.add_argument(
        "--user", help="every active session of this user, on every replica (a ban)"
    )
    revoke.add_argument(
        "--for",
        dest="ban_for",
        metavar="DURATION",
        help="with --user: also refuse the user's new sessions this long (90s, 15m, 2h, 7d)",
    )
    unban = commands.add_parser("unban", help="end a user's ban early")
    unban.add_argument("--user", required=True, help="the user id")
    user = commands.add_parser("user", help="show a user's active sessions and any ban")
    user.add_argument("user", help="the user id, as in the session's 'user'")
    app = commands.add_parser("app", help="show an issuer app's limits and current use")
    app.add_argument("name", help="the app's name in GATEWAY_ISSUER_KEYS (or 'default')")
    commands.add_parser(
        "new-api-key",
        help="print a new random issuer API key and the sha256: entry for GATEWAY_ISSUER_API_KEYS",
    )
    usage = commands.add_parser(
        "usage", help="show a user's model usage (tokens and dollars) as JSON"
    )
    usage.add_argument("--user", required=True, help="the user id sessions were created for")
    usage.add_argument("--workflow", help="only this workflow (default: every configured one)")
    tail = commands.add_parser("revocations", help="show the revocation audit log")
    tail.add_argument("--tail", type=int, default=20, metavar="N", help="newest N entries")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "new-api-key":
        # Needs no configuration: it only prints, and stores nothing anywhere.
        key, entry = new_api_key()
        print(f"key:   {key}")
        print(f"entry: {entry}")
        print("Give the key to the server code (its OpenAI api_key); configure only the entry.")
        return 0
    try:
        settings = load_settings()
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"chatkit-gateway: {line}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "serve":
        # Before gateway.server is imported: it subclasses what is checked.
        from gateway.internals import missing

        problem = missing()
        if problem is not None:
            print(f"chatkit-gateway: {problem}", file=sys.stderr)
            return EXIT_DEPENDENCY
        from gateway.server import serve

        serve(settings)
        return 0
    if not settings.uses_redis:
        print(
            "chatkit-gateway: GATEWAY_REDIS_URL is not set; the embedded store lives inside "
            "the serving process, so use its admin API instead.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if args.command == "revoke" and args.user is not None:
        try:
            for_seconds = parse_duration(args.ban_for) if args.ban_for else 0
        except ValueError as exc:
            print(f"chatkit-gateway: --for: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        return asyncio.run(_ban(settings, args.user, for_seconds))
    if args.command == "revoke" and args.ban_for is not None:
        print("chatkit-gateway: --for goes with --user", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "user":
        return asyncio.run(_user(settings, args.user))
    if args.command == "unban":
        return asyncio.run(_unban(settings, args.user))
    if args.command == "app":
        return asyncio.run(_app(settings, args.name))
    if args.command == "revoke":
        secret = None
        if args.secret_stdin:
            secret = sys.stdin.readline().strip()
            if not secret:
                print("chatkit-gateway: no secret on standard input", file=sys.stderr)
                return EXIT_CONFIG
        return asyncio.run(_revoke(settings, args.session_id, secret))
    if args.command == "usage":
        return asyncio.run(_usage(settings, args.user, args.workflow))
    if not 1 <= args.tail <= 10_000:
        print("chatkit-gateway: --tail must be between 1 and 10000", file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(_revocations(settings, args.tail))


async def _revoke(settings: Settings, session_id: str | None, secret: str | None) -> int:
    from gateway.app import build_store
    from gateway.auth import SecretHasher

    store = build_store(settings)
    pepper = settings.secret_pepper.get_secret_value().encode() if settings.secret_pepper else None
    secret_hash = SecretHasher(pepper)(secret.encode()) if secret else None
    try:
        result = await store.revoke(
            secret_hash=secret_hash,
            session_id=session_id,
            reason="cli",
            replica=f"cli@{settings.effective_replica_id}",
        )
    except StoreUnavailable as exc:
        print(f"chatkit-gateway: revocation failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await store.close()
    what = f"session {result.session_id}" if result.session_id else "secret"
    hash_note = f" (secret hash {result.secret_hash[:12]}...)" if result.secret_hash else ""
    state = "was already revoked" if result.already_revoked else "revoked"
    print(f"{what}{hash_note}: {state}")
    if result.secret_hash is None:
        print(
            "note: the gateway never saw this session's secret; the session id is "
            "marked revoked and a later registration of it is born revoked"
        )
    return 0


async def _usage(settings: Settings, user: str, workflow: str | None) -> int:
    import json

    from gateway.app import build_store
    from gateway.model.report import user_usage

    workflows = list(settings.workflows)
    if workflow is not None:
        if workflow not in workflows:
            print(f"chatkit-gateway: no workflow {workflow!r} is configured", file=sys.stderr)
            return EXIT_CONFIG
        workflows = [workflow]
    store = build_store(settings)
    try:
        report = await user_usage(store, workflows, user)
    except StoreUnavailable as exc:
        print(f"chatkit-gateway: cannot read usage: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await store.close()
    print(json.dumps(report, indent=2))
    return 0


async def _revocations(settings: Settings, tail: int) -> int:
    from gateway.app import build_store

    store = build_store(settings)
    try:
        entries = await store.audit_tail(tail)
    except StoreUnavailable as exc:
        print(f"chatkit-gateway: cannot read the audit log: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await store.close()
    for entry in entries:
        when = datetime.fromtimestamp(entry.at, UTC).isoformat(timespec="seconds")
        print(
            f"{when}  {entry.reason:<7} session={entry.session_id or '-'} "
            f"secret={entry.secret_hash_prefix or '-'} replica={entry.replica}"
        )
    return 0


async def _ban(settings: Settings, user: str, for_seconds: int) -> int:
    from gateway.app import build_store

    store = build_store(settings)
    replica = f"cli@{settings.effective_replica_id}"

    async def revoke(session: IndexedSession) -> bool:
        await store.revoke(
            secret_hash=session.secret_hash,
            session_id=session.session_id,
            reason="ban",
            replica=replica,
        )
        return True

    try:
        result = await ban(store, revoke, user, for_seconds=for_seconds)
    except StoreUnavailable as exc:
        print(f"chatkit-gateway: the ban failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await store.close()
    for session, _ in result.revoked:
        print(f"session {session.session_id} (app {session.app or '-'}): revoked")
    print(f"user {user}: {len(result.revoked)} active session(s) revoked")
    if for_seconds:
        print(f"user {user}: new sessions refused for {for_seconds} s")
    return 0


async def _user(settings: Settings, user: str) -> int:
    from gateway.app import build_store

    store = build_store(settings)
    try:
        view = await user_view(store, user)
    except StoreUnavailable as exc:
        print(f"chatkit-gateway: cannot read the user's sessions: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await store.close()
    ban_left = view["banned_for_seconds"]
    print(f"user {user}: " + (f"banned for {ban_left:.0f} s more" if ban_left else "not banned"))
    for s in view["sessions"]:
        expires = datetime.fromtimestamp(s["expires_at"], UTC).isoformat(timespec="seconds")
        windows = " ".join(
            f"{name}={w['remaining']}/{w['limit']}" for name, w in s["windows"].items()
        )
        print(
            f"{s['session_id']}  app={s['app'] or '-'} workflow={s['workflow_id'] or '-'} "
            f"expires={expires} remaining {windows}"
        )
    for workflow, mine in view["user_windows"].items():
        windows = " ".join(f"{name}={w['remaining']}/{w['limit']}" for name, w in mine.items())
        print(f"user windows  workflow={workflow or '-'} remaining {windows}")
    return 0


async def _unban(settings: Settings, user: str) -> int:
    from gateway.app import build_store

    store = build_store(settings)
    try:
        lifted = await store.lift_ban(user)
    except StoreUnavailable as exc:
        print(f"chatkit-gateway: the ban was not lifted: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await store.close()
    print(f"user {user}: " + ("ban lifted" if lifted else "was not banned"))
    return 0


async def _app(settings: Settings, name: str) -> int:
    from gateway.app import build_store
    from gateway.apps import AppKeys, build_apps

    app = AppKeys(build_apps(settings)).app(name)
    if app is None:
        print(f"chatkit-gateway: no app named {name!r} is configured", file=sys.stderr)
        return EXIT_CONFIG
    store = build_store(settings)
    try:
        stats = await store.app_stats(name)
    except StoreUnavailable as exc:
        print(f"chatkit-gateway: cannot read the app's use: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await store.close()
    for key, value in app_view(app, stats).items():
        print(f"{key}: {value if value is not None else '-'}")
    return 0
