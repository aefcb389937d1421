"""The self-hosted example's ChatKit server as a subprocess, and what it saw.

The server is the real one from ``examples/self-hosted/chatkit_app.py``
(``openai-chatkit``, context from the gateway's identity headers) on a free
port over real HTTP, with a recorder around it::

    async with ChatKitServerProcess() as chatkit:     # or ``with``, from sync code
        env = {"GATEWAY_WORKFLOWS": json.dumps({"wf_x": {"upstream": chatkit.url}})}
        ...  # drive a gateway in front of it
        await chatkit.wait_for(lambda: len(chatkit.seen()) == 1)
        [request] = chatkit.seen()
        assert request.context is not None and request.context.user == "u1"

Constructor options: ``signing_key`` (the ``GATEWAY_IDENTITY_SIGNING_KEY`` it
verifies ``X-ChatKit-Assertion`` with; unset, the headers are trusted),
``issuer``, ``workflow_ids`` (the workflows it serves; others get 401), ``env``.

What tests read:

- ``url``: the ChatKit endpoint, ``http://127.0.0.1:<port>/chatkit``.
- ``seen()``: every request that reached it, oldest first, as ``SeenRequest``:
  ``path``, ``status`` (what it answered), ``type`` (ChatKit request type, or
  None if it refused before reading the body), ``authorization`` (whether any
  ``Authorization`` header arrived: it never should through the gateway),
  ``chatkit_headers`` (every ``X-ChatKit-*`` header received, names lower-case,
  duplicates kept) and ``context`` (the ``RequestContext`` it built: ``user``,
  ``session_id``, ``workflow_id``, ``workflow_version``, ``expires_at``; None
  when it refused the identity). A request is recorded when its answer starts,
  so a stream that is still running is already there.
- ``uploads()``: bodies POSTed to ``/chatkit/upload/<any>`` (a direct upload
  URL), as ``(path, bytes received, complete)``; ``complete`` is false when the
  sender cut the body short.
- ``cancelled()``: streams the ChatKit SDK saw cut before their end
  (``handle_stream_cancelled``), as ``CancelledStream(user, session_id, thread_id)``.
- ``wait_for(predicate, timeout=5.0)``: poll until ``predicate()`` holds.
- ``stop()`` / ``astop()`` (or leaving the ``with``): SIGTERM, files released;
  ``seen()``, ``cancelled()`` and ``output()`` still answer, ``start()`` runs it again.

Answers: a message ``slow N`` (optionally ``slow N SECONDS``) streams N text
deltas ``"tick 1\\n"`` .. ``"tick N\\n"`` 0.2 s (or SECONDS) apart, so a test can
cut a live stream; any other message is echoed at once as ``<user> said: <text>``.
``threads_create_body(text)`` builds the request body, ``sse_events(raw)``
parses a stream's ``data:`` lines.

``WebAppProcess(gateway_url=..., api_key=..., workflow_id=...)`` runs the
example's app backend the same way (``base_url``, ``POST /api/chatkit/session``).

``model_stack(redis_url, model_api, ...)`` starts it behind two gateway
replicas whose model upstream is a fake model API, its Agents SDK calling the
model through replica B (``ModelStack``: replica A, replica B, the server);
``turn_token(chatkit, session_id)`` is the model token it was handed with the
session's last turn.

Run by itself: ``python -m tests.chatkit_server --port 9100 --record seen.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fake_model import FakeModel
from tests.harness import GatewayProcess, eventually, running
from tests.processes import REPO_ROOT, STARTUP_TIMEOUT, ServerProcess, free_port

EXAMPLE_DIR = REPO_ROOT / "examples" / "self-hosted"
_SLOW = re.compile(r"^slow (\d+)(?: (\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class SeenContext:
    """The request context the ChatKit server built (from the identity headers)."""

    user: str
    session_id: str
    workflow_id: str
    workflow_version: str | None
    expires_at: int | None


@dataclass(frozen=True)
class SeenRequest:
    """One HTTP request that reached the ChatKit server."""

    method: str
    path: str
    status: int
    type: str | None
    authorization: bool
    chatkit_headers: tuple[tuple[str, str], ...]
    context: SeenContext | None

    def header(self, name: str) -> str | None:
        """First value of the ``X-ChatKit-*`` header ``name`` (any case), or None."""
        wanted = name.lower()
        return next((value for key, value in self.chatkit_headers if key == wanted), None)


@dataclass(frozen=True)
class CancelledStream:
    """A stream the ChatKit SDK saw end early (client gone or connection cut)."""

    user: str
    session_id: str
    thread_id: str


def threads_create_body(text: str) -> bytes:
    """A ``threads.create`` request whose user message is ``text``."""
    message = {
        "content": [{"type": "input_text", "text": text}],
        "attachments": [],
        "inference_options": {},
    }
    return json.dumps({"type": "threads.create", "params": {"input": message}}).encode()


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON events of a ChatKit stream (``data: <json>`` blocks)."""
    events = []
    for block in raw.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    return events


