"""Shared fixtures: one real Redis per session, one fake upstream per test.

Nothing here skips. A missing ``redis-server`` fails the run with instructions,
because a suite that quietly skips its storage tests proves nothing.

Event loops: ``upstream`` is function-scoped and runs in the test's own loop
(pyproject sets ``asyncio_default_fixture_loop_scope``), so the fake upstream,
the gateway client and the test share one loop and one clock. ``fake``,
``model``, ``http``, ``module_redis`` and ``aof_redis`` live for a module, for
modules whose tests share long-lived gateway replicas; those modules run in one
module-wide loop (``pytestmark = pytest.mark.asyncio(loop_scope="module")``),
and a module that runs in per-test loops defines its own ``http``.

Tiers: a test that starts a process (redis-server, the gateway, a proxy, a
browser), itself or through its fixtures and helpers, is marked ``process``
here, found by following the names its code refers to; ``scripts/test
--fast`` runs the others. A test that starts a process the classification
missed fails, so it cannot slow the fast tier unnoticed.
"""

from __future__ import annotations

import gc
import inspect
import os
import platform
import shutil
import sys
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings

from tests.fake_model import FakeModel
from tests.fake_upstream import FakeUpstream
from tests.harness import RedisServer

# -- tiers ------------------------------------------------------------------------

#: Names whose use starts a process: the subprocess module and asyncio's
#: subprocess functions (looked up as attributes, so by name), and browsers.
_SPAWNING_MODULES = ("subprocess", "multiprocessing", "playwright")
_SPAWNING_NAMES = frozenset({"create_subprocess_exec", "create_subprocess_shell", "Popen"})
#: Audit events of a process being started (os.fork covers multiprocessing).
_ROOT = Path(__file__).resolve().parent.parent
_SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec"})
_spawns: list[str] = []
#: Every fixture by name, for fixtures asked for by getfixturevalue.
_fixtures: dict[str, Any] = {}
_watching: list[bool] = [False]


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _ours(module_name: str) -> bool:
    """Whether a module is the repository's test or benchmark code (followed)."""
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None) or ""
    return any(path.startswith(str(_ROOT / part)) for part in ("tests", "bench", "examples"))


def _starts_process(obj: Any, seen: set[int]) -> bool:
    """Whether calling ``obj`` may start a process: follows what the tests'
    own functions and classes refer to, down to subprocess and friends."""
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, type):
        return any(
            _starts_process(member, seen)
            for cls in obj.__mro__
            if _ours(cls.__module__)
            for member in vars(cls).values()
            if inspect.isfunction(member) or isinstance(member, property | staticmethod)
        )
    if isinstance(obj, property):
        return _starts_process(obj.fget, seen)
    if isinstance(obj, staticmethod | classmethod):
        return _starts_process(obj.__func__, seen)
    function = inspect.unwrap(obj) if callable(obj) else obj
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    scope: dict[str, Any] = getattr(function, "__globals__", {})
    for each in _code_objects(code):
        # request.getfixturevalue("redis_url"): a fixture asked for by name.
        for const in each.co_consts:
            if (
                isinstance(const, str)
                and const in _fixtures
                and "getfixturevalue" in each.co_names
                and _fixture_starts_process(const, seen)
            ):
                return True
        for name in each.co_names:
            if name in _SPAWNING_NAMES:
                return True
            target = scope.get(name)
            if target is None:
                continue
            module = (
                target.__name__ if inspect.ismodule(target) else getattr(target, "__module__", "")
            )
            if str(module).partition(".")[0] in _SPAWNING_MODULES:
                return True
            if _ours(str(module)) and _starts_process(target, seen):
                return True
    return False


def _fixture_starts_process(name: str, seen: set[int]) -> bool:
    definition = _fixtures[name]
    return _starts_process(definition.func, seen) or any(
        _fixture_starts_process(arg, seen) for arg in definition.argnames if arg in _fixtures
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: set[int] = set()
    verdicts: dict[int, bool] = {}

    def spawns(obj: Any) -> bool:
        if id(obj) not in verdicts:
            verdicts[id(obj)] = _starts_process(obj, seen.copy())
        return verdicts[id(obj)]

    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        if fixtures is not None:
            for name, chain in fixtures.name2fixturedefs.items():
                _fixtures.setdefault(name, chain[-1])
    fast: list[pytest.Item] = []
    slow: list[pytest.Item] = []
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        definitions = fixtures.name2fixturedefs.values() if fixtures is not None else ()
        if spawns(getattr(item, "function", None)) or any(
            spawns(definition.func) for chain in definitions for definition in chain
        ):
            item.add_marker(pytest.mark.process)
            slow.append(item)
        else:
            fast.append(item)
    if config.getoption("--fast"):
        if slow:
            config.hook.pytest_deselected(items=slow)
        items[:] = fast


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast",
        action="store_true",
        help="run only the tests that start no process (see tests/conftest.py)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "process: the test starts a process (set by tests/conftest.py, not by hand)"
    )
    # The processor's name comes from running `uname -p`, once per process
    # (then cached); the openai SDK asks for it on its first request, so
    # whichever test made the worker's first SDK call would be taken for one
    # that starts a process.
    platform.processor()
    sys.addaudithook(_on_audit)


def _on_audit(event: str, args: tuple[Any, ...]) -> None:
    if _watching[0] and event in _SPAWN_EVENTS:
        _spawns.append(event)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    watch = item.get_closest_marker("process") is None
    _spawns.clear()
    _watching[0] = watch
    try:
        return (yield)
    finally:
        _watching[0] = False
        if watch and _spawns:
            pytest.fail(
                f"{item.nodeid} started a process ({_spawns[0]}) but tests/conftest.py "
                "did not classify it as a process test: teach _starts_process the way it does",
                pytrace=False,
            )


@pytest.fixture(scope="module", autouse=True)
def _collect_after_module() -> Iterator[None]:
    """A socket or Redis connection a module's tests left open is finalised
    here, once the module's fixtures are closed: its "unclosed" warning then
    fails that module (warnings are errors), not whichever later test the
    collector would happen to run in."""
    yield
    gc.collect()


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
async def model() -> AsyncIterator[FakeModel]:
    """One fake model API for a module's tests, in the module's event loop; it
    takes only its own key (``model.api_key``)."""
    async with FakeModel() as fake_model:
        yield fake_model


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
