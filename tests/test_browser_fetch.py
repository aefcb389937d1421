"""The example page's ``fetch`` (``gateway-fetch.js``) in a real browser, on its own.

ChatKit JS calls this function for every request, concurrently, and has no
secret-refresh hook of its own, so the renewal rules live here. The network is
a stub inside the page (answers decided per secret) and the clock is injected,
so each rule is checked exactly: renew ahead of expiry, one renewal however
many calls need it, a 401 ``client_secret_expired`` renewed and retried once,
other refusals passed through untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Page

from tests.browser import chromium
from tests.chatkit_server import EXAMPLE_DIR

GATEWAY_FETCH = EXAMPLE_DIR / "static" / "gateway-fetch.js"

# Runs in the page. `expired` lists secrets the stub gateway calls expired;
# `calls` are the (secret, body) pairs it saw; `sessions` counts getSession().
HARNESS = """
window.harness = (options = {}) => {
  const state = {now: 1000, sessions: 0, calls: [], expired: new Set(options.expired ?? [])};
  state.fetch = createGatewayFetch({
    now: () => state.now,
    renewBeforeSeconds: options.renewBeforeSeconds ?? 30,
    getSession: async () => {
      state.sessions++;
      if (options.failFirstSession && state.sessions === 1) throw new Error("backend down");
      await new Promise((resolve) => setTimeout(resolve, 10));  // a real round trip's gap
      return {client_secret: "ek_" + state.sessions, expires_at: state.now + 600};
    },
    fetch: async (request) => {
      const secret = request.headers.get("Authorization").slice("Bearer ".length);
      state.calls.push([secret, await request.text()]);
      if (state.expired.has(secret) || options.alwaysExpired) {
        return Response.json({error: {code: "client_secret_expired"}}, {status: 401});
      }
      if (options.revoked) {
        return Response.json({error: {code: "client_secret_revoked"}}, {status: 401});
      }
      return new Response("ok");
    },
  });
  state.call = (body) => state.fetch("http://gateway.test/chatkit", {method: "POST", body})
    .then((r) => r.status);
  return state;
};
"""


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with chromium() as browser:
        page = await browser.new_page()
        await page.add_script_tag(path=str(GATEWAY_FETCH))
        await page.add_script_tag(content=HARNESS)
        yield page


async def run(page: Page, script: str, options: dict[str, Any] | None = None) -> Any:
    return await page.evaluate(
        f"async (options) => {{ const h = harness(options); {script} }}", options or {}
    )


async def test_every_call_carries_the_secret_and_one_session_serves_many_calls(
    page: Page,
) -> None:
    result = await run(
        page,
        """
        const statuses = await Promise.all(["a", "b", "c"].map(h.call));
        return {statuses, sessions: h.sessions, calls: h.calls};
        """,
    )
    assert result == {
        "statuses": [200, 200, 200],
        "sessions": 1,  # three concurrent first calls, one session
        "calls": [["ek_1", "a"], ["ek_1", "b"], ["ek_1", "c"]],
    }


async def test_a_secret_is_renewed_before_it_expires_once_for_all_calls(page: Page) -> None:
    result = await run(
        page,
        """
        await h.call("a");
        h.now += 600 - 31;  // 31 s left: still good
        await h.call("b");
        h.now += 2;         // 29 s left: inside the 30 s margin
        await Promise.all(["c", "d"].map(h.call));
        return {sessions: h.sessions, calls: h.calls};
        """,
    )
    assert result == {
        "sessions": 2,
        "calls": [["ek_1", "a"], ["ek_1", "b"], ["ek_2", "c"], ["ek_2", "d"]],
    }


async def test_a_401_client_secret_expired_is_renewed_and_retried_once(page: Page) -> None:
    result = await run(
        page,
        """
        const statuses = await Promise.all(["a", "b"].map(h.call));
        return {statuses, sessions: h.sessions, calls: h.calls};
        """,
        {"expired": ["ek_1"]},
    )
    assert result == {
        "statuses": [200, 200],
        "sessions": 2,  # both calls refused, one renewal between them
        "calls": [["ek_1", "a"], ["ek_1", "b"], ["ek_2", "a"], ["ek_2", "b"]],
    }


async def test_a_second_expired_answer_is_returned_not_retried_again(page: Page) -> None:
    result = await run(
        page,
        "return {status: await h.call('a'), calls: h.calls.length};",
        {"alwaysExpired": True},
    )
    assert result == {"status": 401, "calls": 2}


async def test_other_refusals_reach_chatkit_untouched(page: Page) -> None:
    # A revoked session was ended on purpose: renewing it is the app's decision.
    result = await run(
        page,
        "return {status: await h.call('a'), sessions: h.sessions, calls: h.calls.length};",
        {"revoked": True},
    )
    assert result == {"status": 401, "sessions": 1, "calls": 1}


async def test_a_failed_session_request_is_tried_again_on_the_next_call(page: Page) -> None:
    result = await run(
        page,
        """
        const first = await h.call("a").catch((e) => e.message);
        const second = await h.call("b");
        return {first, second, calls: h.calls};
        """,
        {"failFirstSession": True},
    )
    assert result == {"first": "backend down", "second": 200, "calls": [["ek_2", "b"]]}
