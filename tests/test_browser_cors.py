"""A real browser on one origin talking to the gateway on another.

The page is the example's own (``examples/self-hosted/static/index.html``,
served by its app backend on ``http://127.0.0.1:<A>``), with the custom-mode
``fetch`` it hands to ChatKit JS (``gateway-fetch.js``). ChatKit JS itself
lives on OpenAI's CDN, out of reach here, so the tests call that ``fetch``
the way ChatKit JS does: ``POST <gateway>/chatkit`` with a JSON body. The
gateway is on ``http://localhost:<B>``, another origin, so every call is a
CORS request, preflighted because of its ``Authorization`` header. What a
page can or cannot see of those answers is decided by Chromium, not by us.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.async_api import Page

from tests.browser import chromium
from tests.chatkit_server import ChatKitServerProcess, WebAppProcess, threads_create_body
from tests.harness import GatewayProcess, free_port

WORKFLOW = "wf_browser"
API_KEY = "sk-test-browser-issuer-key"
LIST_THREADS = json.dumps({"type": "threads.list", "params": {}})


@dataclass
class Stack:
    chatkit: ChatKitServerProcess
    gateway_url: str  # as the page sees it: http://localhost:<B>
    page_origin: str  # the allowed origin: http://127.0.0.1:<A>
    app_port: int


@asynccontextmanager
async def stack(
    redis_url: str,
    app_env: Mapping[str, str] | None = None,
    policy: Mapping[str, Any] | None = None,
) -> AsyncIterator[Stack]:
    """ChatKit server, gateway (issuer mode, CORS for origin A) and the app on origin A."""
    app_port = free_port()
    origin = f"http://127.0.0.1:{app_port}"
    async with ChatKitServerProcess(workflow_ids=[WORKFLOW]) as chatkit:
        env = {
            # The page's requests are reads; this session limit counts them all.
            "GATEWAY_WORKFLOWS": json.dumps(
                {
                    WORKFLOW: {
                        "upstream": chatkit.url,
                        "policy": policy or {"session_limit_counts": "all"},
                    }
                }
            ),
            "GATEWAY_ISSUER_API_KEYS": "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest(),
            "GATEWAY_CORS_ORIGINS": origin,
        }
        async with GatewayProcess("http://127.0.0.1:9", redis_url=redis_url, env=env) as gateway:
            gateway_url = f"http://localhost:{gateway.port}"
            async with WebAppProcess(
                gateway_url=gateway_url,
                api_key=API_KEY,
                workflow_id=WORKFLOW,
                port=app_port,
                env=app_env,
            ):
                yield Stack(chatkit, gateway_url, origin, app_port)


@asynccontextmanager
async def example_page(url: str) -> AsyncIterator[Page]:
    """The example's page at ``url``; its ChatKit JS (on a CDN) fails to load, offline."""
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(url)
        await page.wait_for_function("typeof window.gatewayFetch === 'function'")
        yield page


# Runs in the page: one call through the example's fetch, the stream read with a
# ReadableStream reader, each `data:` event stamped with the time it arrived.
READ_STREAM = """
async ({url, body}) => {
  const response = await window.gatewayFetch(url, {
    method: "POST", headers: {"Content-Type": "application/json"}, body,
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const events = [];
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (block.startsWith("data: ")) {
        events.push({at: performance.now(), event: JSON.parse(block.slice(6))});
      }
    }
  }
  return {status: response.status, events};
}
"""

# Runs in the page: calls until one is refused, and what page JS can read of it.
UNTIL_REFUSED = """
async ({url, body, attempts}) => {
  for (let i = 0; i < attempts; i++) {
    const response = await window.gatewayFetch(url, {
      method: "POST", headers: {"Content-Type": "application/json"}, body,
    });
    if (response.status !== 200) {
      return {
        status: response.status,
        retryAfter: response.headers.get("retry-after"),
        retryAfterMs: response.headers.get("retry-after-ms"),
        remaining: response.headers.get("x-ratelimit-remaining-requests"),
        body: await response.json(),
        admitted: i,
      };
    }
    await response.arrayBuffer();
  }
  return null;
}
"""


async def test_a_stream_from_another_origin_arrives_event_by_event(redis_url: str) -> None:
    async with stack(redis_url) as s, example_page(f"{s.page_origin}/") as page:
        result: dict[str, Any] = await page.evaluate(
            READ_STREAM,
            {
                "url": f"{s.gateway_url}/chatkit",
                "body": threads_create_body("slow 4 0.25").decode(),
            },
        )
        assert result["status"] == 200
        deltas = [
            e["at"]
            for e in result["events"]
            if e["event"].get("update", {}).get("type")
            == "assistant_message.content_part.text_delta"
        ]
        assert len(deltas) == 4
        # 0.25 s apart at the server, so at least ~0.75 s from first to last in the
        # page: the gateway and the browser passed them on as they came.
        assert deltas[-1] - deltas[0] >= 600
        assert result["events"][0]["event"]["type"] == "thread.created"
        # Only the POST reached the ChatKit server: the gateway answered the preflight.
        [seen] = s.chatkit.seen()
        assert seen.method == "POST"
        assert seen.authorization is False
        assert seen.context is not None
        assert seen.context.user.startswith("user_")  # the example's cookie user


