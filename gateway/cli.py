"""``chatkit-gateway`` commands: serve, revoke, revocations, new-api-key.

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

EXIT_FAILED = 1
EXIT_CONFIG = 2
#: An installed dependency lacks an internal the gateway relies on (gateway/internals.py).
EXIT_DEPENDENCY = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatkit-gateway",
        description="Authenticating, rate-limiting reverse proxy for OpenAI ChatKit. "
        "Configured by GATEWAY_* environment variables (see the README).",
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
    commands.add_parser(
        "new-api-key",
        help="print a new random issuer API key and the sha256: entry for GATEWAY_ISSUER_API_KEYS",
    )
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
    if args.command == "revoke":
        secret = None
        if args.secret_stdin:
            secret = sys.stdin.readline().strip()
            if not secret:
                print("chatkit-gateway: no secret on standard input", file=sys.stderr)
                return EXIT_CONFIG
        return asyncio.run(_revoke(settings, args.session_id, secret))
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
