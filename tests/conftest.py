"""Shared fixtures: one real Redis per session, one fake upstream per test.

Nothing here skips. A missing ``redis-server`` fails the run with instructions,
because a suite that quietly skips its storage tests proves nothing.

Event loops: ``upstream`` is function-scoped and runs in the test's own loop
(pyproject sets ``asyncio_default_fixture_loop_scope``), so the fake upstream,
the gateway client and the test share one loop and one clock. ``fake``,
``http``, ``module_redis`` and ``aof_redis`` live for a module, for modules whose
tests share long-lived gateway replicas; those modules run in one module-wide
loop (``pytestmark = pytest.mark.asyncio(loop_scope="module")``), and a module
that runs in per-test loops defines its own ``http``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings

from tests.fake_upstream import FakeUpstream
from tests.harness import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole session; use ``redis_url`` in tests."""
    if shutil.which("redis-server") is None:
        pytest.fail(
            "redis-server was not found on PATH. These tests run against a real Redis: "
            "install it (Debian/Ubuntu: `apt-get install redis-server`; macOS: "
            "`brew install redis`) and run the tests again.",
            pytrace=False,
        )
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of an empty, running Redis, whatever the previous test did to it."""
    redis_server.ensure_running()
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """A fresh fake ChatKit API on a free port, in the test's event loop."""
    async with FakeUpstream() as fake:
        yield fake


# -- shared by the modules that run long-lived replicas ------------------------------


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    """A private redis-server for one module, without persistence: a restart empties it."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def aof_redis() -> Iterator[RedisServer]:
    """A private redis-server for one module that syncs every write to disk.

    appendfsync always: a killed and restarted Redis keeps every write, so a
    test that kills it shows the gateway losing nothing, not Redis losing a second.
    """
    with RedisServer(appendonly=True, appendfsync="always") as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake() -> AsyncIterator[FakeUpstream]:
    """One fake ChatKit API for a module's tests, in the module's event loop."""
    async with FakeUpstream() as upstream:
        yield upstream


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One HTTP client for a module's tests, in the module's event loop."""
    async with aiohttp.ClientSession() as session:
        yield session


# -- Hypothesis: bounded in the suite, long under scripts/fuzz --------------------------

# Every example talks to a real process, so the deadline (meant for pure
# functions) and the too-slow check would measure the machine, not the code.
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,  # the suite leaves no files behind; scripts/fuzz keeps failures
    print_blob=True,  # a failure prints the line that replays it
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "3000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