async def test_a_page_on_an_origin_not_configured_cannot_read_the_gateway(
    redis_url: str,
) -> None:
    # The same page, on localhost:<A> rather than 127.0.0.1:<A>: another origin,
    # not in GATEWAY_CORS_ORIGINS. The browser must refuse it the answer, which is
    # what shows that the allowed page above passed a real CORS check.
    async with stack(redis_url) as s, example_page(f"http://localhost:{s.app_port}/") as page:
        error = await page.evaluate(
            """async (url) => {
                try { await window.gatewayFetch(url, {method: "POST", body: "{}"}); return null; }
                catch (e) { return e.name + ": " + e.message; }
            }""",
            f"{s.gateway_url}/chatkit",
        )
        assert error is not None
        assert error.startswith("TypeError")
        assert s.chatkit.seen() == []


async def test_a_429_and_its_retry_after_are_readable_by_the_page(redis_url: str) -> None:
    async with (
        stack(redis_url, {"EXAMPLE_MAX_REQUESTS_PER_1_MINUTE": "2"}) as s,
        example_page(f"{s.page_origin}/") as page,
    ):
        refused = await page.evaluate(
            UNTIL_REFUSED, {"url": f"{s.gateway_url}/chatkit", "body": LIST_THREADS, "attempts": 5}
        )
        assert refused is not None, "the session's limit of 2 was never reached"
        assert refused["admitted"] == 2
        assert refused["status"] == 429
        assert refused["body"]["error"]["code"] == "rate_limit_exceeded"
        assert refused["retryAfter"] is not None
        assert 1 <= int(refused["retryAfter"]) <= 60
        assert refused["retryAfterMs"] is not None
        assert refused["remaining"] == "0"


async def test_a_refused_turn_reaches_the_page_as_a_chatkit_error_event(redis_url: str) -> None:
    # limit_answer "chatkit": what ChatKit JS reads as an in-conversation error
    # (a 200 stream with one error event), not a failed request.
    async with (
        stack(
            redis_url, {"EXAMPLE_MAX_REQUESTS_PER_1_MINUTE": "1"}, {"limit_answer": "chatkit"}
        ) as s,
        example_page(f"{s.page_origin}/") as page,
    ):
        call = {"url": f"{s.gateway_url}/chatkit", "body": threads_create_body("hi").decode()}
        first: dict[str, Any] = await page.evaluate(READ_STREAM, call)
        assert first["status"] == 200
        assert first["events"][0]["event"]["type"] == "thread.created"
        refused: dict[str, Any] = await page.evaluate(READ_STREAM, call)
        assert refused["status"] == 200
        [event] = [e["event"] for e in refused["events"]]
        assert event["type"] == "error"
        assert event["allow_retry"] is True
        assert "Rate limit reached" in event["message"]
        # Still a rate-limit answer the page can read: Retry-After is exposed.
        retry_after = await page.evaluate(
            """async ({url, body}) => {
                const r = await window.gatewayFetch(url, {method: "POST", body,
                  headers: {"Content-Type": "application/json"}});
                await r.text();
                return r.headers.get("retry-after");
            }""",
            call,
        )
        assert retry_after is not None
        assert 1 <= int(retry_after) <= 60
        assert len(s.chatkit.seen()) == 1  # only the admitted turn reached the server


async def test_an_expired_secret_is_renewed_and_the_call_retried_once(redis_url: str) -> None:
    async with (
        # Long enough that the first call is made with the first secret even
        # on a loaded machine; the poll below waits for its expiry.
        stack(redis_url, {"EXAMPLE_SESSION_SECONDS": "3"}) as s,
        example_page(f"{s.page_origin}/") as page,
    ):
        result = await page.evaluate(
            """async ({url, body}) => {
                // The app's session endpoint, counted, with an expiry an hour late:
                // as a page with a slow clock would believe. Only the gateway's 401
                // client_secret_expired can then make the fetch renew.
                let sessions = 0, first = null;
                const fetchWithSkew = createGatewayFetch({
                  getSession: async () => {
                    sessions++;
                    const r = await fetch("/api/chatkit/session", {method: "POST"});
                    const session = await r.json();
                    first = first ?? session.client_secret;
                    return {...session, expires_at: session.expires_at + 3600};
                  },
                });
                const call = () => fetchWithSkew(url, {
                  method: "POST", headers: {"Content-Type": "application/json"}, body,
                });
                const before = (await call()).status;
                // Poll, with a deadline, until the gateway calls the first secret expired.
                const deadline = performance.now() + 10000;
                let code = null;
                while (code !== "client_secret_expired" && performance.now() < deadline) {
                  const r = await fetch(url, {method: "POST", body,
                    headers: {"Authorization": "Bearer " + first}});
                  code = r.status === 401 ? (await r.json()).error.code : null;
                  await new Promise((resolve) => setTimeout(resolve, 50));
                }
                const after = (await call()).status;
                return {before, code, after, sessions};
            }""",
            {"url": f"{s.gateway_url}/chatkit", "body": LIST_THREADS},
        )
        assert result == {
            "before": 200,
            "code": "client_secret_expired",
            "after": 200,
            "sessions": 2,
        }
        # The first session's calls (the polls included), then the renewed one's:
        # two sessions, one user.
        contexts = [seen.context for seen in s.chatkit.seen() if seen.context is not None]
        assert len({context.session_id for context in contexts}) == 2
        assert contexts[0].session_id != contexts[-1].session_id
        assert len({context.user for context in contexts}) == 1


@pytest.fixture(autouse=True)
def _browser_present() -> None:
    """Fail fast, with the install command, before any process starts."""
    from tests.browser import chromium_path

    chromium_path()