def _example_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """This environment without variables that would change what the example does."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHATKIT_", "GATEWAY_", "EXAMPLE_", "OPENAI_"))
    }
    base["PYTHONUNBUFFERED"] = "1"
    base.update(env or {})
    return base


class ChatKitServerProcess(ServerProcess):
    """The example ChatKit server, recording what it sees (see the module docstring)."""

    name = "the ChatKit server"

    def __init__(
        self,
        *,
        signing_key: str | None = None,
        issuer: str | None = None,
        workflow_ids: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        self.record_path: Path | None = None  # while running; see _command()
        self._earlier_records: list[dict[str, Any]] = []  # from runs already stopped
        port = port or free_port()
        options = {
            "CHATKIT_ECHO_DELAY_SECONDS": "0",
            "CHATKIT_WORKFLOW_IDS": ",".join(workflow_ids),
        }
        if signing_key is not None:
            options["CHATKIT_IDENTITY_SIGNING_KEY"] = signing_key
        if issuer is not None:
            options["CHATKIT_IDENTITY_ISSUER"] = issuer
        argv = [sys.executable, "-m", "tests.chatkit_server", "--port", str(port)]
        super().__init__(
            argv,
            env=_example_env({**options, **(env or {})}),
            port=port,
            startup_timeout=startup_timeout,
        )

    @property
    def url(self) -> str:
        """The ChatKit endpoint: what ``GATEWAY_WORKFLOWS`` names as ``upstream``."""
        return f"{self.base_url}/chatkit"

    def _command(self) -> list[str]:
        # A fresh directory per run, removed by stop() once its records are read.
        self.record_path = Path(tempfile.mkdtemp(prefix="chatkit-server-")) / "seen.jsonl"
        self.record_path.touch()
        return [*super()._command(), "--record", str(self.record_path)]

    def _current_records(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        if self.record_path is None:
            return records
        for line in self.record_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line still being written
        return records

    def _records(self) -> list[dict[str, Any]]:
        return self._earlier_records + self._current_records()

    def _release(self) -> None:
        super()._release()
        if self.record_path is not None:
            self._earlier_records += self._current_records()
            shutil.rmtree(self.record_path.parent, ignore_errors=True)
            self.record_path = None

    def seen(self) -> list[SeenRequest]:
        """Every request recorded so far, oldest first."""
        seen = []
        for record in self._records():
            if record["event"] != "request":
                continue
            context = record["context"]
            seen.append(
                SeenRequest(
                    method=record["method"],
                    path=record["path"],
                    status=record["status"],
                    type=record["type"],
                    authorization=record["authorization"],
                    chatkit_headers=tuple((k, v) for k, v in record["chatkit_headers"]),
                    context=SeenContext(**context) if context is not None else None,
                )
            )
        return seen

    def uploads(self) -> list[tuple[str, int, bool]]:
        """Direct uploads to ``/chatkit/upload/...``: (path, bytes received, complete)."""
        return [
            (r["path"], r["bytes"], r["complete"])
            for r in self._records()
            if r["event"] == "upload"
        ]

    def cancelled(self) -> list[CancelledStream]:
        """Streams cut before their end, in the order the server noticed."""
        return [
            CancelledStream(r["user"], r["session_id"], r["thread_id"])
            for r in self._records()
            if r["event"] == "stream_cancelled"
        ]

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - a deadline is the point of this helper
    ) -> None:
        """Poll until ``predicate()`` holds; the failure lists what was recorded."""
        await eventually(
            predicate,
            timeout=timeout,
            what=lambda: (
                "the ChatKit server recorded:\n" + "\n".join(json.dumps(r) for r in self._records())
            ),
        )


class WebAppProcess(ServerProcess):
    """The example's app backend (``web_app.py``): the page and ``POST /api/chatkit/session``.

    ``gateway_url`` is where it (and the page) reach the gateway; ``api_key`` is
    the key it gives the openai SDK (one of ``GATEWAY_ISSUER_API_KEYS``).
    """

    name = "the example's web app"

    def __init__(
        self,
        *,
        gateway_url: str,
        api_key: str,
        workflow_id: str,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        port = port or free_port()
        options = {
            "EXAMPLE_GATEWAY_URL": gateway_url,
            "OPENAI_API_KEY": api_key,
            "EXAMPLE_WORKFLOW_ID": workflow_id,
        }
        argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLE_DIR), "--factory"]
        argv += ["web_app:create_app", "--host", "127.0.0.1", "--port", str(port)]
        super().__init__(
            argv,
            env=_example_env({**options, **(env or {})}),
            port=port,
            startup_timeout=startup_timeout,
        )


# --- the subprocess side -------------------------------------------------------------------
# Everything below runs in the server process (``python -m tests.chatkit_server``).


#: Replica A (where turns go), replica B (the ChatKit server's way to the
#: model) and the ChatKit server, as ``model_stack`` starts them.
ModelStack = tuple[GatewayProcess, GatewayProcess, ChatKitServerProcess]


@contextlib.asynccontextmanager
async def model_stack(
    redis_url: str,
    model_api: FakeModel,
    *,
    model: str,
    workflows: Mapping[str, Mapping[str, Any] | None],
    env: Mapping[str, str],
    env_a: Mapping[str, str] | None = None,
) -> AsyncIterator[ModelStack]:
    """Two gateway replicas on ``redis_url`` in front of a ChatKit server whose
    Agents SDK calls ``model`` through replica b (its model tokens work on
    either), with ``model_api`` (a fake of the model API) as the gateways'
    model upstream and its key as theirs. ``workflows`` maps each workflow to
    its policy (or None).
    """
    port_b = free_port()
    chatkit = ChatKitServerProcess(
        workflow_ids=list(workflows),
        env={
            "CHATKIT_MODEL_BASE_URL": f"http://127.0.0.1:{port_b}/v1",
            "CHATKIT_MODEL": model,
            # The Agents SDK would export traces to OpenAI: no network here.
            "OPENAI_AGENTS_DISABLE_TRACING": "1",
        },
    )
    entries = {
        wf: {"upstream": chatkit.url} | ({"policy": policy} if policy is not None else {})
        for wf, policy in workflows.items()
    }
    common = {
        "GATEWAY_WORKFLOWS": json.dumps(entries),
        "GATEWAY_MODEL_UPSTREAM": model_api.url,
        "GATEWAY_MODEL_API_KEY": model_api.api_key,
        **env,
    }
    a = GatewayProcess("none", redis_url=redis_url, env={**common, **(env_a or {})})
    b = GatewayProcess("none", redis_url=redis_url, env=common, port=port_b)
    async with running((chatkit, a, b)):
        yield a, b, chatkit


def turn_token(chatkit: ChatKitServerProcess, session_id: str) -> str:
    """The model token the ChatKit server was handed with the session's last turn."""
    seen: list[SeenRequest] = [
        r
        for r in chatkit.seen()
        if r.context is not None
        and r.context.session_id == session_id
        and r.type == "threads.create"
    ]
    token = seen[-1].header("x-chatkit-model-token")
    assert token is not None
    return token


def _serve(port: int, record_path: Path) -> None:
    import uvicorn

    # The example is a directory of modules, not a package: import it as its run script does.
    sys.path.insert(0, str(EXAMPLE_DIR))
    from chatkit.types import ThreadItem, ThreadMetadata, ThreadStreamEvent, UserMessageItem
    from chatkit_app import EchoChatKitServer, ServerConfig, _user_text, create_app
    from memory_store import MemoryStore, RequestContext
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    record_file = open(record_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    current: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("current")

    def write(record: dict[str, Any]) -> None:
        record_file.write(json.dumps(record) + "\n")  # one line per write: readers never see half

    class RecordingServer(EchoChatKitServer):
        async def process(self, request: str | bytes | bytearray, context: RequestContext) -> Any:
            record = current.get(None)
            if record is not None:
                try:
                    record["type"] = json.loads(request).get("type")
                except (ValueError, AttributeError):
                    record["type"] = None
                record["context"] = {
                    "user": context.user,
                    "session_id": context.session_id,
                    "workflow_id": context.workflow_id,
                    "workflow_version": context.workflow_version,
                    "expires_at": context.expires_at,
                }
            return await super().process(request, context)

        async def respond(
            self,
            thread: ThreadMetadata,
            input_user_message: UserMessageItem | None,
            context: RequestContext,
        ) -> AsyncIterator[ThreadStreamEvent]:
            slow = _SLOW.match(_user_text(input_user_message))
            if slow is None:
                async for event in super().respond(thread, input_user_message, context):
                    yield event
                return
            count, interval = int(slow[1]), float(slow[2] or 0.2)
            deltas = [f"tick {n}\n" for n in range(1, count + 1)]
            async for event in self.stream_text(thread, context, deltas, interval):
                yield event

        async def handle_stream_cancelled(
            self, thread: ThreadMetadata, pending_items: list[ThreadItem], context: RequestContext
        ) -> None:
            write(
                {
                    "event": "stream_cancelled",
                    "user": context.user,
                    "session_id": context.session_id,
                    "thread_id": thread.id,
                }
            )
            await super().handle_stream_cancelled(thread, pending_items, context)

    class Recorder:
        """Notes each request's headers, then writes the record as the answer starts."""

        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["path"] == "/healthz":
                await self.app(scope, receive, send)
                return
            if scope["path"].startswith("/chatkit/upload/"):
                await self.upload(scope, receive, send)
                return
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            record: dict[str, Any] = {
                "event": "request",
                "method": scope["method"],
                "path": scope["path"],
                "status": None,
                "type": None,
                "authorization": any(k == "authorization" for k, _ in headers),
                "chatkit_headers": [[k, v] for k, v in headers if k.startswith("x-chatkit-")],
                "context": None,
            }
            current.set(record)

            async def recording_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    record["status"] = message["status"]
                    write(record)
                await send(message)

            await self.app(scope, receive, recording_send)

        async def upload(self, scope: Scope, receive: Receive, send: Send) -> None:
            """A direct upload URL: counts the bytes that arrive (all, or until cut)."""
            received = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    write(
                        {
                            "event": "upload",
                            "path": scope["path"],
                            "bytes": received,
                            "complete": False,
                        }
                    )
                    return
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            write({"event": "upload", "path": scope["path"], "bytes": received, "complete": True})
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": b'{"ok": true}'})

    config = ServerConfig.from_env()
    app = create_app(config, RecordingServer(MemoryStore(), config))
    server = uvicorn.Server(
        uvicorn.Config(
            Recorder(app),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
    )
    server.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True, help="JSON-lines file to append to")
    args = parser.parse_args(argv)
    _serve(args.port, args.record)


if __name__ == "__main__":
    main()
